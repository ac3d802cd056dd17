"""The fused codec path: `fuse(decoder)` is a copy of a CodecDecoder whose hot layers run Triton kernels
(codec/kernels.py) instead of chains of small PyTorch ops. Same weights, same state (keys, shapes, meaning), same
results up to float rounding; the plain decoder stays the reference.

What changes, per layer (the plain path's kernels in brackets):
  * SnakeBeta before a convolution, the causal convolution's carried tail and the cast to the convolution's dtype:
    one pad_snake kernel writing the convolution's input [tail | act(x)] [mul, sin, mul, addcmul, cat, cast]. Used by
    every residual unit (twice), decoder block, the final layer, and (without SnakeBeta) pre_conv, head_conv and the
    ConvNeXt depthwise convolutions. A residual unit's sum x + y is formed by the next such kernel (a `Residual`
    passes between them), which writes it only where a later unit needs it [add].
  * Transformer layers: one GEMM for q, k and v and one for gate and up (weights concatenated once, at fuse time);
    RoPE, the head split, the append to the cached window and the cache update in one rope_qkv kernel; each
    residual sum with the next RMSNorm in one add_rmsnorm kernel; silu(gate) * up in one kernel. About 11 kernels a
    layer instead of about 40.

Carried state is moved on in place by the kernels that read it (one program holds a row's whole tail or a head's
whole window, and a barrier orders its loads before its stores). A conv tail is stored after the cast to the
convolution's dtype (the plain path stores it before): the convolution only ever reads it cast, so it sees the same
values. Row-independent like the plain path: no kernel mixes
streams, so the fused path keeps the plain path's batch invariance (see codec/streaming.py).

Opt-in: `StreamingCodec(..., fused=True)`, or QWEN_TTS_MK_CODEC_FUSED=1 for the default; only where `available(device)`
(triton installed and a CUDA device, or TRITON_INTERPRET=1 for CPU tests).
"""

from __future__ import annotations

import copy
import importlib.util
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .decoder import CodecDecoder
from .modules import (
    Attention,
    CausalConv1d,
    ConvNeXtBlock,
    DecoderBlock,
    MLP,
    PreTransformer,
    ResidualUnit,
    SnakeBeta,
    State,
)

ENV_FLAG = "QWEN_TTS_MK_CODEC_FUSED"  # "1": StreamingCodec's default is the fused path where available


