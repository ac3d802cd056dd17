"""Tests of the decode megakernel. GPU tests (marker `gpu`) skip themselves without CUDA; the host-side logic (prefill
buckets, text rows of a running stream, the live-text protocol against a CPU model of the kernel's read-ahead)
runs on the CPU.

GPU: building blocks (reductions, sampling, Philox) against sampling.py; whole frames against the reference backend;
batch invariance with streams joining and leaving; a failing stream beside healthy ones; 10,000 consecutive
launches; two instances in one process; mis-sized launches that must raise, not hang; prefill graphs against the
eager prefill; reused slots; text appended while a stream runs.
"""

import ctypes

import numpy as np
import pytest
import torch

from qwen_tts_megakernel.backends.base import BackendError, StreamSpec
from qwen_tts_megakernel.backends.reference import ReferenceBackend
from qwen_tts_megakernel.engine import Synthesizer
from qwen_tts_megakernel.live import LiveUtterance
from qwen_tts_megakernel.megakernel.backend import (
    PAD,
    LaunchPlan,
    MegakernelBackend,
    MegakernelError,
    TextTrack,
    default_prefill_buckets,
    pick_bucket,
)
from qwen_tts_megakernel.megakernel.build import load_library
from qwen_tts_megakernel.tools.validate import (
    kernel_batch_run,
    kernel_run,
    random_config,
    random_prompt,
    random_weights,
    reference_run,
    rel_err,
    uniform_table,
)
from qwen_tts_megakernel.sampling import (
    RandomStream,
    SamplingParams,
    choose,
    philox_uniforms,
)

_needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def gpu(test):
    """Marker `gpu`, skipped without CUDA."""
    return pytest.mark.gpu(_needs_cuda(test))


@pytest.fixture(scope="module")
def lib():
    return load_library()


def _sample_gpu(lib, logits: torch.Tensor, mode: int, do_sample=True, temperature=0.9, top_k=50, top_p=1.0,
                u=None) -> np.ndarray:
    trials, n = logits.shape
    x = logits.float().cuda().contiguous()
    uu = torch.as_tensor(np.zeros(trials) if u is None else u, dtype=torch.float64).cuda()
    out = torch.zeros(trials, dtype=torch.int32, device="cuda")
    err = lib.mk_test_sample(x.data_ptr(), n, mode, int(do_sample), ctypes.c_float(temperature), top_k,
                             ctypes.c_double(top_p), uu.data_ptr(), trials, out.data_ptr(), None)
    assert err == 0
    torch.cuda.synchronize()
    return out.cpu().numpy()


@gpu
@pytest.mark.parametrize("n", [3072, 2048, 1000, 37])
def test_argmax_winner_at_every_position(lib, n):
    g = torch.Generator().manual_seed(n)
    base = torch.randn(n, n, generator=g)
    base[torch.arange(n), torch.arange(n)] = 100.0  # row i: the winner at position i
    assert (_sample_gpu(lib, base, mode=0) == np.arange(n)).all()


@gpu
def test_argmax_ties_take_lowest_index(lib):
    n = 3072
    rows = []
    g = torch.Generator().manual_seed(0)
    pairs = [(i, j) for i in range(0, n, 97) for j in (i + 1, i + 511, n - 1) if j < n and j != i]
    for i, j in pairs:
        r = torch.randn(n, generator=g)
        r[i] = r[j] = 50.0
        rows.append(r)
    got = _sample_gpu(lib, torch.stack(rows), mode=0)
    assert (got == np.array([min(i, j) for i, j in pairs])).all()
    allsame = torch.full((1, n), 3.0)
    assert _sample_gpu(lib, allsame, mode=0)[0] == 0


@gpu
@pytest.mark.parametrize("n,top_k,top_p", [(3072, 50, 1.0), (2048, 50, 1.0), (2048, 1, 1.0), (3072, 50, 0.8),
                                           (2048, 200, 1.0)])
