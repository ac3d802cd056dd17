"""The static streaming state and the codec CUDA graphs give the audio of the eager dict-state path and of the
whole-utterance decode, for any chunk schedule, past the attention window, and with streams interleaved."""

import itertools

import numpy as np
import pytest
import torch

from qwen_tts_megakernel.codec import (
    GRAPH_SIZES,
    GRAPHS_ENV,
    CodecDecoder,
    CodecDecoderConfig,
    DecoderState,
    StaticDecoderState,
    StreamingCodecDecoder,
    graph_sizes,
)
from qwen_tts_megakernel.synthetic.codec import random_speech_tokenizer_weights, tiny_speech_tokenizer_config

SPF = 1920  # samples per frame
SMALL_WINDOW = 6  # an attention window that chunk schedules cross within a few frames

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def tiny_codec(window: int, device: str = "cpu") -> CodecDecoder:
    config = tiny_speech_tokenizer_config()
    config["decoder_config"]["sliding_window"] = window
    weights = random_speech_tokenizer_weights(config, seed=0)
    return CodecDecoder.from_state_dict(CodecDecoderConfig.from_json_dict(config), weights, device=device)


def random_codes(frames: int, seed: int, device="cpu") -> torch.Tensor:
    return torch.randint(0, 2048, (frames, 16), generator=torch.Generator().manual_seed(seed)).to(device)


def chunks(frames: int, schedule) -> list[tuple[int, int]]:
    """(start, end) of each chunk when `frames` frames are pushed by `schedule` (repeated)."""
    out, start = [], 0
    for n in itertools.cycle(schedule):
        if start >= frames:
            return out
        out.append((start, min(start + n, frames)))
        start = out[-1][1]


@torch.inference_mode()
def forward_chunks(decoder: CodecDecoder, codes: torch.Tensor, schedule, state) -> torch.Tensor:
    return torch.cat([decoder(codes[None, a:b], state)[0] for a, b in chunks(len(codes), schedule)])


def push_interleaved(a: StreamingCodecDecoder, codes_a, schedule_a, b: StreamingCodecDecoder, codes_b, schedule_b):
    """Alternate the pushes of two streams until both are done. Their concatenated outputs."""
    wav_a, wav_b = [], []
    for chunk_a, chunk_b in itertools.zip_longest(chunks(len(codes_a), schedule_a), chunks(len(codes_b), schedule_b)):
        if chunk_a:
            wav_a.append(a.push(codes_a[slice(*chunk_a)]))
        if chunk_b:
            wav_b.append(b.push(codes_b[slice(*chunk_b)]))
    return torch.cat(wav_a), torch.cat(wav_b)


def stream_chunks(stream: StreamingCodecDecoder, codes: torch.Tensor, schedule) -> torch.Tensor:
    wavs = []
    for a, b in chunks(len(codes), schedule):
        wav = stream.push(codes[a:b])
        assert wav.shape == ((b - a) * SPF,)
        wavs.append(wav)
    return torch.cat(wavs)


@pytest.fixture(scope="module")
def small_window():
    return tiny_codec(SMALL_WINDOW)


@pytest.fixture(scope="module")
def real_window():
    return tiny_codec(72)


# --- CPU: the static state and the chunking, eagerly -------------------------------------------------------------


def test_graph_sizes_split_any_chunk_into_captured_sizes():
    assert GRAPH_SIZES == (8, 4, 2, 1)
    assert [graph_sizes(n) for n in (1, 2, 3, 5, 7, 8, 13, 16)] == [
        [1], [2], [2, 1], [4, 1], [4, 2, 1], [8], [8, 4, 1], [8, 8]]


@pytest.mark.parametrize(
    "window, frames, schedule",
    [
        (SMALL_WINDOW, 30, [1]),
        (SMALL_WINDOW, 30, [1, 2, 4, 8]),
        (SMALL_WINDOW, 30, [3]),
        (SMALL_WINDOW, 30, [5, 2]),
        (SMALL_WINDOW, 30, [30]),  # one chunk longer than the window
        (72, 90, [7]),  # the real window: the static cache is masked for the first 71 frames
    ],
    ids=["ones", "1-2-4-8", "threes", "5-2", "one-chunk", "sevens-real-window"],
)
def test_static_state_equals_dict_state_and_whole_decode(small_window, real_window, window, frames, schedule):
    decoder = small_window if window == SMALL_WINDOW else real_window
    codes = random_codes(frames, seed=frames + len(schedule))
    whole = decoder.decode(codes)
    static = forward_chunks(decoder, codes, schedule, StaticDecoderState(decoder))
    grown = forward_chunks(decoder, codes, schedule, DecoderState())
    assert static.shape == grown.shape == whole.shape == (frames * SPF,)
    assert (static - grown).abs().max().item() <= 1e-5
    assert (static - whole).abs().max().item() <= 1e-5


