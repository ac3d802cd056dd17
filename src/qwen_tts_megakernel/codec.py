"""The codec decoder: Qwen3-TTS-Tokenizer-12Hz codes -> 24 kHz waveform, whole-utterance and streaming.

One frame is 16 codes (one per codebook, each in [0, 2048)) and becomes `samples_per_frame` = 1920
samples (80 ms at 24 kHz). The pipeline, with the real checkpoint's widths in brackets:

    codes [B, T, 16]
      -> RVQ dequantize            sum of codebook vectors, two 1x1 projections   [B, T, 512]
      -> pre_conv                  causal conv k=3                                [B, 1024, T]
      -> pre_transformer           8 layers, sliding-window (72) causal attention [B, T, 1024]
      -> upsample x2               CausalConvTranspose (k=s=2) + ConvNeXt block   [B, 1024, 4T]
      -> head conv                 causal conv k=7                                [B, 1536, 4T]
      -> 4 decoder blocks          SnakeBeta, CausalConvTranspose(k=2r, s=r), 3 residual units
                                   rates 8,5,4,3; channels 1536->768->384->192->96 [B, 96, 1920T]
      -> SnakeBeta, causal conv k=7 to 1 channel, clamp to [-1, 1]                [B, 1920T]

Every layer is causal with zero lookahead, so the decoder can run frame by frame with carried state
and give the same samples as one pass over the whole utterance. Here both modes run the same code:
`CodecDecoder.forward(codes, state)` consumes a chunk of frames and updates `state` in place. A whole
utterance decode is one call with a fresh state; `StreamingCodecDecoder` keeps the state between
calls. The state per stream is bounded (it does not grow with the utterance):

  * CausalConv1d:           the last (kernel-1)*dilation input columns (zeros at the start)
  * CausalConvTranspose1d:  the (kernel-stride) output samples that overlap the next chunk
  * Attention:              keys (after RoPE) and values of the last sliding_window-1 frames
  * PreTransformer:         the absolute position of the next frame (RoPE keeps counting)

The state comes in two forms with the same get/set interface, so the modules have one code path:
`DecoderState`, a dict that starts empty and grows (the whole-utterance decode and the eager stream), and
`StaticDecoderState`, every tensor preallocated at its final shape in one flat buffer and the position a device
tensor, written in place. The static form is what a CUDA graph can capture: `CodecGraphs` holds one graph per
chunk size (1, 2, 4, 8 frames) and replays them for every stream of a decoder, copying each stream's own static
state in before and out after. Before the attention window fills, the static cache holds zero slots at negative
positions, which the attention mask excludes, so both forms give the same samples.

Checkpoint quirks worth knowing (all handled below):
  * each codebook vector has codebook_dim // 2 entries (256 for the real model) and is stored as
    `embedding_sum` / `cluster_usage` (EMA statistics); the row is their ratio, usage clamped at 1e-5;
  * the first codebook has its own output projection (`rvq_first`), codebooks 1..15 share one
    (`rvq_rest`); both are bias-free Conv1d k=1 weights [out, in, 1]; the encoder-side `input_proj`
    weights are in the file too and unused by decoding; `num_semantic_quantizers` is not read (always 1);
  * SnakeBeta `alpha` and `beta` are stored in log space (the forward applies exp);
  * the attention head_dim (64) is not hidden_size / heads (512 / 16 = 32): q_proj is 512 -> 1024;
  * the window mask lets query t see keys t-71 .. t (72 frames including itself).

Versus the official `Qwen3TTSTokenizerV2Model.decode`: that calls `chunked_decode(chunk_size=300,
left_context_size=25)`, i.e. it re-decodes 300-frame chunks with only 25 frames of left context and
drops the context's samples. For T <= 300 frames it is one full pass and equal to ours up to float
rounding. Beyond 300 frames it differs from the true causal decode at each chunk boundary (25 < the
72-frame attention window, and the RoPE positions restart); ours is the exact causal decode.

Weights are read with the official tensor names (`decoder.*` keys of speech_tokenizer/model.safetensors).
This module does not import the official package or transformers.
"""

from __future__ import annotations

import json
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .layers import RMSNorm, apply_rope, rope_cos_sin

# ---------------------------------------------------------------------------------------------
# Streaming state. Each stateful module reads `state.get(self.state_key)` and then writes
# `state[self.state_key] = value`; the state object stores its own copy of the value.
# ---------------------------------------------------------------------------------------------


class DecoderState(dict):
    """A stream's carried state by module name, grown as it goes: empty for a new utterance (conv tails and
    overlaps then count as zeros, the attention cache holds the frames seen so far, up to window - 1, and the
    position is a Python int). Stores a copy of each tensor written, so no chunk's activations stay alive."""

    def __setitem__(self, key: str, value) -> None:
        if isinstance(value, torch.Tensor):
            value = value.clone()
        elif isinstance(value, tuple):
            value = tuple(v.clone() for v in value)
        super().__setitem__(key, value)