def available(device: torch.device | str) -> bool:
    """Whether the fused path can run on `device`: triton importable, and CUDA (or the Triton interpreter)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def requested() -> bool:
    """Whether the environment asks for the fused path by default (QWEN_TTS_MK_CODEC_FUSED=1)."""
    return os.environ.get(ENV_FLAG, "").strip().lower() in ("1", "true", "yes", "on")


def _kernels():
    from . import kernels  # imports triton: only on the fused path

    return kernels


class Residual(NamedTuple):
    """x + y not summed yet (a residual unit's output): the next pad_snake kernel forms the sum on its way."""

    x: torch.Tensor
    y: torch.Tensor


class FusedConv(nn.Module):
    """A CausalConv1d, optionally after a SnakeBeta, with residual sum, activation, tail and cast in one kernel.
    [B,Cin,T] (or a Residual) -> [B,Cout,T] in the convolution's dtype."""

    def __init__(self, conv: CausalConv1d, act: SnakeBeta | None = None):
        super().__init__()
        self.conv, self.act = conv, act

    def padded_input(self, x: torch.Tensor | Residual, state: State, keep_sum: bool = False):
        """(x + y of a Residual x when keep_sum, else None; the convolution's input [tail | act(x)]), the tail
        carried on."""
        conv, act = self.conv, self.act
        residual = None
        if isinstance(x, Residual):
            x, residual = x
        tail = state.get(conv.state_key) if conv.context else None
        out = _kernels().pad_snake(x, tail, conv.context, act.alpha if act else None, act.inv_beta if act else None,
                                   conv.weight.dtype, residual=residual, keep_sum=keep_sum, update_tail=True)
        total, padded = out if residual is not None else (None, out)
        if conv.context and tail is None:  # a new DecoderState: no slot to move on yet
            state[conv.state_key] = padded[..., -conv.context :]
        return total, padded

    def convolve(self, padded: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        return F.conv1d(padded, conv.weight, conv.bias, dilation=conv.dilation, groups=conv.groups)

    def forward(self, x: torch.Tensor | Residual, state: State) -> torch.Tensor:
        return self.convolve(self.padded_input(x, state)[1])


class FusedResidualUnit(nn.Module):
    """ResidualUnit returning its sum unformed (a Residual); its input may be one."""

    def __init__(self, unit: ResidualUnit):
        super().__init__()
        self.conv1, self.conv2 = FusedConv(unit.conv1, unit.act1), FusedConv(unit.conv2, unit.act2)

    def forward(self, x: torch.Tensor | Residual, state: State) -> Residual:
        total, padded = self.conv1.padded_input(x, state, keep_sum=True)
        return Residual(x if total is None else total, self.conv2(self.conv1.convolve(padded), state))


class FusedDecoderBlock(nn.Module):
    """DecoderBlock from and to Residuals: the previous block's last sum is formed by this block's SnakeBeta."""

    def __init__(self, block: DecoderBlock):
        super().__init__()
        self.act, self.upsample = block.act, block.upsample
        self.res_units = nn.ModuleList([FusedResidualUnit(u) for u in block.res_units])

    def forward(self, x: torch.Tensor | Residual, state: State) -> torch.Tensor | Residual:
        x, y = x if isinstance(x, Residual) else (x, None)
        x = _kernels().pad_snake(x, None, 0, self.act.alpha, self.act.inv_beta, self.upsample.weight.dtype,
                                 residual=y, keep_sum=False)
        x = self.upsample(x if y is None else x[1], state)
        for unit in self.res_units:
            x = unit(x, state)
        return x


class FusedAttention(nn.Module):
    """Attention with one QKV GEMM and the rope_qkv kernel; state as Attention's."""

    def __init__(self, attn: Attention):
        super().__init__()
        self.attn = attn
        projs = (attn.q_proj, attn.k_proj, attn.v_proj)
        self.qkv_weight = nn.Parameter(torch.cat([p.weight for p in projs]).detach(), requires_grad=False)
        self.qkv_bias = (nn.Parameter(torch.cat([p.bias for p in projs]).detach(), requires_grad=False)
                         if attn.q_proj.bias is not None else None)

    def forward(self, x, cos, sin, mask, state: State) -> torch.Tensor:
        a = self.attn
        B, T, _ = x.shape
        qkv = F.linear(x, self.qkv_weight, self.qkv_bias)
        cached, keep = state.get(a.state_key), a.window - 1
        in_place = cached is not None and cached[0].shape[2] == keep  # a BatchState's (or a full) window
        q, k, v = _kernels().rope_qkv(qkv, cached, cos, sin, a.n_head, a.n_kv_head, a.head_dim, update_cache=in_place)
        if keep > 0 and not in_place:
            state[a.state_key] = (k[:, :, -keep:], v[:, :, -keep:])
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=a.head_dim**-0.5,
                                           enable_gqa=a.n_head != a.n_kv_head)
        return a.o_proj(y.transpose(1, 2).reshape(B, T, a.n_head * a.head_dim))


class FusedMLP(nn.Module):
    """SwiGLU with one gate/up GEMM and the silu_mul kernel (SiLU only; another activation runs the plain MLP)."""

    def __init__(self, mlp: MLP):
        super().__init__()
        self.mlp = mlp
        self.gate_up = nn.Parameter(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach(),
                                    requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mlp.act is not F.silu:
            return self.mlp(x)
        return self.mlp.down_proj(_kernels().silu_mul(F.linear(x, self.gate_up)))


class FusedPreTransformer(nn.Module):
    """PreTransformer with fused layers: each residual sum and the next RMSNorm in one add_rmsnorm kernel."""

    def __init__(self, pre: PreTransformer):
        super().__init__()
        self.pre = pre
        self.attns = nn.ModuleList([FusedAttention(layer.attn) for layer in pre.layers])
        self.mlps = nn.ModuleList([FusedMLP(layer.mlp) for layer in pre.layers])

    def forward(self, x: torch.Tensor, state: State) -> torch.Tensor:
        pre, kern = self.pre, _kernels()
        T = x.shape[1]
        h = pre.input_proj(x)
        start, cos, sin, mask = pre.rope_and_mask(state, T, h)
        norms = [n for layer in pre.layers for n in (layer.attn_norm, layer.mlp_norm)] + [pre.norm]
        h, normed = kern.add_rmsnorm(h, None, None, norms[0].weight, norms[0].eps)
        for i, (layer, attn, mlp) in enumerate(zip(pre.layers, self.attns, self.mlps)):
            y = attn(normed, cos, sin, mask, state)
            h, normed = kern.add_rmsnorm(h, y, layer.attn_scale, norms[2 * i + 1].weight, norms[2 * i + 1].eps)
            y = mlp(normed)
            h, normed = kern.add_rmsnorm(h, y, layer.mlp_scale, norms[2 * i + 2].weight, norms[2 * i + 2].eps)
        state[pre.state_key] = start + T  # last: in a BatchState, `start` is the counter itself
        return pre.output_proj(normed)


def fuse(decoder: CodecDecoder) -> CodecDecoder:
    """A copy of `decoder` (any dtypes per layer, as StreamingCodec's precisions make) on the fused path."""
    model = copy.deepcopy(decoder)
    model.pre_conv = FusedConv(model.pre_conv)
    model.pre_transformer = FusedPreTransformer(model.pre_transformer)
    for module in list(model.modules()):
        if isinstance(module, ConvNeXtBlock):
            module.dwconv = FusedConv(module.dwconv)
    model.head_conv = FusedConv(model.head_conv)
    model.blocks = nn.ModuleList([FusedDecoderBlock(b) for b in model.blocks])
    model.final_conv = FusedConv(model.final_conv, model.final_act)
    model.final_act = nn.Identity()
    return model
