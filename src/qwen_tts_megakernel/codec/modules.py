"""The codec decoder's layers (causal convolutions, SnakeBeta, ConvNeXt, sliding-window attention) and the streaming
state they carry.

Every stateful module reads its slot `state.get(self.state_key)` before it writes it (`state[self.state_key] = value`),
so one code path serves both forms of the state:

  * `DecoderState`, a dict that starts empty and grows: a whole-utterance decode (conv tails and overlaps count as
    zeros at the start, the attention cache holds the frames seen so far, the position is a Python int);
  * `BatchState`, B streams at fixed shapes in one flat buffer [B, size] plus positions [B] (a device tensor): the
    attention cache always holds window - 1 frames (zero slots at negative positions, masked, until it fills). This
    is what streaming and CUDA graphs use (codec/streaming.py).

What a stream carries is bounded (it does not grow with the utterance):

  * CausalConv1d:           the last (kernel-1)*dilation input columns
  * CausalConvTranspose1d:  the (kernel-stride) output samples that overlap the next chunk
  * Attention:              keys (after RoPE) and values of the last sliding_window-1 frames
  * PreTransformer:         the absolute position of the next frame (RoPE keeps counting)

Conv modules take and return channels-first [B, C, T]; the transformer works on [B, T, C].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import CodecDecoderConfig
from ..layers import RMSNorm, apply_rope, rope_cos_sin

ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu}  # the names config.CODEC_ACTIVATIONS accepts


# ---------------------------------------------------------------------------------------------
# Streaming state
# ---------------------------------------------------------------------------------------------


class DecoderState(dict):
    """One utterance's carried state by module name, grown as it goes (see the module docstring). Stores a copy of
    each tensor written, so no chunk's activations stay alive."""

    def __setitem__(self, key: str, value) -> None:
        if isinstance(value, torch.Tensor):
            value = value.clone()
        elif isinstance(value, tuple):
            value = tuple(v.clone() for v in value)
        super().__setitem__(key, value)


class BatchState:
    """The carried state of `batch` streams at fixed shapes: `values` [batch, size] (every module's tensors are views
    of it) and `position` [batch] (long), both written in place. Zeros are a new utterance.

    `layout` is `state_layout(decoder)`. A state can be made over given buffers (`values`, `position`), which is
    how `gather` makes the working state of a few slots of a larger one (the slot store of codec/streaming.py).
    """

    def __init__(self, layout: StateLayout, batch: int, *, like: torch.Tensor | None = None,
                 values: torch.Tensor | None = None, position: torch.Tensor | None = None):
        self.layout = layout
        if values is None:
            values = torch.zeros(batch, layout.size, dtype=like.dtype, device=like.device)
            position = torch.zeros(batch, dtype=torch.long, device=like.device)
        self.values, self.position = values, position
        self.slots: dict[str, torch.Tensor | tuple[torch.Tensor, ...]] = {layout.position_key: position}
        for key, entries in layout.entries.items():
            views = tuple(values[:, offset : offset + math.prod(shape)].view(batch, *shape)
                          for offset, shape in entries)
            self.slots[key] = views[0] if len(views) == 1 else views

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

    def gather(self, rows: torch.Tensor) -> BatchState:
        """A new state holding copies of rows `rows` [b] (a long device tensor) of this one."""
        return BatchState(self.layout, rows.shape[0], values=self.values.index_select(0, rows),
                          position=self.position.index_select(0, rows))

    def scatter(self, rows: torch.Tensor, part: BatchState) -> None:
        """Write `part` (from `gather(rows)`) back into rows `rows`. A row repeated in `rows` gets one of its copies."""
        self.values.index_copy_(0, rows, part.values)
        self.position.index_copy_(0, rows, part.position)


State = DecoderState | BatchState