class StaticDecoderState:
    """A stream's carried state at fixed shapes, for CUDA graphs: every tensor a view of one flat buffer
    (`values`, zeros for a new utterance) and the position a 0-d long tensor (`position`); writes copy in place.
    The attention cache always holds window - 1 frames (zero slots at negative positions until it fills).
    Two static states of one decoder have the same layout, so `copy_` moves a whole state in two copies."""

    def __init__(self, decoder: CodecDecoder):
        like = decoder.quantizer.codebooks
        shapes = {m.state_key: m.state_shapes() for m in decoder.modules() if isinstance(m, _Stateful)}
        self.values = torch.zeros(sum(math.prod(s) for ss in shapes.values() for s in ss), dtype=like.dtype,
                                  device=like.device)
        self.position = torch.zeros((), dtype=torch.long, device=like.device)
        self.slots: dict[str, torch.Tensor | tuple[torch.Tensor, ...]] = {
            decoder.pre_transformer.state_key: self.position}
        offset = 0
        for key, module_shapes in shapes.items():
            views = []
            for shape in module_shapes:
                views.append(self.values[offset : offset + math.prod(shape)].view(shape))
                offset += math.prod(shape)
            if views:  # one tensor, or a tuple when the module carries several (attention: keys, values)
                self.slots[key] = views[0] if len(views) == 1 else tuple(views)

    def get(self, key: str, default=None):
        """The buffer itself (not a copy): a module reads its slot before it writes it."""
        return self.slots.get(key, default)

    def __setitem__(self, key: str, value) -> None:
        slot = self.slots[key]
        if isinstance(slot, tuple):
            for buffer, v in zip(slot, value):
                buffer.copy_(v)
        else:
            slot.copy_(value)

    def copy_(self, other: StaticDecoderState) -> None:
        self.values.copy_(other.values)
        self.position.copy_(other.position)


State = DecoderState | StaticDecoderState


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

_SUPPORTED_ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu}


@dataclass
class CodecDecoderConfig:
    """Decoder half of speech_tokenizer/config.json (`decoder_config`, plus two top-level rates).

    Defaults are those of the official `Qwen3TTSTokenizerV2DecoderConfig` / `Qwen3TTSTokenizerV2Config`
    classes, which are NOT the released checkpoint's values (that has hidden_size 512, intermediate 1024,
    codebook_dim 512, head_dim 64). `codebook_dim` has no default in the official class either (the
    official decoder fails without it), so it is required here.
    """

    codebook_dim: int  # width of the dequantized features; each codebook vector is codebook_dim // 2
    codebook_size: int = 2048
    hidden_size: int = 1024
    latent_dim: int = 1024
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads (the official fallback)
    intermediate_size: int = 3072
    num_hidden_layers: int = 8
    num_quantizers: int = 16
    sliding_window: int = 72
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    layer_scale_initial_scale: float = 0.01
    attention_bias: bool = False
    hidden_act: str = "silu"
    max_position_embeddings: int = 8000  # informational: default RoPE has no length limit
    upsample_rates: tuple[int, ...] = (8, 5, 4, 3)
    upsampling_ratios: tuple[int, ...] = (2, 2)
    decoder_dim: int = 1536
    sample_rate: int = 24000  # top-level output_sample_rate
    samples_per_frame: int = 1920  # top-level decode_upsample_rate

    def __post_init__(self) -> None:
        self.upsample_rates = tuple(int(r) for r in self.upsample_rates)
        self.upsampling_ratios = tuple(int(r) for r in self.upsampling_ratios)
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        total = math.prod(self.upsample_rates) * math.prod(self.upsampling_ratios)
        if total != self.samples_per_frame:
            raise ValueError(
                f"decode_upsample_rate (samples_per_frame) is {self.samples_per_frame}, but the decoder "
                f"upsamples by prod(upsample_rates {list(self.upsample_rates)}) * prod(upsampling_ratios "
                f"{list(self.upsampling_ratios)}) = {total}"
            )
        if self.hidden_act not in _SUPPORTED_ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported ({sorted(_SUPPORTED_ACTIVATIONS)})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.num_quantizers < 2:
            raise ValueError(f"num_quantizers must be >= 2 (1 semantic + acoustic), got {self.num_quantizers}")
        if self.codebook_dim % 2:
            raise ValueError(f"codebook_dim must be even (codebook vectors are codebook_dim // 2), got {self.codebook_dim}")
        if self.decoder_dim % 2 ** len(self.upsample_rates):
            raise ValueError(f"decoder_dim {self.decoder_dim} is not divisible by 2**{len(self.upsample_rates)}")

    @property
    def frame_rate(self) -> float:
        """Frames per second (12.5 for the released model)."""
        return self.sample_rate / self.samples_per_frame

    @classmethod
    def from_json_dict(cls, d: dict) -> "CodecDecoderConfig":
        """Parse the full official speech_tokenizer/config.json dict (top level + `decoder_config`)."""
        dec = dict(d.get("decoder_config") or {})
        if "codebook_dim" not in dec:
            raise ValueError("speech tokenizer config: decoder_config.codebook_dim is missing (it has no default)")
        rope_scaling = dec.get("rope_scaling")
        if isinstance(rope_scaling, dict) and rope_scaling.get("rope_type", rope_scaling.get("type")) not in (None, "default"):
            raise ValueError(f"speech tokenizer config: rope_scaling {rope_scaling} is not supported (only default RoPE)")
        names = {f for f in cls.__dataclass_fields__ if f not in ("sample_rate", "samples_per_frame")}
        kwargs = {k: v for k, v in dec.items() if k in names}
        kwargs["sample_rate"] = int(d.get("output_sample_rate", 24000))
        kwargs["samples_per_frame"] = int(d.get("decode_upsample_rate", 1920))
        return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# Building blocks. Conv modules take and return channels-first [B, C, T].