def test_sampling_matches_python(lib, n, top_k, top_p):
    g = torch.Generator().manual_seed(top_k + n)
    trials = 300
    logits = torch.randn(trials, n, generator=g) * 3
    # Ties: copies of the 10th-largest value (ties at the top-k boundary are kept) and a few -inf entries.
    for t in range(0, trials, 3):
        v = logits[t].topk(10).values[-1]
        logits[t, torch.randint(0, n, (5,), generator=g)] = v
        logits[t, torch.randint(0, n, (7,), generator=g)] = float("-inf")
    u = np.array(philox_uniforms(123, 0, trials)) if trials <= 16 else np.random.default_rng(0).random(trials)
    got = _sample_gpu(lib, logits, mode=1, top_k=top_k, top_p=top_p, u=u)
    want = np.array([choose(logits[t], True, 0.9, top_k, top_p, float(u[t])) for t in range(trials)])
    agree = (got == want).mean()
    assert agree >= (0.99 if top_p < 1.0 else 1.0), (agree, np.nonzero(got != want)[0][:10])


@gpu
def test_more_ties_at_the_top_k_cut_than_candidates_is_deterministic(lib):
    """300 scores tied at the top: the candidates are the 256 lowest ids, the same in every trial."""
    n, trials = 3072, 64
    logits = torch.randn(trials, n, generator=torch.Generator().manual_seed(3))
    tied = torch.randperm(n, generator=torch.Generator().manual_seed(4))[:300]
    logits[:, tied] = 10.0
    u = np.random.default_rng(1).random(trials)
    got = _sample_gpu(lib, logits, mode=1, top_k=50, temperature=1.0, u=u)
    kept = np.sort(tied.numpy())[:256]
    want = kept[np.minimum((u * 256).astype(int), 255)]  # equal weights: the draw picks rank floor(u * 256)
    assert (got == want).all(), (got[:8], want[:8])


@gpu
def test_philox_matches_python(lib):
    seed = 0x1234_5678_9ABC_DEF0
    frames = 5
    out = torch.zeros(frames * 16, dtype=torch.float64, device="cuda")
    assert lib.mk_test_philox(ctypes.c_uint64(seed), frames, out.data_ptr(), None) == 0
    torch.cuda.synchronize()
    want = np.concatenate([philox_uniforms(seed, k) for k in range(frames)])
    assert np.array_equal(out.cpu().numpy(), want)


# ---------------------------------------------------------------------------------------------------------------
# Whole frames on random full-size (0.6B) weights, through the backend contract (open / step / close)


@pytest.fixture(scope="module")
def model():
    config = random_config("0.6b")
    weights = random_weights(config, seed=0)
    return config, weights


@pytest.fixture(scope="module")
def backend(model):
    config, weights = model
    return MegakernelBackend(config, weights, device="cuda", max_streams=8, max_seq_len=2048)


def _spec(prompt, seed, frames, table=None, **kw):
    prefill, text, pad = prompt
    return StreamSpec(prefill=prefill, text_rows=text, pad_row=pad, params=SamplingParams(),
                      rng=RandomStream(seed, table), max_frames=frames, **kw)


def _codes(be, prompt, seed, frames):
    return kernel_batch_run(be, [_spec(prompt, seed, frames)], frames, debug=False)[0][0]


@gpu
def test_frames_match_reference(model, backend):
    from qwen_tts_megakernel.model import Talker

    config, weights = model
    talker = Talker.from_state_dict(config, {k: v.float() for k, v in weights.items()}, device="cuda")
    prefill, text, pad = random_prompt(config, seed=5)
    frames = 12
    table = uniform_table(99, frames)
    params = SamplingParams()
    ref, rh, rl = reference_run(talker, prefill, text, pad, params, table, frames)
    mk, mh, ml = kernel_run(backend, prefill, text, pad, params, table, len(ref), forced=ref)
    for k in range(len(ref)):
        assert rel_err(mh[k], rh[k]) < 1e-2, (k, rel_err(mh[k], rh[k]))
        assert rel_err(ml[k], rl[k]) < 1e-2, (k, rel_err(ml[k], rl[k]))
    assert (mk == ref).mean() >= 0.97, (mk, ref)


