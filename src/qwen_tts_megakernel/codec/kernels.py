"""Triton kernels of the fused codec path (codec/fused.py), each one pass over memory that the plain path spends
several kernels on, with a Python launcher that takes and returns torch tensors. Imported only where triton is
installed; every kernel computes in fp32 and stores in its output's dtype.

  * pad_snake:    [tail | SnakeBeta(x)] cast to the convolution's dtype, the input of a causal convolution, where
                  x may be a residual sum x + y still to be formed, the tail moved on in place (plain: add, mul, sin,
                  mul, addcmul, cat, cast, copy)
  * add_rmsnorm:  h = x + scale * y and RMSNorm(h), the transformer's residual sum and the next norm
                  (plain: mul, add, and the norm's pow, mean, add, rsqrt, mul, mul)
  * rope_qkv:     the fused QKV projection's output split into heads, RoPE on q and k, k and v appended to the
                  cached window, the cache moved on in place (plain: 3 transposes, 2 x (2 mul, neg, cat, add), 2 cat,
                  2 copies)
  * silu_mul:     silu(gate) * up from the fused gate/up projection (plain: silu, mul)

With TRITON_INTERPRET=1 the kernels run on CPU tensors (slowly): that is how CPU tests check them.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from triton.language.extra import libdevice

# On CUDA, SnakeBeta's sin is libdevice's sinf (what torch.sin runs), not a fast approximation; the interpreter has
# no libdevice and runs numpy's sin.
LIBDEVICE_SIN = os.environ.get("TRITON_INTERPRET") != "1"


@triton.jit
def _rounded(v, dtype: tl.constexpr):
    """v (fp32) as `dtype`, rounded to nearest even. (Triton's interpreter truncates to bfloat16 whatever it is told:
    on CPU a bf16 result has about twice the rounding error it has on CUDA.)"""
    if dtype != tl.float32:
        v = v.to(dtype, fp_downcast_rounding="rtne")
    return v


@triton.jit
def _snake_input(x_ptr, y_ptr, alpha_ptr, inv_beta_ptr, row, b, c, col, mask, T, sxb, sxc,
                 RESIDUAL: tl.constexpr, SNAKE: tl.constexpr, LIBDEVICE: tl.constexpr):
    """(x [+ y], SnakeBeta of it) at columns `col` of row (b, c) of x [B, C, T], fp32."""
    v = tl.load(x_ptr + b * sxb + c * sxc + col, mask=mask, other=0.0).to(tl.float32)
    if RESIDUAL:  # y is contiguous [B, C, T]
        v = v + tl.load(y_ptr + row * T + col, mask=mask, other=0.0).to(tl.float32)
    act = v
    if SNAKE:
        alpha = tl.load(alpha_ptr + c).to(tl.float32)
        inv_beta = tl.load(inv_beta_ptr + c).to(tl.float32)
        if LIBDEVICE:
            s = libdevice.sin(v * alpha)
        else:
            s = tl.sin(v * alpha)
        act = v + s * s * inv_beta
    return v, act


@triton.jit
def _pad_snake_kernel(x_ptr, y_ptr, sum_ptr, tail_ptr, alpha_ptr, inv_beta_ptr, out_ptr, C, T, CTX, sxb, sxc, stb,
                      stc, RESIDUAL: tl.constexpr, STORE_SUM: tl.constexpr, SNAKE: tl.constexpr,
                      HAS_TAIL: tl.constexpr, UPDATE_TAIL: tl.constexpr, LIBDEVICE: tl.constexpr,
                      BLOCK: tl.constexpr, TAIL_BLOCK: tl.constexpr):
    row = tl.program_id(0)  # b * C + c
    b = row // C
    c = row % C
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # output column in [0, CTX + T)
    width = CTX + T
    in_x = (j >= CTX) & (j < width)
    total, v = _snake_input(x_ptr, y_ptr, alpha_ptr, inv_beta_ptr, row, b, c, j - CTX, in_x, T, sxb, sxc,
                            RESIDUAL, SNAKE, LIBDEVICE)
    if STORE_SUM:
        tl.store(sum_ptr + row * T + (j - CTX), total.to(sum_ptr.dtype.element_ty), mask=in_x)
    v = tl.where(in_x, v, 0.0)
    if HAS_TAIL:
        in_tail = j < CTX
        t = tl.load(tail_ptr + b * stb + c * stc + j, mask=in_tail, other=0.0).to(tl.float32)
        v = tl.where(in_tail, t, v)
    tl.store(out_ptr + row * width + j, _rounded(v, out_ptr.dtype.element_ty), mask=j < width)
    if UPDATE_TAIL:  # the row's first program holds every tail column (BLOCK >= CTX): it moves the tail on
        if tl.program_id(1) == 0:
            i = tl.arange(0, TAIL_BLOCK)
            src = T + i  # column of [tail | x] that becomes tail column i
            from_tail = (i < CTX) & (src < CTX)
            from_x = (i < CTX) & (src >= CTX)
            _, nv = _snake_input(x_ptr, y_ptr, alpha_ptr, inv_beta_ptr, row, b, c, src - CTX, from_x, T, sxb, sxc,
                                 RESIDUAL, SNAKE, LIBDEVICE)
            old = tl.load(tail_ptr + b * stb + c * stc + src, mask=from_tail, other=0.0).to(tl.float32)
            nv = _rounded(tl.where(from_tail, old, nv), out_ptr.dtype.element_ty)  # as the convolution reads it
            tl.debug_barrier()  # every load of the old tail is done before the first store into it
            tl.store(tail_ptr + b * stb + c * stc + i, nv.to(tail_ptr.dtype.element_ty), mask=i < CTX)


def pad_snake(x: torch.Tensor, tail: torch.Tensor | None, context: int, alpha: torch.Tensor | None,
              inv_beta: torch.Tensor | None, dtype: torch.dtype, residual: torch.Tensor | None = None,
              keep_sum: bool = True, update_tail: bool = False):
    """x [B, C, T] -> [B, C, context + T] in `dtype`: `tail` [B, C, context] (zeros when None), then
    x + inv_beta * sin^2(alpha * x) per channel (x itself when alpha is None).

    With `residual` [B, C, T], x + residual takes x's place, and the result is (x + residual, the padded input), or
    (None, the padded input) without `keep_sum`. `update_tail`: also write the padded input's last `context` columns
    into `tail` (in place, cast to `dtype` first: the values the convolution reads)."""
    B, C, T = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    update = update_tail and tail is not None and context > 0
    if tail is not None and tail.stride(-1) != 1:
        if update:
            raise ValueError("update_tail needs a tail with contiguous rows")
        tail = tail.contiguous()
    out = torch.empty(B, C, context + T, dtype=dtype, device=x.device)
    total = None  # x + residual, where kept
    if residual is not None:
        residual = residual.contiguous()
        if keep_sum:
            total = torch.empty(B, C, T, dtype=torch.result_type(x, residual), device=x.device)
    snake = alpha is not None
    block = max(min(1024, triton.next_power_of_2(context + T)), triton.next_power_of_2(max(context, 1)))
    grid = (B * C, triton.cdiv(context + T, block))
    _pad_snake_kernel[grid](  # unused pointer arguments get x
        x, residual if residual is not None else x, total if total is not None else x, tail if tail is not None else x,
        alpha if snake else x, inv_beta if snake else x, out, C, T, context, x.stride(0), x.stride(1),
        tail.stride(0) if tail is not None else 0, tail.stride(1) if tail is not None else 0,
        RESIDUAL=residual is not None, STORE_SUM=total is not None, SNAKE=snake,
        HAS_TAIL=tail is not None and context > 0, UPDATE_TAIL=update, LIBDEVICE=LIBDEVICE_SIN, BLOCK=block,
        TAIL_BLOCK=triton.next_power_of_2(max(context, 1)))
    return out if residual is None else (total, out)


@triton.jit
def _add_rmsnorm_kernel(x_ptr, y_ptr, scale_ptr, w_ptr, h_ptr, n_ptr, C, eps, HAS_Y: tl.constexpr,
                        BLOCK: tl.constexpr):
    row = tl.program_id(0)
    c = tl.arange(0, BLOCK)
    m = c < C
    h = tl.load(x_ptr + row * C + c, mask=m, other=0.0).to(tl.float32)
    if HAS_Y:
        y = tl.load(y_ptr + row * C + c, mask=m, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + c, mask=m, other=0.0).to(tl.float32)
        h = h + scale * y
        tl.store(h_ptr + row * C + c, h.to(h_ptr.dtype.element_ty), mask=m)
    r = tl.rsqrt(tl.sum(h * h, axis=0) / C + eps)
    w = tl.load(w_ptr + c, mask=m, other=0.0).to(tl.float32)
    tl.store(n_ptr + row * C + c, (w * (h * r)).to(n_ptr.dtype.element_ty), mask=m)


def add_rmsnorm(x: torch.Tensor, y: torch.Tensor | None, scale: torch.Tensor | None, weight: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, RMSNorm(h)) with h = x + scale * y (h = x when y is None), over the last dim C of x [..., C]."""
    x = x.contiguous()
    C = x.shape[-1]
    h = torch.empty_like(x) if y is not None else x
    normed = torch.empty_like(x)
    _add_rmsnorm_kernel[(x.numel() // C,)](
        x, y.contiguous() if y is not None else x, scale if y is not None else x, weight, h, normed, C, eps,
        HAS_Y=y is not None, BLOCK=triton.next_power_of_2(C))
    return h, normed


@triton.jit
def _window_rows(qkv_ptr, ck_ptr, cv_ptr, cos_ptr, sin_ptr, b, slot, r, d, T, P, scb, sqb, sqt, sckb, sckh, sckt,
                 scvb, scvh, scvt, H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, HAS_CACHE: tl.constexpr):
    """Rows r [R, 1] x dims d [1, BD] of head `slot`'s window: the cached P frames (r < P), then the chunk's T (after
    RoPE, except v heads); q heads have only the chunk's rows."""
    dm = d < D
    slots = r * 0 + slot  # as a block, so the masks below are blocks
    is_k = (slots >= H) & (slots < H + HKV)
    is_v = slots >= H + HKV
    kv_head = tl.where(is_k, slots - H, slots - H - HKV)
    new = (r >= P) & (r < P + T) & dm
    t = r - P
    row = qkv_ptr + b * sqb + t * sqt + slot * D  # column slot * D of a qkv row: q heads, k heads, v heads
    x = tl.load(row + d, mask=new, other=0.0).to(tl.float32)
    half: tl.constexpr = D // 2
    partner = tl.load(row + (d + half) % D, mask=new, other=0.0).to(tl.float32)
    rot = tl.where(d < half, -partner, partner)
    cos = tl.load(cos_ptr + b * scb + t * D + d, mask=new, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + b * scb + t * D + d, mask=new, other=0.0).to(tl.float32)
    value = tl.where(is_v, x, x * cos + rot * sin)
    if HAS_CACHE:
        old = (r < P) & dm
        value = tl.where(old & is_k, tl.load(ck_ptr + b * sckb + kv_head * sckh + r * sckt + d, mask=old & is_k,
                                             other=0.0).to(tl.float32), value)
        value = tl.where(old & is_v, tl.load(cv_ptr + b * scvb + kv_head * scvh + r * scvt + d, mask=old & is_v,
                                             other=0.0).to(tl.float32), value)
    return value


@triton.jit
def _rope_qkv_kernel(qkv_ptr, ck_ptr, cv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, T, P, scb, sqb, sqt,
                     sckb, sckh, sckt, scvb, scvh, scvt,
                     H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                     HAS_CACHE: tl.constexpr, UPDATE_CACHE: tl.constexpr, BLOCK_T: tl.constexpr):
    b = tl.program_id(0)
    slot = tl.program_id(1)  # q heads 0..H-1, then k heads, then v heads
    r = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)[:, None]  # row of the window: P cached, then T new
    d = tl.arange(0, BLOCK_D)[None, :]
    dm = d < D
    slots = r * 0 + slot
    is_q = slots < H
    is_k = (slots >= H) & (slots < H + HKV)
    is_v = slots >= H + HKV
    kv_head = tl.where(is_k, slots - H, slots - H - HKV)
    value = _window_rows(qkv_ptr, ck_ptr, cv_ptr, cos_ptr, sin_ptr, b, slot, r, d, T, P, scb, sqb, sqt, sckb, sckh,
                         sckt, scvb, scvh, scvt, H, HKV, D, HAS_CACHE)
    new = (r >= P) & (r < P + T) & dm
    tl.store(q_ptr + ((b * H + slot) * T + (r - P)) * D + d, value.to(q_ptr.dtype.element_ty), mask=new & is_q)
    window = (r < P + T) & dm
    at = ((b * HKV + kv_head) * (P + T) + r) * D + d
    tl.store(k_ptr + at, value.to(k_ptr.dtype.element_ty), mask=window & is_k)
    tl.store(v_ptr + at, value.to(v_ptr.dtype.element_ty), mask=window & is_v)
    if UPDATE_CACHE:  # one program holds the head's whole window: the cache moves on by T rows, in place
        shifted = _window_rows(qkv_ptr, ck_ptr, cv_ptr, cos_ptr, sin_ptr, b, slot, r + T, d, T, P, scb, sqb, sqt,
                               sckb, sckh, sckt, scvb, scvh, scvt, H, HKV, D, HAS_CACHE)
        kept = (r < P) & dm
        tl.debug_barrier()  # every load of the old cache is done before the first store into it
        tl.store(ck_ptr + b * sckb + kv_head * sckh + r * sckt + d, shifted.to(ck_ptr.dtype.element_ty),
                 mask=kept & is_k)
        tl.store(cv_ptr + b * scvb + kv_head * scvh + r * scvt + d, shifted.to(cv_ptr.dtype.element_ty),
                 mask=kept & is_v)