# Each stateful module reads and writes its own slot `state[self.state_key]`.
# ---------------------------------------------------------------------------------------------


class _Stateful(nn.Module):
    """A module that carries streaming state; `state_key` is set to its module path by CodecDecoder."""

    state_key: str = ""

    def state_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Shapes of the tensors it carries for one stream (batch 1) in a StaticDecoderState."""
        return ()


class CausalConv1d(_Stateful):
    """Conv1d (stride 1) left-padded so output t sees inputs t-(k-1)*dilation .. t. [B,Cin,T] -> [B,Cout,T].

    The left padding is the previous chunk's last (k-1)*dilation input columns, zeros at the start,
    which is exactly the official zero left-padding when the whole utterance is one chunk.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, dilation: int = 1, groups: int = 1):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_ch, in_ch // groups, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_ch))
        self.dilation, self.groups = dilation, groups
        self.context = (kernel_size - 1) * dilation  # input columns carried between chunks

    def state_shapes(self) -> tuple[tuple[int, ...], ...]:
        in_ch = self.weight.shape[1] * self.groups
        return ((1, in_ch, self.context),) if self.context else ()

    def forward(self, x: torch.Tensor, state: State) -> torch.Tensor:
        if self.context == 0:
            return F.conv1d(x, self.weight, self.bias, groups=self.groups)
        tail = state.get(self.state_key)
        if tail is None:
            tail = x.new_zeros(x.shape[0], x.shape[1], self.context)
        x = torch.cat([tail, x], dim=-1)  # [B, Cin, context + T]
        state[self.state_key] = x[..., -self.context :]
        return F.conv1d(x, self.weight, self.bias, dilation=self.dilation, groups=self.groups)


class CausalConvTranspose1d(_Stateful):
    """ConvTranspose1d(kernel k, stride s) with the last k-s samples trimmed: [B,Cin,T] -> [B,Cout,T*s].

    Frame t writes output samples t*s .. t*s+k-1; the k-s samples past the chunk end are not final
    until the next frame adds its contribution, so they are carried (without bias) as overlap.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int):
        super().__init__()
        assert stride <= kernel_size <= 2 * stride, "overlap must fit in one frame"
        self.weight = nn.Parameter(torch.empty(in_ch, out_ch, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_ch))
        self.stride = stride
        self.overlap = kernel_size - stride

    def state_shapes(self) -> tuple[tuple[int, ...], ...]:
        return ((1, self.weight.shape[1], self.overlap),) if self.overlap else ()

    def forward(self, x: torch.Tensor, state: State) -> torch.Tensor:
        y = F.conv_transpose1d(x, self.weight, stride=self.stride)  # [B, Cout, T*s + overlap], no bias
        n = x.shape[-1] * self.stride
        if self.overlap:
            tail = state.get(self.state_key)
            if tail is not None:
                y[..., : self.overlap] += tail
            state[self.state_key] = y[..., n:]
            y = y[..., :n]
        return y + self.bias[:, None]


class SnakeBeta(nn.Module):
    """x + 1/beta * sin^2(alpha * x), per channel. The checkpoint stores log(alpha) and log(beta)."""

    def __init__(self, channels: int):
        super().__init__()
        self.log_alpha = nn.Parameter(torch.zeros(channels))
        self.log_beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T]
        alpha = self.log_alpha.exp()[:, None]
        beta = self.log_beta.exp()[:, None]
        return x + (1.0 / (beta + 1e-9)) * torch.sin(x * alpha).pow(2)


class ConvNeXtBlock(nn.Module):
    """Causal depthwise conv k=7 -> LayerNorm -> Linear 4x -> GELU -> Linear -> gamma, residual. [B,C,T]."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = CausalConv1d(dim, dim, kernel_size=7, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor, state: State) -> torch.Tensor:
        h = self.dwconv(x, state).transpose(1, 2)  # [B, T, C]
        h = self.pwconv2(F.gelu(self.pwconv1(self.norm(h))))
        return x + (self.gamma * h).transpose(1, 2)