@gpu
def test_philox_mode_equals_table_mode(model, backend):
    config, _ = model
    prompt = random_prompt(config, seed=6)
    frames = 6
    ca = _codes(backend, prompt, 42, frames)
    cb = kernel_batch_run(backend, [_spec(prompt, 42, frames, uniform_table(42, frames))], frames, debug=False)[0][0]
    assert np.array_equal(ca, cb)
    assert all(0 <= c[0] < 2048 or c[0] == config.ids.codec_eos for c in ca)
    assert all(((0 <= c[1:]) & (c[1:] < 2048)).all() for c in ca)


@gpu
def test_a_stream_beside_others_gets_its_solo_codes(model, backend):
    """Batch invariance: streams at different positions, joining and leaving, get the codes they get alone."""
    config, _ = model
    prompts = [random_prompt(config, n_prefill=n, n_text=4, seed=20 + n) for n in (12, 70, 300, 33, 130)]
    frames = 8
    solo = [_codes(backend, p, 100 + i, frames) for i, p in enumerate(prompts)]
    got = kernel_batch_run(backend, [_spec(p, 100 + i, frames) for i, p in enumerate(prompts)], frames, debug=False)
    for i in range(len(prompts)):
        assert np.array_equal(got[i][0], solo[i]), i
    # Join and leave: stream 0 alone for 3 frames, then streams 1..3 join; stream 1 leaves after 2 frames.
    hs = backend.open([_spec(p, 100 + i, frames) for i, p in enumerate(prompts[:4])])
    out = {i: [] for i in range(4)}
    plan = [[0], [0], [0], [0, 1, 2, 3], [0, 1, 2, 3], [0, 2, 3], [0, 2, 3], [0, 2, 3]]
    for live in plan:
        o = backend.step([hs[i] for i in live])
        for row, i in enumerate(live):
            out[i].append(o.codes[row])
    for h in hs:
        backend.close(h)
    for i in range(4):
        assert np.array_equal(np.array(out[i]), solo[i][: len(out[i])]), i


@gpu
def test_a_failing_stream_does_not_disturb_the_others(model, backend):
    config, _ = model
    prompts = [random_prompt(config, n_prefill=n, seed=40 + n) for n in (12, 50)]
    frames = 4
    want = _codes(backend, prompts[1], 7, frames)
    hs = backend.open([_spec(prompts[0], 6, frames), _spec(prompts[1], 7, frames)])
    backend.slot_x_in[hs[0].slot].fill_(float("nan"))  # stream 0's next input is poisoned
    o = backend.step(hs)
    assert list(o.failed) == [0] and "non-finite" in o.failed[0]
    backend.close(hs[0])
    got = [o.codes[1]] + [backend.step([hs[1]]).codes[0] for _ in range(frames - 1)]
    backend.close(hs[1])
    assert np.array_equal(np.array(got), want)
    assert backend.error_code() == 0


@gpu
def test_perturbation_changes_codes(model, backend):
    config, _ = model
    prefill, text, pad = random_prompt(config, seed=7)
    table = uniform_table(5, 8)
    base, _, _ = kernel_run(backend, prefill, text, pad, SamplingParams(), table, 8)
    pert, _, _ = kernel_run(backend, prefill, text, pad, SamplingParams(), table, 8, perturb=0.05)
    assert not np.array_equal(base, pert)


@gpu
def test_ten_thousand_launches(model, backend):
    """10,000 consecutive launches with streams joining and leaving (1..8 per launch) without a hang or error."""
    config, _ = model
    rng = np.random.default_rng(0)
    prompts = [random_prompt(config, n_prefill=int(n), seed=int(n)) for n in rng.integers(2, 200, 8)]
    live, seed, launches = [], 0, 0
    while launches < 10_000:
        while len(live) < 8 and rng.random() < 0.5:
            live += backend.open([_spec(prompts[seed % 8], seed, int(rng.integers(1, 400)))])
            seed += 1
        if not live:
            continue
        o = backend.step(live)
        launches += 1
        assert not o.failed and ((0 <= o.codes) & (o.codes < 3072)).all()
        for h in list(live):
            if h.ended or h.frame >= h.limit or rng.random() < 0.01:
                backend.close(h)
                live.remove(h)
    for h in live:
        backend.close(h)
    assert backend.error_code() == 0


