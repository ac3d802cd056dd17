"""The fused codec path (codec/fused.py, codec/kernels.py): each Triton kernel against the PyTorch ops it replaces, at
fp32 and at bf16/fp16, and the fused decoder against the plain one (whole utterance, streaming, fixed-shape steps).
Off CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set here before they are compiled); every test
skips when triton is not installed, except those of the plain fallback."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qwen_tts_megakernel.codec import DecoderState, StreamingCodec, fused
from qwen_tts_megakernel.layers import RMSNorm, apply_rope
from test_codec_batch import SMALL_WINDOW, random_codes, run_streams, tiny_codec

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
try:  # now: triton and the kernels are made interpreted or compiled when imported, whatever a test sets later
    from qwen_tts_megakernel.codec import kernels as KERNELS
except ImportError:  # no triton
    KERNELS = None


def skip_unless_kernels_run() -> None:
    if KERNELS is None:
        pytest.skip("needs triton")
    from triton.runtime.interpreter import InterpretedFunction

    if DEVICE == "cpu" and not isinstance(KERNELS._silu_mul_kernel, InterpretedFunction):
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set: run this file on its own")


@pytest.fixture(scope="module")
def kernels():
    skip_unless_kernels_run()
    return KERNELS


TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}  # max abs error, values of order 1
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, slack: float = 1.0) -> None:
    """Within the dtype's rounding, relative to the largest value (at least 1)."""
    assert got.dtype == dtype and got.shape == want.shape
    err = (got.float() - want.float()).abs().max()
    assert err <= slack * TOL[dtype] * want.float().abs().max().clamp(min=1), err


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device=DEVICE, dtype=dtype)


def snr_db(ref: np.ndarray, x: np.ndarray) -> float:
    noise = np.sum((ref - x).astype(np.float64) ** 2)
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / noise))


# --- kernels against the PyTorch ops ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("context,with_tail,snake", [(6, True, True), (18, False, True), (54, True, True),
                                                     (0, False, True), (6, True, False)])