def test_static_state_is_one_flat_buffer_and_a_device_position(small_window):
    state = StaticDecoderState(small_window)
    views = [v for slot in state.slots.values() for v in (slot if isinstance(slot, tuple) else (slot,))]
    floats = [v for v in views if v is not state.position]
    assert sum(v.numel() for v in floats) == state.values.numel()
    assert all(v.untyped_storage().data_ptr() == state.values.untyped_storage().data_ptr() for v in floats)
    assert state.position.shape == () and state.position.dtype == torch.long
    keys, values = state.get("pre_transformer.layers.0.attn")
    assert keys.shape[2] == values.shape[2] == SMALL_WINDOW - 1
    forward_chunks(small_window, random_codes(9, seed=2), [4], state)
    assert int(state.position) == 9
    other = StaticDecoderState(small_window)
    other.copy_(state)
    assert torch.equal(other.values, state.values) and int(other.position) == 9


def test_streams_are_eager_on_a_dict_state_off_cuda(small_window):
    stream = StreamingCodecDecoder(small_window)
    assert stream.graphs is None and isinstance(stream.state, DecoderState)


def test_graph_runner_steps_run_eagerly_off_cuda_and_keep_streams_apart(small_window):
    """use_graphs=True on the CPU: CodecGraphs' chunking (any n as 8/4/2/1 steps) and state copies, eagerly."""
    frames = 40
    codes_a, codes_b = random_codes(frames, seed=3), random_codes(frames, seed=4)
    a = StreamingCodecDecoder(small_window, use_graphs=True)
    b = StreamingCodecDecoder(small_window, use_graphs=True)
    assert a.graphs is b.graphs is small_window.streaming_graphs() and not a.graphs.use_graphs
    wav_a, wav_b = push_interleaved(a, codes_a, [1, 2, 4, 8], b, codes_b, [3, 5, 13])
    assert (wav_a - small_window.decode(codes_a)).abs().max().item() <= 1e-5
    assert (wav_b - small_window.decode(codes_b)).abs().max().item() <= 1e-5
    assert a.frames_pushed == b.frames_pushed == frames
    assert a.graphs.graphs == {}


def test_graph_runner_reset_starts_a_new_utterance(small_window):
    codes = random_codes(12, seed=5)
    stream = StreamingCodecDecoder(small_window, use_graphs=True)
    first = stream_chunks(stream, codes, [5])
    stream.reset()
    again = stream_chunks(stream, codes, [3])
    assert stream.frames_pushed == 12
    assert (first - again).abs().max().item() <= 1e-5
    assert (first - small_window.decode(codes)).abs().max().item() <= 1e-5


# --- GPU: graph replay against the eager CUDA path -----------------------------------------------------------------