@gpu
def test_two_instances_in_one_process(model, backend):
    config, weights = model
    other = MegakernelBackend(config, weights, device="cuda", max_streams=2, max_seq_len=256)
    prompt = random_prompt(config, seed=9)
    h1, h2 = backend.open([_spec(prompt, 3, 8)])[0], other.open([_spec(prompt, 3, 8)])[0]
    c1, c2 = [], []
    for _ in range(8):  # interleaved
        c1.append(backend.step([h1]).codes[0])
        c2.append(other.step([h2]).codes[0])
    backend.close(h1)
    other.close(h2)
    backend.close(h1)  # closing twice is safe
    assert np.array_equal(np.array(c1), np.array(c2))


@gpu
def test_mis_sized_launch_errors_instead_of_hanging(model, backend):
    config, weights = model
    prompt = random_prompt(config, seed=10)
    with pytest.raises(ValueError):
        backend.step([])
    hs = backend.open([_spec(prompt, 1, 4)])
    with pytest.raises(ValueError):
        backend.step([hs[0], hs[0]])
    backend.close(hs[0])
    with pytest.raises(ValueError):
        backend.open([_spec(prompt, 1, 4)] * 9)  # more streams than slots
    with pytest.raises(ValueError):
        backend.open([_spec(prompt, 1, 4000)])  # prompt + frames beyond max_seq_len
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    with pytest.raises(MegakernelError):  # cooperative: refused up front
        MegakernelBackend(config, weights, device="cuda", max_seq_len=64, num_blocks=2 * sms)
    # Plain launch of one block more than fits: the resident blocks time out and the step raises.
    be = MegakernelBackend(config, weights, device="cuda", max_streams=1, max_seq_len=64, num_blocks=sms + 1,
                           cooperative=False, timeout_s=0.2, prefill_graphs=False)
    hs = be.open([_spec(prompt, 1, 4)])
    with pytest.raises(BackendError):
        be.step(hs, timeout_s=20)
    torch.cuda.synchronize()


@gpu
def test_prefill_graphs_match_eager_prefill(model, backend):
    from qwen_tts_megakernel.megakernel.backend import _StackViews

    config, _ = model
    be = backend
    stats = be.prefill_graph_stats
    print("prefill graphs:", stats)
    assert "error" not in stats and stats["buckets"] == default_prefill_buckets(be.max_seq - 1)
    slot = be.max_streams - 1
    g = torch.Generator().manual_seed(0)
    # bucket edges (16, 24, ..., 1024); 1030 has no bucket (eager both times)
    for n in (1, 15, 16, 17, 24, 25, 27, 64, 100, 263, 1024, 1030):
        rows = (0.05 * torch.randn(n, config.talker.hidden_size, generator=g)).cuda()
        be.prefill_kv(slot, rows, graphs=False)
        torch.cuda.synchronize()
        want = be.t_kv[slot, :, :, :, :n].clone()
        be.t_kv[slot].fill_(float("nan"))  # the graph path must write every position < n
        be.prefill_kv(slot, rows)
        torch.cuda.synchronize()
        got = be.t_kv[slot, :, :, :, :n]
        assert torch.isfinite(got).all(), n
        for layer in range(config.talker.num_hidden_layers):
            for kv in range(2):
                err = rel_err(got[layer, kv], want[layer, kv])
                assert err < 1e-5, (n, layer, kv, err)
    views = be.t_views
    try:
        be.t_views = _StackViews(be.t_blob.float(), be.t_norms, config.talker)
        be.prefill_kv(slot, rows, graphs=False)
        torch.cuda.synchronize()
        assert rel_err(be.t_kv[slot, :, :, :, :len(rows)], want) < 1e-5
    finally:
        be.t_views = views
    be.t_kv[slot].zero_()