class ResidualUnit(nn.Module):
    """SnakeBeta -> causal conv k=7 (dilated) -> SnakeBeta -> conv k=1, residual. [B,C,T] -> [B,C,T]."""

    def __init__(self, dim: int, dilation: int):
        super().__init__()
        self.act1 = SnakeBeta(dim)
        self.conv1 = CausalConv1d(dim, dim, kernel_size=7, dilation=dilation)
        self.act2 = SnakeBeta(dim)
        self.conv2 = CausalConv1d(dim, dim, kernel_size=1)

    def forward(self, x: torch.Tensor, state: State) -> torch.Tensor:
        h = self.conv1(self.act1(x), state)
        h = self.conv2(self.act2(h), state)
        return x + h


class DecoderBlock(nn.Module):
    """SnakeBeta -> CausalConvTranspose(k=2r, s=r) halving channels -> residual units (dilation 1, 3, 9).

    [B, Cin, T] -> [B, Cin // 2, T * r]
    """

    def __init__(self, in_dim: int, out_dim: int, rate: int):
        super().__init__()
        self.act = SnakeBeta(in_dim)
        self.upsample = CausalConvTranspose1d(in_dim, out_dim, kernel_size=2 * rate, stride=rate)
        self.res_units = nn.ModuleList([ResidualUnit(out_dim, d) for d in (1, 3, 9)])

    def forward(self, x: torch.Tensor, state: State) -> torch.Tensor:
        x = self.upsample(self.act(x), state)
        for unit in self.res_units:
            x = unit(x, state)
        return x


class Upsampler(nn.Module):
    """CausalConvTranspose(k=s=ratio) (no overlap) then a ConvNeXt block. [B,C,T] -> [B,C,T*ratio]."""

    def __init__(self, dim: int, ratio: int):
        super().__init__()
        self.conv = CausalConvTranspose1d(dim, dim, kernel_size=ratio, stride=ratio)
        self.convnext = ConvNeXtBlock(dim)

    def forward(self, x: torch.Tensor, state: State) -> torch.Tensor:
        return self.convnext(self.conv(x, state), state)


# ---------------------------------------------------------------------------------------------
# Residual vector quantizer (decode only)
# ---------------------------------------------------------------------------------------------


class RVQDequantizer(nn.Module):
    """codes [B, T, Q] -> features [B, T, codebook_dim].

    Codebook q's row c is embedding_sum[c] / max(cluster_usage[c], 1e-5) (precomputed at load time,
    in `codebooks` [Q, K, codebook_dim // 2]). Codebook 0 ("semantic") goes through `first_proj`,
    the sum of codebooks 1..Q-1 ("acoustic") through `rest_proj`; the two are added.
    """

    def __init__(self, cfg: CodecDecoderConfig):
        super().__init__()
        vq_dim = cfg.codebook_dim // 2
        self.register_buffer("codebooks", torch.zeros(cfg.num_quantizers, cfg.codebook_size, vq_dim))
        self.first_proj = nn.Linear(vq_dim, cfg.codebook_dim, bias=False)
        self.rest_proj = nn.Linear(vq_dim, cfg.codebook_dim, bias=False)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        first = F.embedding(codes[..., 0], self.codebooks[0])  # [B, T, vq_dim]
        rest = F.embedding(codes[..., 1], self.codebooks[1])
        for q in range(2, codes.shape[-1]):
            rest = rest + F.embedding(codes[..., q], self.codebooks[q])
        return self.first_proj(first) + self.rest_proj(rest)


# ---------------------------------------------------------------------------------------------
# Pre-transformer: sliding-window causal attention at the frame rate
# ---------------------------------------------------------------------------------------------