@pytest.fixture
def no_tf32():
    """Full fp32 matmuls and convolutions while the test runs (shapes differ between the paths)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def cuda_codecs():
    """window -> a tiny decoder on CUDA (its graphs are captured by the tests that use them)."""
    return {window: tiny_codec(window, "cuda") for window in (SMALL_WINDOW, 72)}


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("window", [SMALL_WINDOW, 72])
@pytest.mark.parametrize("chunk", [1, 2, 4, 8, 3, 5])
def test_graph_replay_equals_the_eager_cuda_path(cuda_codecs, no_tf32, window, chunk):
    decoder = cuda_codecs[window]
    codes = random_codes(90, seed=chunk, device="cuda")  # past the 72-frame window too
    graphed = StreamingCodecDecoder(decoder)
    assert graphed.graphs is decoder.streaming_graphs() and graphed.graphs.use_graphs
    assert isinstance(graphed.state, StaticDecoderState)
    replayed = stream_chunks(graphed, codes, [chunk])
    eager = stream_chunks(StreamingCodecDecoder(decoder, use_graphs=False), codes, [chunk])
    assert replayed.is_cuda and torch.isfinite(replayed).all()
    assert (replayed - eager).abs().max().item() <= 1e-4
    assert (replayed - decoder.decode(codes)).abs().max().item() <= 1e-4
    assert set(graph_sizes(chunk)) <= set(decoder.streaming_graphs().graphs)


@pytest.mark.gpu
@needs_cuda
def test_interleaved_graph_streams_each_equal_their_own_decode(cuda_codecs, no_tf32):
    decoder = cuda_codecs[72]
    frames = 90
    codes_a, codes_b = random_codes(frames, seed=10, device="cuda"), random_codes(frames, seed=11, device="cuda")
    wav_a, wav_b = push_interleaved(StreamingCodecDecoder(decoder), codes_a, [1, 2, 4, 8],
                                    StreamingCodecDecoder(decoder), codes_b, [3, 5])
    eager_a = stream_chunks(StreamingCodecDecoder(decoder, use_graphs=False), codes_a, [1, 2, 4, 8])
    eager_b = stream_chunks(StreamingCodecDecoder(decoder, use_graphs=False), codes_b, [3, 5])
    assert (wav_a - eager_a).abs().max().item() <= 1e-4
    assert (wav_b - eager_b).abs().max().item() <= 1e-4
    assert (wav_a - wav_b).abs().max().item() > 0.01  # two different utterances


@pytest.mark.gpu
@needs_cuda
def test_warm_up_captures_every_size_once_and_replays_them(no_tf32):
    decoder = tiny_codec(SMALL_WINDOW, "cuda")
    runner = decoder.streaming_graphs()
    StreamingCodecDecoder(decoder).push(random_codes(3, seed=1, device="cuda"))
    assert set(runner.graphs) == {2, 1}  # captured lazily, at first use
    runner.warm_up()
    captured = dict(runner.graphs)
    assert set(captured) == set(GRAPH_SIZES)
    codes = random_codes(40, seed=2, device="cuda")
    wav = stream_chunks(StreamingCodecDecoder(decoder), codes, [1, 2, 3, 4, 5, 6, 7, 8, 4])
    assert all(runner.graphs[n] is captured[n] for n in GRAPH_SIZES) and len(runner.graphs) == len(GRAPH_SIZES)
    assert (wav - decoder.decode(codes)).abs().max().item() <= 1e-4


@pytest.mark.gpu
@needs_cuda
def test_real_codec_shapes_replay_equal_the_eager_path(no_tf32):
    """The released codec's shapes (16 K/V heads, head_dim 64, 8 layers, widths up to 1536), random weights."""
    from qwen_tts_megakernel.tools.codec_timing import real_codec

    decoder = real_codec(torch.device("cuda"))
    codes = random_codes(84, seed=12, device="cuda")
    schedule = [1, 2, 4, 8, 3, 5]
    replayed = stream_chunks(StreamingCodecDecoder(decoder), codes, schedule)
    eager = stream_chunks(StreamingCodecDecoder(decoder, use_graphs=False), codes, schedule)
    assert set(decoder.streaming_graphs().graphs) == set(GRAPH_SIZES)
    assert torch.isfinite(replayed).all() and replayed.std().item() > 0.01
    assert (replayed - eager).abs().max().item() <= 1e-4


@pytest.mark.gpu
@needs_cuda
def test_the_environment_variable_turns_the_graphs_off(cuda_codecs, monkeypatch):
    monkeypatch.setenv(GRAPHS_ENV, "0")
    stream = StreamingCodecDecoder(cuda_codecs[SMALL_WINDOW])
    assert stream.graphs is None and isinstance(stream.state, DecoderState)


@pytest.mark.gpu
@needs_cuda
def test_codec_timing_runs_and_reports_both_paths():
    """The timing entry point on a tiny decoder: its report, not its numbers."""
    from qwen_tts_megakernel.tools.codec_timing import codec_decode_timing

    result = codec_decode_timing(tiny_codec(SMALL_WINDOW, "cuda"), chunk_sizes=(1, 8), runs=3, context_frames=10)
    assert result["graphs"] is True and result["capture_s"] > 0
    for n in ("1", "8"):
        assert result["push_ms"][n]["eager"]["runs"] == result["push_ms"][n]["graphed"]["runs"] == 3
        assert result["push_ms"][n]["graphed"]["median"] > 0
    assert result["max_abs_diff_graphed_vs_eager"] <= 1e-3  # TF32 may be on here, as in production


@pytest.mark.gpu
@needs_cuda
def test_synthesizer_warms_the_codec_graphs_and_streams_through_them(tmp_path, no_tf32):
    from qwen_tts_megakernel.engine import Synthesizer
    from qwen_tts_megakernel.synthetic import write_tiny_model

    synth = Synthesizer.from_pretrained(str(write_tiny_model(tmp_path, "0.6b", "custom_voice", seed=0)),
                                        device="cuda", dtype="float32")
    runner = synth.codec.streaming_graphs()
    assert set(runner.graphs) == set(GRAPH_SIZES)
    stream = synth.stream("Hello world, this is a test.", seed=5, max_new_tokens=20, chunk_schedule=(1, 2, 4, 8))
    pcm = np.concatenate([c.pcm for c in stream]).astype(np.float64)
    assert len(stream.codes) > 0 and len(runner.graphs) == len(GRAPH_SIZES)  # no capture during the request
    whole = np.clip(synth.decode(np.stack(stream.codes)), -1, 1) * 32767
    assert np.abs(pcm - whole).max() <= 2.0