def rope_qkv(qkv: torch.Tensor, cached: tuple[torch.Tensor, torch.Tensor] | None, cos: torch.Tensor,
             sin: torch.Tensor, n_head: int, n_kv_head: int, head_dim: int, update_cache: bool = False):
    """qkv [B, T, (H + 2 Hkv) D] (q heads, k heads, v heads), cos/sin [B or 1, 1, T, D] ->
    q [B, H, T, D] after RoPE, k and v [B, Hkv, P + T, D]: the cached P frames (k after RoPE) then the chunk's.

    `update_cache`: also move `cached` (written in place) on to the window's last P rows."""
    B, T, _ = qkv.shape
    qkv = qkv.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    P = 0 if cached is None else cached[0].shape[2]
    q = torch.empty(B, n_head, T, head_dim, dtype=qkv.dtype, device=qkv.device)
    k = torch.empty(B, n_kv_head, P + T, head_dim, dtype=qkv.dtype, device=qkv.device)
    v = torch.empty_like(k)
    ck, cv = cached if cached is not None else (k, v)
    update = update_cache and cached is not None
    if ck.stride(-1) != 1 or cv.stride(-1) != 1:
        if update:
            raise ValueError("update_cache needs a cache with contiguous rows")
        ck, cv = ck.contiguous(), cv.contiguous()
    block_t = triton.next_power_of_2(P + T) if update else 16
    block_d = triton.next_power_of_2(head_dim)
    grid = (B, n_head + 2 * n_kv_head, triton.cdiv(P + T, block_t))
    _rope_qkv_kernel[grid](
        qkv, ck, cv, cos, sin, q, k, v, T, P, T * head_dim if cos.shape[0] > 1 else 0, qkv.stride(0), qkv.stride(1),
        ck.stride(0), ck.stride(1), ck.stride(2), cv.stride(0), cv.stride(1), cv.stride(2),
        H=n_head, HKV=n_kv_head, D=head_dim, BLOCK_D=block_d, HAS_CACHE=cached is not None, UPDATE_CACHE=update,
        BLOCK_T=block_t, num_warps=8 if block_t * block_d >= 4096 else 4)
    return q, k, v


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, N, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = j < N
    g = tl.load(gu_ptr + row * 2 * N + j, mask=m, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * 2 * N + N + j, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * N + j, (g * tl.sigmoid(g) * u).to(out_ptr.dtype.element_ty), mask=m)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [..., 2N] (gate, then up) -> silu(gate) * up [..., N]."""
    gate_up = gate_up.contiguous()
    n = gate_up.shape[-1] // 2
    out = torch.empty(*gate_up.shape[:-1], n, dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(n))
    _silu_mul_kernel[(gate_up.numel() // (2 * n), triton.cdiv(n, block))](gate_up, out, n, BLOCK=block)
    return out
