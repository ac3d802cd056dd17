"""GPU tests of the decode megakernel (marker `gpu`; skipped without CUDA).

Building blocks (reductions, sampling, Philox) against sampling.py; whole frames against the reference backend;
10,000 consecutive launches; two instances in one process; a mis-sized launch that must error, not hang.
"""

import ctypes

import numpy as np
import pytest
import torch

from qwen_tts_megakernel.sampling import RandomStream, SamplingParams, choose, philox_uniforms

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from qwen_tts_megakernel.megakernel.backend import MegakernelBackend, MegakernelError  # noqa: E402
from qwen_tts_megakernel.megakernel.build import load_library  # noqa: E402
from qwen_tts_megakernel.megakernel.validate import (  # noqa: E402
    kernel_run, random_config, random_prompt, random_weights, reference_run, rel_err, uniform_table)


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


@pytest.mark.parametrize("n", [3072, 2048, 1000, 37])
def test_argmax_winner_at_every_position(lib, n):
    g = torch.Generator().manual_seed(n)
    base = torch.randn(n, n, generator=g)
    base[torch.arange(n), torch.arange(n)] = 100.0  # row i: the winner at position i
    assert (_sample_gpu(lib, base, mode=0) == np.arange(n)).all()


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


def test_philox_matches_python(lib):
    seed = 0x1234_5678_9ABC_DEF0
    frames = 5
    out = torch.zeros(frames * 16, dtype=torch.float64, device="cuda")
    assert lib.mk_test_philox(ctypes.c_uint64(seed), frames, out.data_ptr(), None) == 0
    torch.cuda.synchronize()
    want = np.concatenate([philox_uniforms(seed, k) for k in range(frames)])
    assert np.array_equal(out.cpu().numpy(), want)


# ---------------------------------------------------------------------------------------------------------------
# Whole frames on random full-size (0.6B) weights


@pytest.fixture(scope="module")
def model():
    config = random_config("0.6b")
    weights = random_weights(config, seed=0)
    return config, weights


@pytest.fixture(scope="module")
def backend(model):
    config, weights = model
    return MegakernelBackend(config, weights, device="cuda", max_seq_len=2048)


def test_frames_match_reference(model, backend):
    from qwen_tts_megakernel.model import Talker

    config, weights = model
    talker = Talker.from_state_dict(config, {k: v.float() for k, v in weights.items()}, device="cuda")
    prefill, text, pad = random_prompt(config, seed=5)
    frames = 12
    table = uniform_table(99, frames)
    params = SamplingParams()
    ref, rh, rl = reference_run(talker, prefill, text, pad, params, table, frames)
    forced = ref
    mk, mh, ml = kernel_run(backend, prefill, text, pad, params, table, len(ref), forced=forced)
    for k in range(len(ref)):
        assert rel_err(mh[k], rh[k]) < 1e-2, (k, rel_err(mh[k], rh[k]))
        assert rel_err(ml[k], rl[k]) < 1e-2, (k, rel_err(ml[k], rl[k]))
    assert (mk == ref).mean() >= 0.97, (mk, ref)


def test_philox_mode_equals_table_mode(model, backend):
    config, _ = model
    prefill, text, pad = random_prompt(config, seed=6)
    frames = 6
    a = backend.open_stream(prefill, text, pad, SamplingParams(), RandomStream(42))
    ca = [a.next_frame() for _ in range(frames)]
    a.close()
    b = backend.open_stream(prefill, text, pad, SamplingParams(), RandomStream(42, uniform_table(42, frames)))
    cb = [b.next_frame() for _ in range(frames)]
    b.close()
    assert np.array_equal(np.array(ca), np.array(cb))
    assert all(0 <= c[0] < 2048 or c[0] == config.ids.codec_eos for c in ca)
    assert all(((0 <= c[1:]) & (c[1:] < 2048)).all() for c in ca)


def test_perturbation_changes_codes(model, backend):
    config, _ = model
    prefill, text, pad = random_prompt(config, seed=7)
    table = uniform_table(5, 8)
    base, _, _ = kernel_run(backend, prefill, text, pad, SamplingParams(), table, 8)
    pert, _, _ = kernel_run(backend, prefill, text, pad, SamplingParams(), table, 8, perturb=0.05)
    assert not np.array_equal(base, pert)


def test_ten_thousand_launches(model, backend):
    """10,000 consecutive launches (streams re-opened at EOS or every 1,000 frames) without a hang or error."""
    config, _ = model
    prefill, text, pad = random_prompt(config, seed=8)
    total, seed = 0, 0
    while total < 10_000:
        st = backend.open_stream(prefill, text, pad, SamplingParams(), RandomStream(seed), max_frames=1000)
        seed += 1
        for _ in range(min(1000, 10_000 - total)):
            c = st.next_frame()
            total += 1
            assert ((0 <= c) & (c < 3072)).all()
            if c[0] == config.ids.codec_eos:
                break
        st.close()
    assert backend.error_code() == 0


def test_two_instances_in_one_process(model, backend):
    config, weights = model
    other = MegakernelBackend(config, weights, device="cuda", max_seq_len=256)
    prefill, text, pad = random_prompt(config, seed=9)
    s1 = backend.open_stream(prefill, text, pad, SamplingParams(), RandomStream(3))
    s2 = other.open_stream(prefill, text, pad, SamplingParams(), RandomStream(3))
    c1, c2 = [], []
    for _ in range(8):  # interleaved
        c1.append(s1.next_frame())
        c2.append(s2.next_frame())
    s1.close()
    s2.close()
    s1.close()  # closing twice is safe
    assert np.array_equal(np.array(c1), np.array(c2))


def test_mis_sized_launch_errors_instead_of_hanging(model):
    config, weights = model
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    with pytest.raises(MegakernelError):  # cooperative: refused up front
        MegakernelBackend(config, weights, device="cuda", max_seq_len=64, num_blocks=2 * sms)
    # Plain launch of one block more than fits: the resident blocks time out and the stream raises.
    be = MegakernelBackend(config, weights, device="cuda", max_seq_len=64, num_blocks=sms + 1, cooperative=False,
                           timeout_s=0.2)
    prefill, text, pad = random_prompt(config, seed=10)
    st = be.open_stream(prefill, text, pad, SamplingParams(), RandomStream(1), lookahead=0)
    with pytest.raises(MegakernelError):
        st.next_frame(timeout_s=20)
    torch.cuda.synchronize()