class StateLayout:
    """Where each stateful module's tensors lie in a BatchState row: key -> ((offset, shape), ...)."""

    def __init__(self, decoder: nn.Module):
        self.entries: dict[str, tuple[tuple[int, tuple[int, ...]], ...]] = {}
        self.position_key = ""
        offset = 0
        for module in decoder.modules():
            if isinstance(module, PreTransformer):
                self.position_key = module.state_key
            if isinstance(module, Stateful) and module.state_shapes():
                entries = []
                for shape in module.state_shapes():
                    entries.append((offset, shape))
                    offset += math.prod(shape)
                self.entries[module.state_key] = tuple(entries)
        self.size = offset  # floats per stream


class Stateful(nn.Module):
    """A module that carries streaming state; `state_key` is set to its module path by CodecDecoder."""

    state_key: str = ""

    def state_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Shapes of the tensors it carries for one stream (no batch dimension) in a BatchState."""
        return ()


# ---------------------------------------------------------------------------------------------
# Convolutional layers
# ---------------------------------------------------------------------------------------------


class CausalConv1d(Stateful):
    """Conv1d (stride 1) left-padded so output t sees inputs t-(k-1)*dilation .. t. [B,Cin,T] -> [B,Cout,T].

    The left padding is the previous chunk's last (k-1)*dilation input columns, zeros at the start,
    which is exactly the official zero left-padding when the whole utterance is one chunk. The input is cast to the
    weight's dtype (a bf16 layer of StreamingCodec's "bf16" precision returns bf16; the next sum promotes it back).
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, dilation: int = 1, groups: int = 1):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_ch, in_ch // groups, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_ch))
        self.dilation, self.groups = dilation, groups
        self.context = (kernel_size - 1) * dilation  # input columns carried between chunks

    def state_shapes(self) -> tuple[tuple[int, ...], ...]:
        return ((self.weight.shape[1] * self.groups, self.context),) if self.context else ()

    def forward(self, x: torch.Tensor, state: State) -> torch.Tensor:
        if self.context:
            tail = state.get(self.state_key)
            if tail is None:
                tail = x.new_zeros(x.shape[0], x.shape[1], self.context)
            x = torch.cat([tail, x], dim=-1)  # [B, Cin, context + T]
            state[self.state_key] = x[..., -self.context :]
        return F.conv1d(x.to(self.weight.dtype), self.weight, self.bias, dilation=self.dilation, groups=self.groups)


class CausalConvTranspose1d(Stateful):
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
        return ((self.weight.shape[1], self.overlap),) if self.overlap else ()

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
    """x + 1/beta * sin^2(alpha * x), per channel.

    The checkpoint stores log(alpha) and log(beta); loading (codec/weights.py) stores `alpha` = exp(log alpha) and
    `inv_beta` = 1 / (exp(log beta) + 1e-9), the official forward's own fp32 expressions, computed once.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))
        self.inv_beta = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T]
        s = torch.sin(x * self.alpha[:, None])
        return torch.addcmul(x, s * s, self.inv_beta[:, None])


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
    the sum of codebooks 1..Q-1 ("acoustic") through `rest_proj`; the two are added. All Q rows of a frame are
    read in one lookup (row q * K + code of the flattened codebooks).
    """

    def __init__(self, cfg: CodecDecoderConfig):
        super().__init__()
        vq_dim = cfg.codebook_dim // 2
        self.register_buffer("codebooks", torch.zeros(cfg.num_quantizers, cfg.codebook_size, vq_dim))
        self.register_buffer("offsets", torch.arange(cfg.num_quantizers) * cfg.codebook_size, persistent=False)
        self.first_proj = nn.Linear(vq_dim, cfg.codebook_dim, bias=False)
        self.rest_proj = nn.Linear(vq_dim, cfg.codebook_dim, bias=False)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(codes + self.offsets, self.codebooks.flatten(0, 1))  # [B, T, Q, vq_dim]
        return self.first_proj(rows[..., 0, :]) + self.rest_proj(rows[..., 1:, :].sum(dim=-2))


# ---------------------------------------------------------------------------------------------
# Pre-transformer: sliding-window causal attention at the frame rate
# ---------------------------------------------------------------------------------------------