class Attention(_Stateful):
    """Causal self-attention over the last `window` frames, with RoPE and grouped K/V heads.

    x [B, T, C] at absolute positions pos0 .. pos0+T-1 -> [B, T, C]. The state holds keys (after RoPE)
    and values of the previous window-1 frames: query t sees keys t-window+1 .. t. pos0 is an int, or a
    0-d device tensor (StaticDecoderState), so no host value changes between CUDA graph replays.
    """

    def __init__(self, cfg: CodecDecoderConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.window = cfg.sliding_window
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_head * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_head * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=bias)

    def state_shapes(self) -> tuple[tuple[int, ...], ...]:
        keep = self.window - 1
        return ((1, self.n_kv_head, keep, self.head_dim),) * 2 if keep > 0 else ()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos0: int | torch.Tensor,
                state: State):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        # Prepend the cached frames: keys/values now cover positions pos0-P .. pos0+T-1.
        cached = state.get(self.state_key)
        if cached is not None:
            k = torch.cat([cached[0], k], dim=2)
            v = torch.cat([cached[1], v], dim=2)
        P = k.shape[2] - T
        keep = self.window - 1
        if keep > 0:
            state[self.state_key] = (k[:, :, -keep:], v[:, :, -keep:])

        # Mask: key j is visible to query i iff i - window < j <= i (absolute positions) and j >= 0 (a static
        # state's cache starts as zero slots at negative positions).
        q_pos = pos0 + torch.arange(T, device=x.device)[:, None]
        k_pos = pos0 - P + torch.arange(P + T, device=x.device)[None, :]
        mask = (k_pos <= q_pos) & (k_pos > q_pos - self.window) & (k_pos >= 0)  # [T, P + T]

        rep = self.n_head // self.n_kv_head  # each K/V head serves `rep` consecutive query heads
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.head_dim**-0.5)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x)). [..., C] -> [..., C]."""

    def __init__(self, cfg: CodecDecoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = _SUPPORTED_ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class TransformerLayer(nn.Module):
    """Pre-norm block; both residual branches are scaled per channel (LayerScale). [B,T,C] -> [B,T,C]."""

    def __init__(self, cfg: CodecDecoderConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.attn_scale = nn.Parameter(torch.full((cfg.hidden_size,), cfg.layer_scale_initial_scale))
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.mlp_scale = nn.Parameter(torch.full((cfg.hidden_size,), cfg.layer_scale_initial_scale))

    def forward(self, x, cos, sin, pos0: int | torch.Tensor, state: State) -> torch.Tensor:
        x = x + self.attn_scale * self.attn(self.attn_norm(x), cos, sin, pos0, state)
        return x + self.mlp_scale * self.mlp(self.mlp_norm(x))


class PreTransformer(_Stateful):
    """input_proj (latent -> hidden), layers, RMSNorm, output_proj (hidden -> latent). [B,T,L] -> [B,T,L].

    The state holds the absolute position of the next frame (an int, or a 0-d device tensor in a
    StaticDecoderState); RoPE only sees relative offsets inside the window, but counting on keeps
    streaming bit-compatible with a whole-utterance pass.
    """

    def __init__(self, cfg: CodecDecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.input_proj = nn.Linear(cfg.latent_dim, cfg.hidden_size)
        self.layers = nn.ModuleList([TransformerLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.output_proj = nn.Linear(cfg.hidden_size, cfg.latent_dim)

    def forward(self, x: torch.Tensor, state: State) -> torch.Tensor:
        pos0 = state.get(self.state_key, 0)
        h = self.input_proj(x)
        positions = pos0 + torch.arange(x.shape[1], device=x.device)
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, h.dtype)
        for layer in self.layers:
            h = layer(h, cos, sin, pos0, state)
        state[self.state_key] = pos0 + x.shape[1]  # last: in a StaticDecoderState, pos0 is the counter itself
        return self.output_proj(self.norm(h))


# ---------------------------------------------------------------------------------------------
# The decoder
# ---------------------------------------------------------------------------------------------


class CodecDecoder(nn.Module):
    """Qwen3-TTS-Tokenizer-12Hz decoder. `decode(codes [T, Q]) -> wav [T * samples_per_frame]`.

    Build with `CodecDecoder(cfg)` then `load_official_state_dict(sd)`, or `CodecDecoder.from_state_dict`.
    Runs on any device; fp32 is the reference precision (`.to(torch.bfloat16)` also works, with
    RMSNorm in fp32 and the output returned as fp32).
    """

    def __init__(self, cfg: CodecDecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.quantizer = RVQDequantizer(cfg)
        self.pre_conv = CausalConv1d(cfg.codebook_dim, cfg.latent_dim, kernel_size=3)
        self.pre_transformer = PreTransformer(cfg)
        self.upsample = nn.ModuleList([Upsampler(cfg.latent_dim, r) for r in cfg.upsampling_ratios])
        self.head_conv = CausalConv1d(cfg.latent_dim, cfg.decoder_dim, kernel_size=7)
        dims = [cfg.decoder_dim // 2**i for i in range(len(cfg.upsample_rates) + 1)]
        self.blocks = nn.ModuleList(
            [DecoderBlock(dims[i], dims[i + 1], r) for i, r in enumerate(cfg.upsample_rates)]
        )
        self.final_act = SnakeBeta(dims[-1])
        self.final_conv = CausalConv1d(dims[-1], 1, kernel_size=7)
        for name, module in self.named_modules():
            if isinstance(module, _Stateful):
                module.state_key = name
        self._streaming_graphs: CodecGraphs | None = None

    @property
    def device(self) -> torch.device:
        return self.quantizer.codebooks.device

    @property
    def samples_per_frame(self) -> int:
        return self.cfg.samples_per_frame

    @property
    def sample_rate(self) -> int:
        return self.cfg.sample_rate

    def forward(self, codes: torch.Tensor, state: State) -> torch.Tensor:
        """codes [B, T, Q] (long, each in [0, codebook_size)) -> wav [B, T * samples_per_frame], fp32.

        Continues the stream described by `state` (pass a new DecoderState or StaticDecoderState to start
        one) and updates it in place.
        """
        x = self.quantizer(codes)  # [B, T, codebook_dim]
        x = self.pre_conv(x.transpose(1, 2), state)  # [B, latent, T]
        x = self.pre_transformer(x.transpose(1, 2), state).transpose(1, 2)  # [B, latent, T]
        for up in self.upsample:
            x = up(x, state)  # [B, latent, T * prod(upsampling_ratios)]
        x = self.head_conv(x, state)  # [B, decoder_dim, 4T]
        for block in self.blocks:
            x = block(x, state)  # channels halve, time x rate
        wav = self.final_conv(self.final_act(x), state)  # [B, 1, T * samples_per_frame]
        return wav.squeeze(1).clamp(-1.0, 1.0).float()

    def streaming_graphs(self) -> CodecGraphs:
        """The CodecGraphs that every StreamingCodecDecoder of this decoder shares, made at the first call (so
        after the decoder has moved to its device and dtype)."""
        if self._streaming_graphs is None:
            self._streaming_graphs = CodecGraphs(self)
        return self._streaming_graphs

    def _check_codes(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.dim() != 2 or codes.shape[1] != self.cfg.num_quantizers:
            raise ValueError(f"codes must be [T, {self.cfg.num_quantizers}], got {tuple(codes.shape)}")
        if codes.shape[0] < 1:
            raise ValueError("codes must hold at least one frame")
        if codes.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
        return codes.to(device=self.quantizer.codebooks.device, dtype=torch.long)

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [T, Q] -> wav [T * samples_per_frame] in [-1, 1]: one causal pass over the utterance.

        Equal to the official decode for T <= 300 frames; exact (unchunked) beyond that.
        """
        codes = self._check_codes(codes)
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= self.cfg.codebook_size:
            raise ValueError(f"codes must be in [0, {self.cfg.codebook_size}), got min {lo} max {hi}")
        return self(codes[None], DecoderState())[0]

    # ----- loading ---------------------------------------------------------------------------

    def official_parameter_names(self) -> Iterator[tuple[str, str]]:
        """(official name without the 'decoder.' prefix, our parameter name) for every dense weight.

        The codebooks (`quantizer.rvq_*.vq.layers.*._codebook.{embedding_sum,cluster_usage}`) are not
        listed; they are combined at load time (see `load_official_state_dict`).
        """
        yield "quantizer.rvq_first.output_proj.weight", "quantizer.first_proj.weight"
        yield "quantizer.rvq_rest.output_proj.weight", "quantizer.rest_proj.weight"
        for p in ("weight", "bias"):
            yield f"pre_conv.conv.{p}", f"pre_conv.{p}"
        t = "pre_transformer"
        for p in ("weight", "bias"):
            yield f"{t}.input_proj.{p}", f"{t}.input_proj.{p}"
            yield f"{t}.output_proj.{p}", f"{t}.output_proj.{p}"
        yield f"{t}.norm.weight", f"{t}.norm.weight"
        for i in range(self.cfg.num_hidden_layers):
            o, m = f"{t}.layers.{i}", f"{t}.layers.{i}"
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                yield f"{o}.self_attn.{proj}.weight", f"{m}.attn.{proj}.weight"
                if self.cfg.attention_bias:
                    yield f"{o}.self_attn.{proj}.bias", f"{m}.attn.{proj}.bias"
            for proj in ("gate_proj", "up_proj", "down_proj"):
                yield f"{o}.mlp.{proj}.weight", f"{m}.mlp.{proj}.weight"
            yield f"{o}.input_layernorm.weight", f"{m}.attn_norm.weight"
            yield f"{o}.post_attention_layernorm.weight", f"{m}.mlp_norm.weight"
            yield f"{o}.self_attn_layer_scale.scale", f"{m}.attn_scale"
            yield f"{o}.mlp_layer_scale.scale", f"{m}.mlp_scale"
        for i in range(len(self.cfg.upsampling_ratios)):
            for p in ("weight", "bias"):
                yield f"upsample.{i}.0.conv.{p}", f"upsample.{i}.conv.{p}"
                yield f"upsample.{i}.1.dwconv.conv.{p}", f"upsample.{i}.convnext.dwconv.{p}"
                yield f"upsample.{i}.1.norm.{p}", f"upsample.{i}.convnext.norm.{p}"
                yield f"upsample.{i}.1.pwconv1.{p}", f"upsample.{i}.convnext.pwconv1.{p}"
                yield f"upsample.{i}.1.pwconv2.{p}", f"upsample.{i}.convnext.pwconv2.{p}"
            yield f"upsample.{i}.1.gamma", f"upsample.{i}.convnext.gamma"
        # The official `decoder` list: [conv, block_0 .. block_{n-1}, SnakeBeta, conv].
        for p in ("weight", "bias"):
            yield f"decoder.0.conv.{p}", f"head_conv.{p}"
        n = len(self.cfg.upsample_rates)
        for b in range(n):
            o, m = f"decoder.{b + 1}.block", f"blocks.{b}"
            yield f"{o}.0.alpha", f"{m}.act.log_alpha"
            yield f"{o}.0.beta", f"{m}.act.log_beta"
            for p in ("weight", "bias"):
                yield f"{o}.1.conv.{p}", f"{m}.upsample.{p}"
            for j in range(3):
                ou, mu = f"{o}.{j + 2}", f"{m}.res_units.{j}"
                for act in ("act1", "act2"):
                    yield f"{ou}.{act}.alpha", f"{mu}.{act}.log_alpha"
                    yield f"{ou}.{act}.beta", f"{mu}.{act}.log_beta"
                for conv in ("conv1", "conv2"):
                    for p in ("weight", "bias"):
                        yield f"{ou}.{conv}.conv.{p}", f"{mu}.{conv}.{p}"
        yield f"decoder.{n + 1}.alpha", "final_act.log_alpha"
        yield f"decoder.{n + 1}.beta", "final_act.log_beta"
        for p in ("weight", "bias"):
            yield f"decoder.{n + 2}.conv.{p}", f"final_conv.{p}"

    def official_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every `decoder.*` tensor of the official checkpoint with its shape (our view of it)."""
        params = dict(self.named_parameters())
        shapes = {}
        for official, ours in self.official_parameter_names():
            shape = tuple(params[ours].shape)
            if official.endswith("output_proj.weight") and official.startswith("quantizer."):
                shape = shape + (1,)  # stored as a Conv1d k=1 weight
            shapes["decoder." + official] = shape
        K, vq_dim = self.cfg.codebook_size, self.cfg.codebook_dim // 2
        for group, count in (("rvq_first", 1), ("rvq_rest", self.cfg.num_quantizers - 1)):
            # input_proj is the encoder-side projection; present in the checkpoint, unused by decode.
            shapes[f"decoder.quantizer.{group}.input_proj.weight"] = (vq_dim, self.cfg.codebook_dim, 1)
            for q in range(count):
                cb = f"decoder.quantizer.{group}.vq.layers.{q}._codebook"
                shapes[f"{cb}.cluster_usage"] = (K,)
                shapes[f"{cb}.embedding_sum"] = (K, vq_dim)
        return shapes

    @torch.no_grad()
    def load_official_state_dict(self, sd: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Load official `decoder.*` tensors (other keys, e.g. `encoder.*`, are ignored).

        Raises ValueError on a missing tensor, on a wrong shape (naming the tensor and both shapes),
        and, when `strict`, on an unexpected `decoder.*` tensor.
        """
        expected = self.official_shapes()
        given = {k: v for k, v in sd.items() if k.startswith("decoder.")}
        missing = sorted(set(expected) - set(given))
        if missing:
            raise ValueError(f"speech tokenizer weights: {len(missing)} decoder tensors missing, e.g. {missing[:5]}")
        unexpected = sorted(set(given) - set(expected))
        if strict and unexpected:
            raise ValueError(f"speech tokenizer weights: unexpected decoder tensors {unexpected[:5]}")
        for name, shape in expected.items():
            if tuple(given[name].shape) != shape:
                raise ValueError(
                    f"speech tokenizer weight {name}: expected shape {shape}, got {tuple(given[name].shape)}"
                )

        params = dict(self.named_parameters())
        for official, ours in self.official_parameter_names():
            p = params[ours]
            p.copy_(given["decoder." + official].reshape(p.shape).to(p.dtype))

        # Codebook rows = embedding_sum / clamp(cluster_usage, 1e-5), in fp32, then cast.
        rows = []
        for q in range(self.cfg.num_quantizers):
            group, idx = ("rvq_first", 0) if q == 0 else ("rvq_rest", q - 1)
            cb = f"decoder.quantizer.{group}.vq.layers.{idx}._codebook"
            usage = given[f"{cb}.cluster_usage"].float().clamp(min=1e-5)
            rows.append(given[f"{cb}.embedding_sum"].float() / usage[:, None])
        codebooks = self.quantizer.codebooks
        codebooks.copy_(torch.stack(rows).to(device=codebooks.device, dtype=codebooks.dtype))

    @classmethod
    def from_state_dict(cls, cfg: CodecDecoderConfig, sd: dict[str, torch.Tensor], device=None, dtype=None) -> "CodecDecoder":
        """Build, load official weights, move to device/dtype, eval mode."""
        model = cls(cfg)
        model.load_official_state_dict(sd)
        return model.to(device=device, dtype=dtype).eval()

    @classmethod
    def from_pretrained(cls, speech_tokenizer_dir: str | Path, device=None, dtype=None) -> "CodecDecoder":
        """Load from a speech_tokenizer/ folder (config.json + model.safetensors)."""
        from safetensors.torch import load_file

        d = Path(speech_tokenizer_dir)
        cfg = CodecDecoderConfig.from_json_dict(json.loads((d / "config.json").read_text()))
        sd = load_file(str(d / "model.safetensors"))
        return cls.from_state_dict(cfg, sd, device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------


GRAPH_SIZES = (8, 4, 2, 1)  # frames per captured graph; a chunk of any length is a sequence of these
GRAPHS_ENV = "QWEN_TTS_MK_CODEC_GRAPHS"  # "0": streams decode eagerly even on CUDA (for debugging)


def graph_sizes(frames: int) -> list[int]:
    """A chunk of `frames` frames as graph sizes, largest first: 3 -> [2, 1], 13 -> [8, 4, 1]."""
    sizes = []
    for size in GRAPH_SIZES:
        while frames >= size:
            sizes.append(size)
            frames -= size
    return sizes


def use_codec_graphs(decoder: CodecDecoder) -> bool:
    """Whether streams of `decoder` replay CUDA graphs by default: on CUDA, unless QWEN_TTS_MK_CODEC_GRAPHS=0."""
    return decoder.device.type == "cuda" and os.environ.get(GRAPHS_ENV, "1") != "0"


class CodecGraphs:
    """`CodecDecoder.forward` on one static state, captured as a CUDA graph per chunk size in GRAPH_SIZES and
    shared by every stream of the decoder.

    A push of n frames copies the stream's own StaticDecoderState into the captured one, replays the sizes of
    `graph_sizes(n)` in order (exact: streaming decode is exact for any chunking), and copies the state back.
    A size is captured at its first use, or all of them by `warm_up()`. One push at a time (a lock), and every
    caller on the same CUDA stream. Off CUDA the same steps run eagerly, which is how the CPU tests check them.
    """

    def __init__(self, decoder: CodecDecoder):
        self.decoder = decoder
        self.use_graphs = decoder.device.type == "cuda"
        self.lock = threading.Lock()
        self.state = StaticDecoderState(decoder)  # the captured state, scratch between pushes
        self.codes = {n: torch.zeros(1, n, decoder.cfg.num_quantizers, dtype=torch.long, device=decoder.device)
                      for n in GRAPH_SIZES}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # Graph outputs [1, n * samples_per_frame]. All sizes capture into one memory pool, so an output may lie
        # in memory another size uses for its intermediates: each is copied out right after its replay.
        self.wavs: dict[int, torch.Tensor] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Capture every size now, so that no stream pays the capture time (nothing to do off CUDA)."""
        with self.lock:
            self._capture_missing(GRAPH_SIZES)

    @torch.inference_mode()
    def push(self, state: StaticDecoderState, codes: torch.Tensor) -> torch.Tensor:
        """codes [n, Q] (long, on the decoder's device) -> wav [n * samples_per_frame]; continues `state`."""
        spf = self.decoder.samples_per_frame
        wav = torch.empty(codes.shape[0] * spf, device=codes.device)
        with self.lock:
            sizes = graph_sizes(codes.shape[0])
            self._capture_missing(sizes)  # before the copy in: capturing runs the decoder on self.state
            self.state.copy_(state)
            start = 0
            for n in sizes:
                self.codes[n].copy_(codes[start : start + n].unsqueeze(0))
                wav[start * spf : (start + n) * spf].copy_(self._run(n)[0])
                start += n
            state.copy_(self.state)
        return wav

    def _run(self, n: int) -> torch.Tensor:
        if not self.use_graphs:
            return self.decoder(self.codes[n], self.state)
        self.graphs[n].replay()
        return self.wavs[n]

    def _capture_missing(self, sizes) -> None:
        for n in sizes:
            if self.use_graphs and n not in self.graphs:
                self._capture(n)

    def _capture(self, n: int) -> None:
        """Warm up on a side stream (lazy initialisation, kernel choice), then capture one n-frame forward.
        Both run on self.state, which every push overwrites first."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self.decoder(self.codes[n], self.state)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.wavs[n] = self.decoder(self.codes[n], self.state)
        self.graphs[n] = graph


class StreamingCodecDecoder:
    """Exact frame-by-frame decoding of one utterance: the concatenation of `push` outputs equals
    `decoder.decode(all_codes)` (up to float rounding) for any chunk schedule.

    The carried state is bounded: conv tails, transposed-conv overlaps, and per layer the K/V of the
    last sliding_window - 1 frames. Several streams may share one CodecDecoder.

    `use_graphs` (default: `use_codec_graphs(decoder)`, i.e. on CUDA) pushes through the decoder's shared
    CodecGraphs with a StaticDecoderState of this stream's own; otherwise the decoder runs eagerly on a
    DecoderState. With use_graphs=True off CUDA, CodecGraphs runs its fixed-size steps eagerly.
    """

    def __init__(self, decoder: CodecDecoder, use_graphs: bool | None = None):
        self.decoder = decoder
        use_graphs = use_codec_graphs(decoder) if use_graphs is None else use_graphs
        self.graphs = decoder.streaming_graphs() if use_graphs else None
        self.reset()

    @torch.inference_mode()
    def reset(self) -> None:
        """Forget the utterance; the next push starts a new one."""
        self.state: State = DecoderState() if self.graphs is None else StaticDecoderState(self.decoder)
        self.frames_pushed = 0

    @torch.inference_mode()
    def push(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [n, Q] (n >= 1 new frames) -> wav [n * samples_per_frame] for exactly those frames."""
        codes = self.decoder._check_codes(codes)
        if self.graphs is None:
            wav = self.decoder(codes[None], self.state)[0]
        else:
            wav = self.graphs.push(self.state, codes)
        self.frames_pushed += codes.shape[0]
        return wav
