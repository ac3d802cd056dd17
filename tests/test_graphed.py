"""The graphed reference backend: many streams in one static-shape frame give each stream the reference's codes."""

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch

from qwen_tts_megakernel.backends import graphed
from qwen_tts_megakernel.backends.base import StreamSpec
from qwen_tts_megakernel.backends.graphed import GraphedBackend, RowSampler, device_uniforms, time_graphed_frames
from qwen_tts_megakernel.checkpoint import load_checkpoint
from qwen_tts_megakernel.model import Talker
from qwen_tts_megakernel.prompt import build_prompt
from qwen_tts_megakernel.sampling import (RandomStream, SamplingParams, TalkerRules, choose, philox_uniforms,
                                          sample_code_predictor, sample_talker)
from qwen_tts_megakernel.synthetic import write_tiny_model

FRAMES = 10
GREEDY = SamplingParams(do_sample=False, subtalker_dosample=False)
DEFAULT = SamplingParams()
WARPED = SamplingParams(temperature=0.7, top_k=10, top_p=0.8, repetition_penalty=1.3, subtalker_temperature=1.2,
                        subtalker_top_k=5, subtalker_top_p=0.9)
GREEDY_TALKER = SamplingParams(do_sample=False, subtalker_top_k=256, subtalker_top_p=0.7)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread is many times faster than two on a busy machine (and the codes do not change)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(talker, checkpoint) of a tiny 1.7B-like model (it has the small_to_mtp projection), fp32 on the CPU."""
    folder = write_tiny_model(tmp_path_factory.mktemp("tiny"), "1.7b", "custom_voice", seed=0)
    checkpoint = load_checkpoint(folder)
    return Talker.from_state_dict(checkpoint.config, checkpoint.weights), checkpoint


def make_spec(model, text, layout, params, seed, frames=FRAMES, voice="ryan", table=None, text_final=True):
    talker, checkpoint = model
    prompt = build_prompt(checkpoint.config, checkpoint.tokenizer, text, voice=voice, language="english",
                          text_layout=layout)
    with torch.inference_mode():
        prefill = talker.embed_rows(prompt.text_ids, prompt.codec_ids)
        text_rows = talker.text_rows(prompt.trailing_text_ids) if prompt.trailing_text_ids else prefill[:0]
        pad_row = talker.text_rows([checkpoint.config.ids.tts_pad])[0]
    return StreamSpec(prefill=prefill, text_rows=text_rows, pad_row=pad_row, params=params,
                      rng=RandomStream(seed, table), max_frames=frames, text_final=text_final)


@torch.inference_mode()
def reference_codes(talker: Talker, spec: StreamSpec, frames: int) -> np.ndarray:
    """The spec, one stream alone: the per-stream loop of model.py + sampling.py (frame semantics of base.py).
    Stops after an EOS frame, whose codes 1..15 are left 0."""
    cfg = talker.config
    rules = TalkerRules(vocab_size=cfg.talker.vocab_size, eos_id=cfg.ids.codec_eos)
    cp = talker.code_predictor
    cache = talker.new_cache(len(spec.prefill) + frames)
    past, out, last = [], [], None
    for k in range(frames):
        if k == 0:
            rows = spec.prefill
        else:
            text = spec.text_rows[k - 1] if k - 1 < len(spec.text_rows) else spec.pad_row
            rows = (talker.frame_embedding(last) + text).unsqueeze(0)
        hidden, logits = talker.forward_rows(rows, cache)
        logits = logits.cpu()
        u = spec.rng.frame(k)
        codes = np.zeros(16, dtype=np.int64)
        codes[0] = sample_talker(logits, torch.tensor(past, dtype=torch.long), k, spec.params, rules, float(u[0]))
        out.append(codes)
        if codes[0] == rules.eos_id:
            break
        cp_cache = cp.new_cache(hidden.device, hidden.dtype)
        cp_rows = torch.stack([hidden, talker.model.codec_embedding.weight[codes[0]]])
        for j in range(1, 16):
            logits_j = cp.logits(cp_rows, cp_cache, head=j - 1).cpu()
            codes[j] = sample_code_predictor(logits_j, spec.params, float(u[j]))
            if j < 15:
                cp_rows = cp.input_row(j + 1, int(codes[j]))
        past.append(int(codes[0]))
        last = codes.tolist()
    return np.stack(out)


def assert_same_codes(got: list, expected: np.ndarray, eos: int) -> None:
    """Frame for frame; on an EOS frame only codebook 0 counts (the contract leaves the rest meaningless)."""
    got = np.stack(got)
    assert len(got) == len(expected)
    for k, (g, e) in enumerate(zip(got, expected)):
        if e[0] == eos:
            assert g[0] == eos, f"frame {k}"
        else:
            np.testing.assert_array_equal(g, e, err_msg=f"frame {k}")


def run_schedule(backend, specs, schedule, eos):
    """Open/step per `schedule`: ("open", [i, ...]) or ("step", [i, ...]); returns each stream's frames. A stream
    leaves the schedule (closed) after EOS or its max_frames."""
    handles, codes, done = {}, {i: [] for i in range(len(specs))}, set()
    for action, which in schedule:
        if action == "open":
            for i, h in zip(which, backend.open([specs[i] for i in which])):
                handles[i] = h
            continue
        which = [i for i in which if i not in done]
        out = backend.step([handles[i] for i in which])
        assert out.failed == {}
        for row, i in enumerate(which):
            codes[i].append(out.codes[row])
            if out.codes[row, 0] == eos or len(codes[i]) == specs[i].max_frames:
                done.add(i)
                backend.close(handles[i])
    return codes


def test_philox_on_the_device_equals_sampling_philox():
    seeds = [0, 1, 7, (1 << 32) + 5, (1 << 64) - 1, 0x0123456789ABCDEF]
    frames = [0, 1, 77, 4095, (1 << 31) + 3, (1 << 32) - 1]
    lo = torch.tensor([s & 0xFFFFFFFF for s in seeds])
    hi = torch.tensor([s >> 32 for s in seeds])
    got = device_uniforms(lo, hi, torch.tensor(frames)).numpy()
    for row, (seed, frame) in enumerate(zip(seeds, frames)):
        np.testing.assert_array_equal(got[row], philox_uniforms(seed, frame))


def sampler_for(params_list: list[tuple[bool, float, int, float]]):
    sampler = RowSampler.empty(len(params_list), "cpu")
    for slot, params in enumerate(params_list):
        sampler.set(slot, *params)
    return sampler.rows(torch.arange(len(params_list)))


def test_row_sampling_equals_sampling_choose_row_by_row():
    """Each row with its own (do_sample, temperature, top_k, top_p) picks what sampling.choose picks; rows of tied
    scores (quantised logits) check that top-k keeps ties and the draw takes the lower index among equals."""
    gen = torch.Generator().manual_seed(0)
    options = [(False, 1.0, 0, 1.0), (True, 0.9, 50, 1.0), (True, 0.7, 10, 0.8), (True, 1.3, 0, 0.95),
               (True, 0.5, 2048, 0.5), (True, 1.0, 1, 1.0), (True, 2.0, 7, 0.999), (True, 1.0, 0, 1e-9)]
    params = [options[i % len(options)] for i in range(64)]
    logits = torch.randn(64, 2048, generator=gen) * 3
    logits[len(options):2 * len(options), 100:] = float("-inf")  # few candidates left
    ties = torch.round(torch.randn(14, 2048, generator=gen) * 2) / 2  # many exact ties
    tie_params = [(True, 0.9, k, 1.0) for k in (3, 17, 50, 0, 200, 1, 2)] * 2
    logits, params = torch.cat([logits, ties]), params + tie_params
    u = torch.rand(len(params), generator=gen, dtype=torch.float64)
    tokens, bad = sampler_for(params).choose(logits, u)
    assert not bad.any()
    for row, (do_sample, temperature, top_k, top_p) in enumerate(params):
        expected = choose(logits[row], do_sample, temperature, top_k, top_p, float(u[row]))
        assert tokens[row] == expected, f"row {row} {params[row]}"


def test_rows_that_cannot_be_sampled_are_flagged_with_code_0():
    """The cases where sampling.choose gives up: NaN scores, no finite score, no finite score after the temperature.
    A +inf score beside finite ones is still a greedy pick."""
    nan, inf = float("nan"), float("inf")
    rows = torch.randn(6, 16)
    rows[0, 3] = nan  # greedy, NaN
    rows[1, :] = -inf  # greedy, nothing finite
    rows[2, 5] = nan  # sampled, NaN
    rows[3, :] = -inf  # sampled, nothing finite
    rows[4] = rows[4] * 1e30  # sampled at temperature 1e-10: every scaled score overflows
    rows[5, 7] = inf  # greedy: +inf is the pick
    params = [(False, 1.0, 0, 1.0), (False, 1.0, 0, 1.0), (True, 1.0, 0, 1.0), (True, 1.0, 5, 0.9),
              (True, 1e-10, 0, 1.0), (False, 1.0, 0, 1.0)]
    tokens, bad = sampler_for(params).choose(rows, torch.full((6,), 0.5, dtype=torch.float64))
    assert bad.tolist() == [True] * 5 + [False]
    assert tokens.tolist() == [0] * 5 + [7]


def test_many_streams_at_different_positions_get_the_reference_codes(model, monkeypatch):
    """Five streams (both layouts, greedy/sampled/warped parameters, an explicit random table, a 64-bit seed) join at
    different times and step in changing groups and orders; each gets exactly its codes alone. Streams that open
    together prefill as one batch (here split in two by a small row budget)."""
    monkeypatch.setattr(graphed, "PREFILL_ROWS", 40)
    talker, checkpoint = model
    eos = checkpoint.config.ids.codec_eos
    table = np.random.default_rng(3).random((FRAMES, 16))
    specs = [
        make_spec(model, "Hello world, this is a test.", "prefill", GREEDY, 1),
        make_spec(model, "Hello world, this is a test.", "interleaved", DEFAULT, 5),
        make_spec(model, "Another sentence, rather longer than the first one.", "interleaved", WARPED,
                  (1 << 40) + 3, voice="vivian"),
        make_spec(model, "Short.", "prefill", GREEDY_TALKER, 9, voice="aiden"),
        make_spec(model, "A table of random numbers.", "interleaved", DEFAULT, 0, table=table),
    ]
    schedule = [("open", [0, 1])] + [("step", [0, 1])] * 3 + [("open", [2]), ("step", [2, 0]), ("step", [1]),
                                                             ("open", [3, 4])]
    schedule += [("step", [4, 3, 2, 1, 0])] * 3 + [("step", [2, 3, 4])] * 2
    schedule += [("step", [0, 1, 2, 3, 4])] * 6
    backend = GraphedBackend(talker, max_streams=6, max_seq_len=96)
    got = run_schedule(backend, specs, schedule, eos)
    for i, spec in enumerate(specs):
        assert_same_codes(got[i], reference_codes(talker, spec, len(got[i])), eos)


def test_codes_do_not_depend_on_the_batch_on_cpu(model):
    """Batch invariance, measured on the CPU in fp32: alone (bucket 1) or as one row of 8 (bucket 8)."""
    talker, _ = model
    spec = make_spec(model, "Hello world, this is a test.", "interleaved", WARPED, 11)
    others = [make_spec(model, "Other streams ride along.", "interleaved", DEFAULT, s) for s in range(7)]
    alone = GraphedBackend(talker, max_streams=8, max_seq_len=64)
    h = alone.open([spec])[0]
    expected = np.stack([alone.step([h]).codes[0] for _ in range(6)])
    crowded = GraphedBackend(talker, max_streams=8, max_seq_len=64)
    handles = crowded.open(others[:3] + [spec] + others[3:])
    got = np.stack([crowded.step(handles).codes[3] for _ in range(6)])
    np.testing.assert_array_equal(got, expected)


def test_eos_wins_from_frame_2_on_and_not_before(model):
    """A codec head biased towards EOS: codebook 0 may not be EOS in frames 0 and 1 (min_new_tokens), then is."""
    talker, checkpoint = model
    eos = checkpoint.config.ids.codec_eos
    eager = copy.deepcopy(talker)
    head = eager.codec_head
    eager.codec_head = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    eager.codec_head.weight = head.weight
    eager.codec_head.bias = torch.nn.Parameter(torch.zeros(head.out_features).index_fill(0, torch.tensor([eos]), 1e4))
    specs = [make_spec((eager, checkpoint), "Hello world, this is a test.", "interleaved", params, 2)
             for params in (GREEDY, DEFAULT)]
    backend = GraphedBackend(eager, max_streams=2, max_seq_len=96)
    handles = backend.open(specs)
    got = [backend.step(handles).codes for _ in range(3)]
    assert [int(frame[i, 0] == eos) for frame in got for i in range(2)] == [0, 0, 0, 0, 1, 1]
    for i, spec in enumerate(specs):
        assert_same_codes([frame[i] for frame in got], reference_codes(eager, spec, 5), eos)


def test_live_text_matches_the_whole_text_given_up_front(model):
    """Rows arrive one frame ahead of their use (as the engine schedules them), then end_text; stepping a frame
    whose text row has not arrived is refused."""
    talker, checkpoint = model
    whole = make_spec(model, "Live text arrives while we speak.", "interleaved", DEFAULT, 4)
    rows = whole.text_rows
    assert len(rows) >= 4
    backend = GraphedBackend(talker, max_streams=2, max_seq_len=96)
    h = backend.open([replace(whole, text_rows=rows[:1], text_final=False)])[0]
    got = [backend.step([h]).codes[0], backend.step([h]).codes[0]]  # frame 1 reads row 0
    out = backend.step([h])  # frame 2 needs row 1: the stream fails this step (the engine never asks this)
    assert "text row 1" in out.failed[0]
    backend.append_text(h, rows[1:3])
    got += [backend.step([h]).codes[0] for _ in range(2)]
    backend.append_text(h, rows[3:])
    backend.end_text(h)
    with pytest.raises(ValueError, match="text already ended"):
        backend.append_text(h, rows[:1])
    got += [backend.step([h]).codes[0] for _ in range(FRAMES - 4)]
    assert_same_codes(got, reference_codes(talker, whole, FRAMES), checkpoint.config.ids.codec_eos)


def test_a_non_finite_stream_fails_alone_and_its_slot_is_clean_afterwards(model):
    talker, checkpoint = model
    eos = checkpoint.config.ids.codec_eos
    healthy = make_spec(model, "Hello world, this is a test.", "interleaved", DEFAULT, 5)
    broken = make_spec(model, "Broken numbers.", "prefill", DEFAULT, 6)
    broken = replace(broken, prefill=broken.prefill.clone())
    broken.prefill[2] = float("nan")
    backend = GraphedBackend(talker, max_streams=2, max_seq_len=96)
    good, bad = backend.open([healthy, broken])
    out = backend.step([good, bad])
    assert set(out.failed) == {1} and "cannot be sampled" in out.failed[1]
    assert 0 <= out.codes[1].min() and out.codes[1].max() < checkpoint.config.talker.vocab_size
    got = [out.codes[0]]
    backend.close(bad)
    backend.close(bad)  # idempotent
    again = make_spec(model, "Broken numbers.", "prefill", DEFAULT, 6)  # the same slot, now with finite rows
    fresh = backend.open([again])[0]
    assert fresh.slot == bad.slot
    fresh_codes = []
    for _ in range(FRAMES - 1):
        out = backend.step([fresh, good])
        assert out.failed == {}
        fresh_codes.append(out.codes[0])
        got.append(out.codes[1])
    assert_same_codes(got, reference_codes(talker, healthy, FRAMES), eos)
    assert_same_codes(fresh_codes, reference_codes(talker, again, FRAMES - 1), eos)


def test_streams_that_cannot_step_fail_alone_and_bad_opens_are_refused(model):
    talker, checkpoint = model
    spec = make_spec(model, "Hi.", "prefill", DEFAULT, 1, frames=4)
    max_seq_len = len(spec.prefill) + 6
    backend = GraphedBackend(talker, max_streams=3, max_seq_len=max_seq_len)
    with pytest.raises(ValueError, match="exceeds the KV cache"):
        backend.open([replace(spec, prefill=torch.zeros(max_seq_len, spec.prefill.shape[1]))])
    with pytest.raises(ValueError, match="no free stream slot"):
        backend.open([spec] * 4)
    with pytest.raises(ValueError, match="prefill must be"):
        backend.open([replace(spec, prefill=spec.prefill[:0])])
    with pytest.raises(ValueError, match="warm_buckets"):
        GraphedBackend(talker, max_streams=2, max_seq_len=48, warm_buckets=(2,), use_graph=False)
    # More frames asked than the slot holds: bounded by it (the engine bounds its frames the same way).
    long = replace(spec, max_frames=10_000)
    short_table = replace(spec, rng=RandomStream(0, np.zeros((2, 16))))
    a, b, c = backend.open([spec, long, short_table])
    assert b.max_frames == 7
    with pytest.raises(ValueError, match="twice"):
        backend.step([a, a])
    got = []
    for _ in range(2):
        out = backend.step([a, b, c])
        assert out.failed == {}
        got.append(out.codes[1])
    out = backend.step([a, b, c])
    assert out.failed == {2: "random table has 2 frames, frame 2 requested"}
    got.append(out.codes[1])
    got.append(backend.step([a, b]).codes[1])
    out = backend.step([a, b])
    assert set(out.failed) == {0} and "all 4 frames" in out.failed[0]
    got.append(out.codes[1])
    while b.frames < b.max_frames:  # up to the last position of the cache
        out = backend.step([b])
        assert out.failed == {}
        got.append(out.codes[0])
    assert "all 7 frames" in backend.step([b]).failed[0]
    assert_same_codes(got, reference_codes(talker, long, 7), checkpoint.config.ids.codec_eos)
    backend.close(a)
    assert backend.step([a]).failed == {0: "stream is closed"}
    assert backend.step([]).codes.shape == (0, 16)


def test_timing_runs_every_bucket_without_moving_open_streams(model):
    talker, checkpoint = model
    spec = make_spec(model, "Hello world, this is a test.", "interleaved", DEFAULT, 5)
    backend = GraphedBackend(talker, max_streams=4, max_seq_len=32)
    h = backend.open([spec])[0]
    got = [backend.step([h]).codes[0] for _ in range(3)]
    ms = time_graphed_frames(backend, [1, 3], replays=2)
    assert set(ms) == {1, 3} and all(v > 0 for v in ms.values())
    time_graphed_frames(backend, [1], replays=34)  # more frames than max_seq_len: the scratch slot stays in range
    got += [backend.step([h]).codes[0] for _ in range(FRAMES - 3)]
    assert_same_codes(got, reference_codes(talker, spec, FRAMES), checkpoint.config.ids.codec_eos)


def test_the_frame_needs_no_host_values(model):
    """What CUDA graph capture needs, checked on the CPU: run under fake tensors, the frame function reads no device
    value on the host (.item(), a data-dependent shape) for any bucket."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    talker, _ = model
    backend = GraphedBackend(talker, max_streams=3, max_seq_len=48)
    with torch.inference_mode(), FakeTensorMode(allow_non_fake_inputs=True):
        for bucket in backend.buckets:
            backend._frame(torch.full((bucket,), backend.scratch), torch.zeros(bucket, 17, dtype=torch.long))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_cuda_graph_replay_equals_the_same_frames_run_eagerly(model, batch):
    """On the GPU the captured bucket computes exactly what the same frame function computes eagerly (same
    kernels, same shapes), for `batch` streams at different positions, greedy and sampled; and the graphed codes
    of frame 0 equal the reference's for the greedy streams (near-ties aside, fp32)."""
    talker_cpu, checkpoint = model
    talker = copy.deepcopy(talker_cpu).to("cuda")
    eos = checkpoint.config.ids.codec_eos
    texts = ["Hello world, this is a test.", "Short.", "Another sentence, rather longer than the first one."]
    all_params = [GREEDY, DEFAULT, WARPED, GREEDY_TALKER]
    specs = [make_spec((talker, checkpoint), texts[i % 3], ("prefill", "interleaved")[i % 2], all_params[i % 4], i,
                       frames=FRAMES + i) for i in range(batch)]
    # Staggered positions: stream i opens after the streams before it took i frames, then all step together.
    schedule = []
    for i in range(batch):
        schedule += [("open", [i]), ("step", list(range(i + 1)))]
    schedule += [("step", list(range(batch)))] * 4
    results = []
    for use_graph in (False, True):
        backend = GraphedBackend(talker, max_streams=8, max_seq_len=128, use_graph=use_graph)
        results.append(run_schedule(backend, specs, schedule, eos))
    for i in range(batch):
        np.testing.assert_array_equal(np.stack(results[1][i]), np.stack(results[0][i]), err_msg=f"stream {i}")
    with torch.inference_mode():
        assert results[1][0][0][0] == reference_codes(talker, specs[0], 1)[0, 0]