class Attention(Stateful):
    """Causal self-attention over the last `window` frames, with RoPE and grouped K/V heads.

    x [B, T, C] -> [B, T, C]. The state holds keys (after RoPE) and values of the previous P frames (window - 1 in
    a BatchState, fewer at the start of a DecoderState); cos/sin [B or 1, 1, T, D] and the visibility `mask`
    [B or 1, 1, T, P + T] come from PreTransformer, shared by all layers.
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
        return ((self.n_kv_head, keep, self.head_dim),) * 2 if keep > 0 else ()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                state: State) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        # Prepend the cached frames: keys/values now cover the P frames before this chunk and its T frames.
        cached = state.get(self.state_key)
        if cached is not None:
            k = torch.cat([cached[0], k], dim=2)
            v = torch.cat([cached[1], v], dim=2)
        keep = self.window - 1
        if keep > 0:
            state[self.state_key] = (k[:, :, -keep:], v[:, :, -keep:])

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
        self.act = ACTIVATIONS[cfg.hidden_act]

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

    def forward(self, x, cos, sin, mask: torch.Tensor, state: State) -> torch.Tensor:
        x = x + self.attn_scale * self.attn(self.attn_norm(x), cos, sin, mask, state)
        return x + self.mlp_scale * self.mlp(self.mlp_norm(x))


class PreTransformer(Stateful):
    """input_proj (latent -> hidden), layers, RMSNorm, output_proj (hidden -> latent). [B,T,L] -> [B,T,L].

    The state holds the absolute position of the next frame (an int in a DecoderState, a [B] device tensor in a
    BatchState); RoPE only sees relative offsets inside the window, but counting on keeps streaming bit-compatible
    with a whole-utterance pass.
    """

    def __init__(self, cfg: CodecDecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.input_proj = nn.Linear(cfg.latent_dim, cfg.hidden_size)
        self.layers = nn.ModuleList([TransformerLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.output_proj = nn.Linear(cfg.hidden_size, cfg.latent_dim)

    def forward(self, x: torch.Tensor, state: State) -> torch.Tensor:
        h = self.input_proj(x)
        start, cos, sin, mask = self.rope_and_mask(state, x.shape[1], h)
        for layer in self.layers:
            h = layer(h, cos, sin, mask, state)
        state[self.state_key] = start + x.shape[1]  # last: in a BatchState, `start` is the counter itself
        return self.output_proj(self.norm(h))

    def rope_and_mask(self, state: State, T: int, h: torch.Tensor):
        """What every layer of a T-frame chunk shares: (start, cos, sin, mask). `start` is the position of the chunk's
        first frame (the state's counter), cos/sin [B or 1, 1, T, D] in h's dtype, mask [B or 1, 1, T, P + T]."""
        start = state.get(self.state_key, 0)
        pos0 = start if isinstance(start, torch.Tensor) else torch.full((1,), start, device=h.device)
        positions = pos0[:, None] + torch.arange(T, device=h.device)  # [B or 1, T]
        cos, sin = rope_cos_sin(positions.reshape(-1), self.cfg.head_dim, self.cfg.rope_theta, h.dtype)
        cos, sin = (t.view(positions.shape[0], 1, T, -1) for t in (cos, sin))
        # Key j is visible to query i iff i - window < j <= i (absolute positions) and j >= 0 (a BatchState's cache
        # starts as zero slots at negative positions). The keys are the P cached frames, then this chunk's T.
        cached = state.get(self.layers[0].attn.state_key) if self.layers else None
        P = 0 if cached is None else cached[0].shape[2]
        q_pos = positions[:, None, :, None]
        k_pos = (pos0[:, None] - P + torch.arange(P + T, device=h.device))[:, None, None, :]
        mask = (k_pos <= q_pos) & (k_pos > q_pos - self.cfg.sliding_window) & (k_pos >= 0)  # [B or 1, 1, T, P + T]
        return start, cos, sin, mask