def test_pad_snake_is_tail_then_snakebeta_cast(kernels, dtype, context, with_tail, snake):
    B, C, T = 3, 5, 20  # T < context too: the tail then outlives the chunk
    x = randn(B, C, T, seed=1) * 3
    alpha, inv_beta = randn(C, seed=2).exp(), 1 / (randn(C, seed=3).exp() + 1e-9)
    tail = randn(B, C, context, seed=4) if with_tail else None
    act = x + torch.sin(x * alpha[:, None]) ** 2 * inv_beta[:, None] if snake else x
    want = torch.cat([tail if with_tail else x.new_zeros(B, C, context), act], dim=-1).to(dtype)
    got = kernels.pad_snake(x, tail, context, alpha if snake else None, inv_beta if snake else None, dtype)
    assert_close(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("keep_sum", [True, False])
def test_pad_snake_forms_a_residual_sum_first(kernels, dtype, keep_sum):
    """x (fp32) + y (the convolution's dtype), as a residual unit's output: the sum exactly as torch forms it."""
    x, y = randn(2, 4, 30, seed=15), randn(2, 4, 30, dtype=dtype, seed=16)
    alpha, inv_beta, tail = randn(4, seed=17).exp(), randn(4, seed=18).exp(), randn(2, 4, 12, seed=19)
    total, got = kernels.pad_snake(x, tail, 12, alpha, inv_beta, dtype, residual=y, keep_sum=keep_sum)
    s = x + y
    if keep_sum:
        assert total.dtype == torch.float32 and torch.equal(total, s)
    else:
        assert total is None
    want = torch.cat([tail, s + torch.sin(s * alpha[:, None]) ** 2 * inv_beta[:, None]], dim=-1).to(dtype)
    assert_close(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("context,T", [(54, 20), (6, 40), (18, 18), (54, 1500)])  # 1500: several programs a row
def test_pad_snake_moves_the_tail_on_in_place(kernels, dtype, context, T):
    """The tail slot (a strided view of a state store) becomes the padded input's last columns, as the convolution
    reads them (cast to its dtype); the padded input itself is made from the old tail."""
    store = randn(3, 4 * context + 5, seed=20)
    tail = store[:, 5:].view(3, 4, context)
    old = tail.clone()
    x, y = randn(3, 4, T, seed=21), randn(3, 4, T, seed=22)
    alpha, inv_beta = randn(4, seed=23).exp(), randn(4, seed=24).exp()
    total, got = kernels.pad_snake(x, tail, context, alpha, inv_beta, dtype, residual=y, update_tail=True)
    s = x + y
    want = torch.cat([old, s + torch.sin(s * alpha[:, None]) ** 2 * inv_beta[:, None]], dim=-1).to(dtype)
    assert torch.equal(total, s)
    assert_close(got, want, dtype)
    assert torch.equal(tail, got[..., -context:].float())
    assert torch.equal(store[:, :5], randn(3, 4 * context + 5, seed=20)[:, :5])  # nothing outside the slot


def test_pad_snake_reads_a_strided_tail_and_input(kernels):
    """A BatchState slot is a view with the row stride of the whole store; a transposed input is not contiguous."""
    store = randn(4, 100, seed=5)
    tail = store[:, 10:40].view(4, 5, 6)
    x = randn(4, 20, 5, seed=6).transpose(1, 2)
    got = kernels.pad_snake(x, tail, 6, None, None, torch.float32)
    assert torch.equal(got, torch.cat([tail, x], dim=-1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rmsnorm_is_scaled_residual_then_rmsnorm(kernels, dtype, with_residual):
    C = 48  # not a power of two: the masked tail of the block
    x, y, scale = randn(2, 7, C, dtype=dtype, seed=7), randn(2, 7, C, dtype=dtype, seed=8), randn(C, dtype=dtype)
    norm = RMSNorm(C, 1e-5).to(DEVICE, dtype)
    norm.weight.data = randn(C, dtype=dtype, seed=9)
    h_want = x + scale * y if with_residual else x
    h, normed = kernels.add_rmsnorm(x, y if with_residual else None, scale if with_residual else None, norm.weight,
                                    norm.eps)
    assert_close(h, h_want, dtype)
    assert_close(normed, norm(h_want), dtype, slack=2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,cached_frames,cos_rows", [(4, 2, 5, 3), (2, 2, 0, 1), (3, 1, 20, 1)])
def test_rope_qkv_splits_heads_ropes_and_appends_to_the_window(kernels, dtype, heads, kv_heads, cached_frames,
                                                                cos_rows):
    B, T, D = 3, 4, 16
    qkv = randn(B, T, (heads + 2 * kv_heads) * D, dtype=dtype, seed=10)
    cos, sin = randn(cos_rows, 1, T, D, dtype=dtype, seed=11), randn(cos_rows, 1, T, D, dtype=dtype, seed=12)
    cached = None
    if cached_frames:  # views into a wider buffer, as a BatchState's slots are
        store = randn(B, 2 * kv_heads * cached_frames * D + 8, dtype=dtype, seed=13)
        n = kv_heads * cached_frames * D
        cached = (store[:, :n].view(B, kv_heads, cached_frames, D), store[:, n : 2 * n].view(B, kv_heads,
                                                                                             cached_frames, D))
    q, k, v = qkv.split([heads * D, kv_heads * D, kv_heads * D], dim=-1)
    q, k, v = (t.reshape(B, T, -1, D).transpose(1, 2) for t in (q, k, v))
    q_want, k_want = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if cached is not None:
        k_want, v = torch.cat([cached[0], k_want], dim=2), torch.cat([cached[1], v], dim=2)
    got = kernels.rope_qkv(qkv, cached, cos, sin, heads, kv_heads, D)
    for g, w in zip(got, (q_want, k_want, v)):
        assert_close(g, w, dtype, slack=2)


@pytest.mark.parametrize("T", [1, 4, 8])
def test_rope_qkv_moves_the_cache_on_in_place(kernels, T):
    """A full window (a BatchState's): the cache slots become the window's last P rows, k after RoPE."""
    B, H, HKV, D, P = 2, 4, 2, 16, 11
    qkv = randn(B, T, (H + 2 * HKV) * D, seed=25)
    cos, sin = randn(B, 1, T, D, seed=26), randn(B, 1, T, D, seed=27)
    store = randn(B, 2 * HKV * P * D, seed=28)
    n = HKV * P * D
    cached = (store[:, :n].view(B, HKV, P, D), store[:, n:].view(B, HKV, P, D))
    want = kernels.rope_qkv(qkv, tuple(c.clone() for c in cached), cos, sin, H, HKV, D)
    got = kernels.rope_qkv(qkv, cached, cos, sin, H, HKV, D, update_cache=True)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert torch.equal(cached[0], want[1][:, :, -P:]) and torch.equal(cached[1], want[2][:, :, -P:])


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_is_swiglu_gate(kernels, dtype):
    gu = randn(2, 5, 2 * 40, dtype=dtype, seed=14) * 3
    want = F.silu(gu[..., :40]) * gu[..., 40:]
    assert_close(kernels.silu_mul(gu), want, dtype, slack=2)


# --- the fused decoder against the plain one ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def decoder():
    skip_unless_kernels_run()
    return tiny_codec(SMALL_WINDOW, DEVICE)


def test_fused_decoder_equals_the_plain_one_whole_and_streamed(decoder):
    model = fused.fuse(decoder)
    codes = torch.as_tensor(random_codes(8, seed=1), device=DEVICE)[None]
    with torch.inference_mode():
        want = decoder(codes, DecoderState())
        whole = model(codes, DecoderState())
        state = DecoderState()  # chunks crossing the 6-frame window: the carried state means the same
        streamed = torch.cat([model(codes[:, a:b], state) for a, b in ((0, 1), (1, 7), (7, 8))], dim=-1)
    assert (whole - want).abs().max() <= 1e-5
    assert (streamed - want).abs().max() <= 1e-5
    assert decoder.pre_transformer.__class__.__name__ == "PreTransformer"  # the reference is not modified


@pytest.mark.parametrize("precision,min_snr", [("fp32", 80.0), ("bf16", 30.0)])
def test_fused_streaming_codec_matches_the_plain_one(decoder, precision, min_snr):
    """Fixed-shape steps (CUDA graphs on CUDA), streams joining at different times with different chunk sizes.
    fp32: the plain path's audio to float rounding. bf16: finite and within 30 dB of fp32 (the interpreter truncates
    to bf16 where CUDA rounds to nearest, so the 45 dB bound of the released shapes is checked on the GPU only)."""
    codes = [random_codes(n, seed=20 + i) for i, n in enumerate((9, 7, 2))]
    schedules, starts = [[1, 8], [4, 3], [1]], [0, 1, 3]
    reference, _ = run_streams(StreamingCodec(decoder, 4, use_graphs=True), codes, schedules, starts)
    codec = StreamingCodec(decoder, 4, precision=precision, use_graphs=True, fused=True)
    assert codec.fused
    got, _ = run_streams(codec, codes, schedules, starts)
    plain, _ = run_streams(StreamingCodec(decoder, 4, precision=precision, use_graphs=True), codes, schedules, starts)
    for g, p, r in zip(got, plain, reference):
        assert np.isfinite(g).all()
        assert snr_db(r, g) >= min(min_snr, snr_db(r, p) - (1.0 if precision == "fp32" else 8.0))
        if precision == "fp32":
            assert np.abs(g - r).max() <= 1e-5


# --- opting in ---------------------------------------------------------------------------------------------------


def test_fused_needs_triton_and_cuda(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    decoder = tiny_codec(SMALL_WINDOW)
    assert not fused.available("cpu")
    with pytest.raises(ValueError, match="fused=True needs triton"):
        StreamingCodec(decoder, 2, fused=True)
    monkeypatch.setenv(fused.ENV_FLAG, "1")  # asked for by default, not available: the plain path, no error
    assert fused.requested() and not StreamingCodec(decoder, 2).fused


def test_env_flag_picks_the_fused_path_where_available(decoder, monkeypatch):
    monkeypatch.setenv(fused.ENV_FLAG, "1")
    assert StreamingCodec(decoder, 2).fused == fused.available(DEVICE)
    monkeypatch.setenv(fused.ENV_FLAG, "0")
    assert not StreamingCodec(decoder, 2).fused


def test_the_codec_imports_and_runs_without_triton():
    script = ("import sys; sys.modules['triton'] = None\n"  # `import triton` fails, find_spec('triton') is None
              "from qwen_tts_megakernel.codec import StreamingCodec, fused\n"
              "from test_codec_batch import tiny_codec, random_codes\n"
              "c = StreamingCodec(tiny_codec(6), 2)\n"
              "assert not fused.available('cuda') and not c.fused\n"
              "s = c.open(); assert c.push([s], [random_codes(2, 0)])[0].shape == (3840,)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__)] + sys.path),
               QWEN_TTS_MK_CODEC_FUSED="1")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_codec_timing_reports_both_paths_and_their_snr(decoder, tmp_path):
    """The timing tool on the tiny codec: rows per path, the SNR of each path x precision against plain fp32."""
    import json

    from qwen_tts_megakernel.tools.codec_timing import main

    out = tmp_path / "codec-timing.json"
    assert main(["--tiny", "--device", DEVICE, "--runs", "1", "--batch", "1", "--frames", "1", "--precisions", "fp32",
                 "--modes", "eager", "--paths", "plain", "fused", "--snr-streams", "2", "--snr-frames", "3",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {r["path"] for r in result["rows"]} == {"plain", "fused"}
    assert result["snr_db"]["plain fp32"] == float("inf")  # the reference itself
    assert 80.0 <= result["snr_db"]["fused fp32"] < float("inf")
    assert set(result["kernels_per_step"]) == {"plain", "fused"}
    assert "fused fp32" in out.with_suffix(".md").read_text()


# --- GPU: captured graphs, and the released shapes' SNR ----------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
def test_fused_graph_replay_equals_the_plain_eager_path(no_tf32):
    pytest.importorskip("triton")
    decoder = tiny_codec(72, "cuda")
    codes = [random_codes(90, seed=s) for s in range(3)]
    schedules, starts = [[1, 2, 4, 8], [3, 5], [13]], [0, 1, 4]
    graphed = StreamingCodec(decoder, 4, fused=True)
    assert graphed.cuda_graphs and graphed.fused
    replayed, _ = run_streams(graphed, codes, schedules, starts)
    eager, _ = run_streams(StreamingCodec(decoder, 4, use_graphs=False), codes, schedules, starts)
    for r, e in zip(replayed, eager):
        assert np.abs(r - e).max() <= 1e-4
    assert all(step.graph is not None for step in graphed._steps.values())


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_fused_released_shapes_hold_45_db(no_tf32, precision):
    pytest.importorskip("triton")
    from qwen_tts_megakernel.tools.codec_timing import real_codec, snr_vs_reference

    decoder = real_codec(torch.device("cuda"))
    assert snr_vs_reference(decoder, precision, use_fused=True, streams=8, frames=24) >= 45.0
