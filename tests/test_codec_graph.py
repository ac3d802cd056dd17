"""StreamingCodec's fixed-shape steps (batch buckets x 8/4/2/1 frames) and their CUDA graphs give the audio of the
eager path and of the whole-utterance decode, for any chunk schedule, past the attention window."""

import numpy as np
import pytest
import torch

from qwen_tts_megakernel.codec import STEP_FRAMES, StreamingCodec, batch_buckets, frame_steps
from test_codec_batch import SMALL_WINDOW, random_codes, run_streams, tiny_codec

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_frame_steps_split_any_push_into_captured_sizes():
    assert STEP_FRAMES == (8, 4, 2, 1)
    assert [frame_steps(n) for n in (0, 1, 2, 3, 5, 7, 8, 13, 16)] == [
        [], [1], [2], [2, 1], [4, 1], [4, 2, 1], [8], [8, 4, 1], [8, 8]]


def test_batch_buckets_are_powers_of_two_up_to_max_streams():
    assert batch_buckets(1) == (1,)
    assert batch_buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert batch_buckets(48) == (1, 2, 4, 8, 16, 32, 48)


def test_fixed_steps_off_cuda_capture_nothing_and_touch_only_their_streams():
    """use_graphs=True on the CPU: steps are made (eager) for the buckets used; padding rows write only the scratch
    row, so a stream that sits out a push keeps its state."""
    decoder = tiny_codec(SMALL_WINDOW)
    codec = StreamingCodec(decoder, max_streams=4, use_graphs=True)
    assert codec.use_graphs and not codec.cuda_graphs
    a, b, idle = codec.open(), codec.open(), codec.open()
    codec.push([idle], [random_codes(2, seed=1)])
    idle_state = codec.store.values[idle.slot].clone()
    codec.push([a, b], [random_codes(3, seed=2), random_codes(3, seed=3)])  # bucket 2, steps 2 + 1
    codec.push([a], [random_codes(5, seed=4)])  # bucket 1, steps 4 + 1
    assert set(codec._steps) == {(1, 2), (2, 2), (2, 1), (1, 4), (1, 1)}
    assert all(step.graph is None for step in codec._steps.values())
    assert torch.equal(codec.store.values[idle.slot], idle_state)


# --- GPU: graph replay against the eager CUDA path ----------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("window", [SMALL_WINDOW, 72])
def test_graph_replay_equals_the_eager_cuda_path(no_tf32, window):
    decoder = tiny_codec(window, "cuda")
    codes = [random_codes(90, seed=s) for s in range(3)]  # past the 72-frame window too
    schedules, starts = [[1, 2, 4, 8], [3, 5], [13]], [0, 1, 4]
    graphed = StreamingCodec(decoder, 4)
    assert graphed.cuda_graphs
    replayed, _ = run_streams(graphed, codes, schedules, starts)
    eager, _ = run_streams(StreamingCodec(decoder, 4, use_graphs=False), codes, schedules, starts)
    for r, e, c in zip(replayed, eager, codes):
        assert np.isfinite(r).all()
        assert np.abs(r - e).max() <= 1e-4
        assert np.abs(r - decoder.decode(c).cpu().numpy()).max() <= 1e-4
    assert all(step.graph is not None for step in graphed._steps.values())


@pytest.mark.gpu
@needs_cuda
def test_warm_up_captures_once_and_pushes_replay(no_tf32):
    decoder = tiny_codec(SMALL_WINDOW, "cuda")
    codec = StreamingCodec(decoder, 8)
    codec.warm_up(batch_sizes=(1, 3))
    captured = dict(codec._steps)
    assert set(captured) == {(b, n) for b in (1, 4) for n in STEP_FRAMES}
    codes = [random_codes(40, seed=s) for s in range(3)]
    pcm, _ = run_streams(codec, codes, [[1, 2, 3, 4, 5, 6, 7, 8]] * 3, [0, 0, 0])
    assert codec._steps == captured  # nothing captured during the pushes
    for p, c in zip(pcm, codes):
        assert np.abs(p - decoder.decode(c).cpu().numpy()).max() <= 1e-4


@pytest.mark.gpu
@needs_cuda
def test_real_codec_shapes_replay_equal_the_eager_path(no_tf32):
    """The released codec's shapes (16 K/V heads, head_dim 64, 8 layers, widths up to 1536), random weights."""
    from qwen_tts_megakernel.tools.codec_timing import real_codec

    decoder = real_codec(torch.device("cuda"))
    codes = [random_codes(84, seed=12), random_codes(80, seed=13)]
    schedules = [[1, 2, 4, 8, 3, 5], [2, 8]]
    replayed, _ = run_streams(StreamingCodec(decoder, 2), codes, schedules, [0, 1])
    eager, _ = run_streams(StreamingCodec(decoder, 2, use_graphs=False), codes, schedules, [0, 1])
    for r, e in zip(replayed, eager):
        assert np.isfinite(r).all() and r.std() > 0.01
        assert np.abs(r - e).max() <= 1e-4


@pytest.mark.gpu
@needs_cuda
def test_codec_timing_runs_and_reports(tmp_path):
    """The timing entry point on a tiny decoder: its report and files, not its numbers."""
    from qwen_tts_megakernel.tools.codec_timing import main

    out = tmp_path / "codec-timing.json"
    assert main(["--tiny", "--runs", "3", "--batch", "1", "4", "--frames", "1", "8", "--out", str(out)]) == 0
    import json

    result = json.loads(out.read_text())
    assert result["device"] and out.with_suffix(".md").exists()
    rows = result["rows"]
    assert {(r["batch"], r["frames"], r["mode"], r["precision"]) for r in rows} >= {
        (4, 8, "graphs", "bf16"), (1, 1, "eager", "fp32")}
    assert all(r["median_ms"] > 0 and r["audio_s_per_s"] > 0 for r in rows)


@pytest.mark.gpu
@needs_cuda
def test_synthesizer_warms_the_codec_graphs_and_streams_through_them(tmp_path, no_tf32):
    from qwen_tts_megakernel.engine import Synthesizer
    from qwen_tts_megakernel.synthetic import write_tiny_model

    synth = Synthesizer.from_pretrained(str(write_tiny_model(tmp_path, "0.6b", "custom_voice", seed=0)),
                                        device="cuda", dtype="float32")
    try:
        codec = synth.engine.codec
        assert isinstance(codec, StreamingCodec) and codec.max_streams == synth.engine_settings.max_active
        captured = dict(codec._steps)
        assert set(captured) == {(b, n) for b in batch_buckets(codec.max_streams) for n in STEP_FRAMES}
        stream = synth.stream("Hello world, this is a test.", seed=5, max_new_tokens=20, chunk_schedule=(1, 2, 4, 8))
        pcm = np.concatenate([c.pcm for c in stream]).astype(np.float64)
        assert len(stream.codes) > 0 and codec._steps == captured  # no capture during the request
        whole = np.clip(synth.decode(np.stack(stream.codes)), -1, 1) * 32767  # fp32 (no_tf32)
        # The engine's codec runs in TF32 on a GPU: within the codec's TF32 bound of the fp32 whole decode.
        snr = 10 * np.log10(np.sum(whole ** 2) / max(np.sum((pcm - whole) ** 2), 1e-12))
        assert snr >= 45.0, snr
    finally:
        synth.close()