@gpu
def test_reused_slot_gives_the_codes_of_a_fresh_one(model, backend):
    """One slot, streams opened and closed back to back (after EOS, closed early, over a cache full of NaN): every
    stream's codes equal those of the same stream on another backend."""
    config, weights = model
    one = MegakernelBackend(config, weights, device="cuda", max_streams=1, max_seq_len=512, prefill_graphs=False)
    pa = random_prompt(config, n_prefill=40, n_text=10, seed=11)
    pb = random_prompt(config, n_prefill=12, n_text=2, seed=12)
    want_a, want_b = _codes(backend, pa, 1, 12), _codes(backend, pb, 2, 12)
    assert np.array_equal(_codes(one, pa, 1, 12), want_a)
    forced = np.zeros((6, 16), dtype=np.int64)
    forced[3, 0] = config.ids.codec_eos  # EOS fed back at frame 3
    h = one.open([_spec(pb, 2, 6)], forced=[forced])[0]
    for _ in range(4):
        one.step([h])
    one.close(h)
    assert np.array_equal(_codes(one, pb, 2, 12), want_b)
    h = one.open([_spec(pa, 3, 12)])[0]
    one.step([h])
    one.close(h)
    assert np.array_equal(_codes(one, pa, 1, 12), want_a)
    torch.cuda.synchronize()
    one.t_kv.fill_(float("nan"))  # cache positions past the prefill are written before they are read
    assert np.array_equal(_codes(one, pb, 2, 12), want_b)
    assert np.array_equal(_codes(one, pa, 1, 12), want_a)
    assert one.error_code() == 0


@gpu
def test_appended_text_rows_give_the_codes_of_rows_given_at_open(model, backend):
    config, _ = model
    prefill, text, pad = random_prompt(config, n_prefill=12, n_text=12, seed=13)
    T, frames = len(text), 20

    def run(n_open, final, before):
        """`before[k]`: called with the handle before frame k's step."""
        h = backend.open([_spec((prefill, text[:n_open], pad), 4, frames, text_final=final)])[0]
        out = []
        for k in range(frames):
            if k in before:
                before[k](h)
            out.append(backend.step([h]).codes[0])
        backend.close(h)
        return np.array(out)

    want = run(T, True, {})
    # Late: row k-1 arrives just before frame k (every launch first adds a zero row; the row is added after).
    late = {k: (lambda h, k=k: backend.append_text(h, text[k - 1:k])) for k in range(1, T + 1)}
    late[T + 1] = lambda h: backend.end_text(h)

    def too_early(h):  # frame 3 needs row 2, which is not there yet
        with pytest.raises(ValueError):
            backend.step([h])
        backend.append_text(h, text[2:3])

    late[3] = too_early
    assert np.array_equal(run(0, False, late), want)
    # Bursts, then the end of the text.
    bursts = {2: lambda h: backend.append_text(h, text[3:8]),
              6: lambda h: (backend.append_text(h, text[8:]), backend.end_text(h))}
    assert np.array_equal(run(3, False, bursts), want)
    # The text ends after launches that did not know it yet: they get the pad row.
    assert np.array_equal(run(5, False, {6: lambda h: backend.end_text(h)}), run(5, True, {}))


# ---------------------------------------------------------------------------------------------------------------
# Host-side logic (CPU)


def test_open_and_step_reject_bad_input_on_the_host():
    """Spec and step validation happen before anything touches the GPU, with the field named."""
    from types import SimpleNamespace

    from qwen_tts_megakernel.megakernel.backend import MegakernelStream, MkLaunch

    config = random_config("0.6b")
    be = SimpleNamespace(config=config, max_seq=64, max_streams=2, text_capacity=64, lay={"CAND_MAX": 256},
                         _launch=MkLaunch())
    prefill, text, pad = random_prompt(config, n_prefill=10)
    ok = StreamSpec(prefill=prefill, text_rows=text, pad_row=pad, params=SamplingParams(), rng=RandomStream(0),
                    max_frames=8)
    assert MegakernelBackend._check_spec(be, 0, ok) == 10
    bad = [(dict(max_frames=100), "max_seq_len"), (dict(prefill=prefill[:, :5]), "prefill")]
    for top_k in (0, 300):  # top-k past what the kernel keeps (256) cannot even be asked for
        with pytest.raises(ValueError, match="top_k"):
            SamplingParams(top_k=top_k)
    for change, field in bad:
        spec = StreamSpec(**{**ok.__dict__, **change})
        with pytest.raises(ValueError, match=field):
            MegakernelBackend._check_spec(be, 3, spec)

    def handle(slot, **kw):
        return MegakernelStream(**{"slot": slot, "prompt_rows": 10, "limit": 8, "eos": config.ids.codec_eos,
                                   "track": TextTrack(4), **kw})

    h0, h1 = handle(0), handle(1)
    L = MegakernelBackend._entries(be, [h0, h1])
    assert (L.n, L.e[1].slot, L.e[1].pos, L.e[1].n_text) == (2, 1, 9, 4)
    for streams, msg in (([], "1..2"), ([h0, h0], "twice"), ([h0, h1, handle(2)], "1..2"),
                         ([handle(0, closed=True)], "not an open"), ([handle(0, ended=True)], "EOS"),
                         ([handle(0, frame=8)], "limit")):
        with pytest.raises(ValueError, match=msg):
            MegakernelBackend._entries(be, streams)
    live = handle(0, track=TextTrack(0, final=False))
    MegakernelBackend._entries(be, [live])  # frame 0 needs no text row
    live.frame = 1
    with pytest.raises(ValueError, match="text row 0"):
        MegakernelBackend._entries(be, [live])


def test_prefill_buckets():
    assert default_prefill_buckets(4095) == [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024]
    assert default_prefill_buckets(63) == [16, 24, 32, 48, 63]
    assert default_prefill_buckets(48) == [16, 24, 32, 48]
    assert default_prefill_buckets(10) == [10]
    buckets = [16, 32, 63]
    assert [pick_bucket(n, buckets) for n in (1, 16, 17, 32, 33, 63, 64)] == [16, 16, 32, 32, 63, 63, None]
    assert pick_bucket(5, []) is None


def test_text_track_never_reads_a_missing_row():
    whole = TextTrack(3, final=True)
    assert all(whole.plan(k) == LaunchPlan(None, False) for k in range(6))
    tr = TextTrack(0, final=False)
    steps = []

    def launch(k):
        plan = tr.plan(k)
        if plan is not None:
            tr.launched(k, plan)
        steps.append(plan)

    launch(0)                 # row 0 not here: zero text row, added before launch 1
    launch(1)                 # launch 1 needs row 0: not yet
    tr.append(1)
    launch(1)                 # row 0 added; row 1 not here
    tr.append(3)
    launch(2)                 # row 1 added; row 2 here
    launch(3)                 # row 3 here
    launch(4)                 # past the rows, text still open: zero row
    tr.end()
    launch(5)                 # the text ended: the pad row is added; pad from now on
    launch(6)
    assert steps == [LaunchPlan(None, True), None, LaunchPlan(0, True), LaunchPlan(1, False),
                     LaunchPlan(None, False), LaunchPlan(None, True), LaunchPlan(PAD, False),
                     LaunchPlan(None, False)]
    with pytest.raises(RuntimeError):
        tr.append(1)


def test_prefill_math_equals_the_reference_talker(tiny_synth):
    """The prefill function (eager and captured alike) on the CPU: its K/V equal the reference talker's cache for the
    same rows, and zero rows padded after the real ones (a graph bucket) leave the real rows' K/V unchanged."""
    from types import SimpleNamespace

    from qwen_tts_megakernel.megakernel.backend import (
        _pack_stack,
        _StackViews,
        prefill_rope,
        rope_table,
    )
    from qwen_tts_megakernel.model import Talker

    config = tiny_synth.config
    t = config.talker
    weights = {k: v.to(torch.bfloat16).float() for k, v in tiny_synth.checkpoint.weights.items()}  # as packed
    blob, norms = _pack_stack(weights, "talker.model", t, "cpu")
    cos, sin = prefill_rope(rope_table(64, t.head_dim, t.rope_theta, "cpu"))
    be = SimpleNamespace(config=config, t_views=_StackViews(blob, norms.float(), t), _rope_cos=cos, _rope_sin=sin)
    talker = Talker.from_state_dict(config, weights, dtype=torch.float32)
    n, bucket = 11, 16
    rows = 0.05 * torch.randn(n, t.hidden_size, generator=torch.Generator().manual_seed(0))
    kv = torch.full((t.num_hidden_layers, 2, t.num_key_value_heads, 20, t.head_dim), float("nan"))
    MegakernelBackend._prefill_layers(be, rows, kv)
    cache = talker.new_cache(20)
    with torch.inference_mode():
        talker.forward_rows(rows, cache)
    assert rel_err(kv[:, 0, :, :n], cache.k[:, :, :n]) < 1e-5
    assert rel_err(kv[:, 1, :, :n], cache.v[:, :, :n]) < 1e-5
    assert torch.isnan(kv[:, :, :, n:]).all()  # nothing past the rows is written
    padded = torch.zeros(t.num_hidden_layers, 2, t.num_key_value_heads, bucket, t.head_dim)
    MegakernelBackend._prefill_layers(be, torch.cat([rows, torch.zeros(bucket - n, t.hidden_size)]), padded)
    assert torch.isfinite(padded).all()
    assert rel_err(padded[:, :, :, :n], kv[:, :, :, :n]) < 1e-6


class _ReadAheadBackend(ReferenceBackend):
    """The megakernel's text protocol on the reference math (CPU): step k computes frame k and at once builds frame
    k+1's input, F(frame k) + text row k, as TextTrack plans it (a row that has not arrived is added later)."""

    def open(self, specs):
        streams = super().open(specs)
        for stream, spec in zip(streams, specs):
            stream.track = TextTrack(len(spec.text_rows), final=spec.text_final)
            stream.x_next = None
        return streams

    def talker_input(self, stream):
        return stream.spec.prefill[-1:] if stream.frame_index == 0 else stream.x_next.unsqueeze(0)

    def append_text(self, stream, rows):
        stream.track.append(len(rows))
        super().append_text(stream, rows)

    def end_text(self, stream):
        stream.track.end()

    def frame(self, stream):
        j, pad = stream.frame_index, stream.spec.pad_row
        plan = stream.track.plan(j)
        if plan is None:
            raise RuntimeError(f"frame {j} needs a text row that has not arrived")
        if plan.add_row is not None:
            stream.x_next = stream.x_next + (pad if plan.add_row == PAD else stream.text_rows[plan.add_row])
        codes = super().frame(stream)
        text = (torch.zeros_like(pad) if plan.zero_text
                else stream.text_rows[j] if j < stream.track.n_rows else pad)
        stream.x_next = self.talker.frame_embedding(codes.tolist()) + text
        stream.track.launched(j, plan)
        return codes


def _drive(synth, u, pieces):
    """Feed a LiveUtterance job on `synth`'s engine piece by piece, then flush; its frames and stop reason."""
    events = synth.submit(u, audio=False, frames=True)
    for piece in pieces:
        u.add_text(piece)
        events.job.wake()
    u.request_flush()
    events.job.wake()
    frames = []
    while True:
        kind, payload = events.next()
        if kind == "frame":
            frames.append(payload)
        elif kind == "error":
            raise AssertionError(payload)
        elif kind == "done":
            return frames, payload.stop_reason


@pytest.fixture(scope="module")
def tiny_synth(tmp_path_factory):
    from qwen_tts_megakernel.synthetic import write_tiny_model

    path = tmp_path_factory.mktemp("tiny_mk")
    write_tiny_model(path, "0.6b", "custom_voice", seed=0)
    return Synthesizer.from_pretrained(str(path), device="cpu")


def test_live_text_protocol_of_a_read_ahead_backend(tiny_synth):
    """live.py through the engine with a backend that reads text rows a frame early (the megakernel's protocol,
    modelled on the CPU): the same codes as the whole text in the interleaved layout, however the text arrives."""
    synth = tiny_synth
    text = "Hi there, you."
    model = Synthesizer(synth.checkpoint, _ReadAheadBackend(synth.talker), synth.codec, synth.embedder, synth.talker)
    want = synth.generate_codes(text, seed=7, max_new_tokens=18, text_layout="interleaved")
    assert want.num_text_tokens + 3 < len(want.codes)  # the text ends (tts_eos, then pad rows) before the last frame
    try:
        for pieces in ([text], [w + " " for w in text.split(" ")[:-1]] + [text.split(" ")[-1]], list(text)):
            frames, stop = _drive(model, LiveUtterance(model, seed=7, max_new_tokens=18), pieces)
            assert stop == want.stop_reason
            assert np.array_equal(np.stack(frames), want.codes), pieces[:2]
    finally:
        model.close()