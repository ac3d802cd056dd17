"""The speech tokenizer's encoder: 24 kHz audio -> 16 codebooks at 12.5 Hz (the reference codes of in-context
voice cloning). A Mimi encoder (qwen3-tts-model.md section 5), in plain PyTorch:

    audio [N] -> SEANet: causal conv k7, then per stride r in (4, 5, 6, 8): residual unit (ELU, conv k3, ELU,
                 conv k1) + ELU + strided conv k2r            (960 samples per step: 25 Hz)
              -> ELU, conv k3 -> transformer (pre-LayerNorm, causal attention with RoPE, GELU MLP, LayerScale)
              -> causal strided conv k4 s2 (replicate padding)                        -> 12.5 Hz latents
              -> split residual VQ: 1 semantic codebook + the first 15 acoustic ones   -> codes [T, 16]

Causal convs pad (k_eff - stride) zeros on the left and enough on the right to make the length a multiple of the
stride. The transformer attends causally over the whole clip (transformers 4.57's Mimi ignores the configured
sliding window in this path, and so do we). Parameter names follow the official checkpoint's "encoder.*" tensors
in speech_tokenizer/model.safetensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .layers import apply_rope, rope_cos_sin


@dataclass(frozen=True)
class CodecEncoderConfig:
    """speech_tokenizer/config.json "encoder_config" (a MimiConfig; missing keys take its defaults) plus the
    number of codebooks kept (encoder_valid_num_quantizers)."""

    audio_channels: int = 1
    num_filters: int = 64
    kernel_size: int = 7
    residual_kernel_size: int = 3
    last_kernel_size: int = 3
    dilation_growth_rate: int = 2
    num_residual_layers: int = 1
    compress: int = 2
    upsampling_ratios: tuple[int, ...] = (8, 6, 5, 4)
    pad_mode: str = "constant"
    use_causal_conv: bool = True
    use_conv_shortcut: bool = False
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 8
    head_dim: int | None = None
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    hidden_act: str = "gelu"
    attention_bias: bool = False
    codebook_size: int = 2048
    codebook_dim: int = 256
    vector_quantization_hidden_dimension: int = 256
    num_quantizers: int = 32
    num_semantic_quantizers: int = 1
    sampling_rate: int = 24000
    valid_num_quantizers: int = 16

    @classmethod
    def from_json_dict(cls, d: dict[str, Any]) -> "CodecEncoderConfig":
        """From a speech_tokenizer/config.json dict."""
        enc = d.get("encoder_config") or {}
        known = set(cls.__dataclass_fields__)
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in enc.items() if k in known}
        values["valid_num_quantizers"] = int(d.get("encoder_valid_num_quantizers", 16))
        cfg = cls(**values)
        if cfg.head_dim is None:
            cfg = cls(**{**values, "head_dim": cfg.hidden_size // cfg.num_attention_heads})
        if not cfg.use_causal_conv or cfg.use_conv_shortcut or cfg.hidden_act != "gelu" or cfg.audio_channels != 1:
            raise ValueError("speech tokenizer encoder_config: only the causal, mono, GELU Mimi encoder without "
                             "conv shortcuts is supported")
        if cfg.codebook_dim != cfg.vector_quantization_hidden_dimension:
            raise ValueError("speech tokenizer encoder_config: codebook_dim must equal "
                             "vector_quantization_hidden_dimension")
        if not cfg.num_semantic_quantizers <= cfg.valid_num_quantizers <= cfg.num_quantizers:
            raise ValueError(f"encoder_valid_num_quantizers {cfg.valid_num_quantizers} is outside "
                             f"[{cfg.num_semantic_quantizers}, {cfg.num_quantizers}]")
        return cfg

    @property
    def samples_per_frame(self) -> int:
        """Input samples per code frame: the SEANet strides times the final stride 2 (1920 at 24 kHz)."""
        return math.prod(self.upsampling_ratios) * 2


class CausalConv1d(nn.Module):
    """Conv1d with causal padding: (k_eff - stride) on the left (zeros, or edge copies for "replicate"), and on the
    right up to a multiple of the stride. [B, C_in, N] -> [B, C_out, ceil(N / stride)]."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, dilation: int = 1, bias: bool = True,
                 pad_mode: str = "constant"):
        super().__init__()
        self.conv = nn.Conv1d(in_ch, out_ch, kernel, stride, dilation=dilation, bias=bias)
        self.stride, self.pad_mode = stride, pad_mode
        self.left = (kernel - 1) * dilation + 1 - stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[-1]
        right = -(-n // self.stride) * self.stride - n
        return self.conv(F.pad(x, (self.left, right), mode=self.pad_mode))


class ResidualUnit(nn.Module):
    """x + conv_k1(elu(conv_k(elu(x)))), the inner width halved ("compress"); `block` indices match the official
    names (block.1 and block.3 are the convolutions)."""

    def __init__(self, cfg: CodecEncoderConfig, dim: int, dilation: int):
        super().__init__()
        hidden = dim // cfg.compress
        self.block = nn.ModuleList([
            nn.ELU(), CausalConv1d(dim, hidden, cfg.residual_kernel_size, dilation=dilation, pad_mode=cfg.pad_mode),
            nn.ELU(), CausalConv1d(hidden, dim, 1, pad_mode=cfg.pad_mode)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for layer in self.block:
            y = layer(y)
        return x + y


class SEANetEncoder(nn.Module):
    """Audio [B, 1, N] -> latents [B, hidden, N / 960] (module list indices match the official names)."""

    def __init__(self, cfg: CodecEncoderConfig):
        super().__init__()
        layers: list[nn.Module] = [CausalConv1d(1, cfg.num_filters, cfg.kernel_size, pad_mode=cfg.pad_mode)]
        width = cfg.num_filters
        for ratio in reversed(cfg.upsampling_ratios):
            for j in range(cfg.num_residual_layers):
                layers.append(ResidualUnit(cfg, width, cfg.dilation_growth_rate ** j))
            layers += [nn.ELU(), CausalConv1d(width, width * 2, ratio * 2, stride=ratio, pad_mode=cfg.pad_mode)]
            width *= 2
        layers += [nn.ELU(), CausalConv1d(width, cfg.hidden_size, cfg.last_kernel_size, pad_mode=cfg.pad_mode)]
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x


class SelfAttention(nn.Module):
    def __init__(self, cfg: CodecEncoderConfig):
        super().__init__()
        self.cfg = cfg
        q_dim, kv_dim = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, q_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(q_dim, cfg.hidden_size, bias=cfg.attention_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, T, hidden] -> [B, T, hidden], causal over T."""
        cfg, (b, t, _) = self.cfg, x.shape
        q = self.q_proj(x).view(b, t, cfg.num_attention_heads, cfg.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        group = cfg.num_attention_heads // cfg.num_key_value_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 / math.sqrt(cfg.head_dim))
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: CodecEncoderConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class TransformerLayer(nn.Module):
    def __init__(self, cfg: CodecEncoderConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.self_attn = SelfAttention(cfg)
        self.self_attn_layer_scale = LayerScale(cfg.hidden_size)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.mlp_layer_scale = LayerScale(cfg.hidden_size)

    def forward(self, x, cos, sin):
        x = x + self.self_attn_layer_scale(self.self_attn(self.input_layernorm(x), cos, sin))
        return x + self.mlp_layer_scale(self.mlp(self.post_attention_layernorm(x)))


class Transformer(nn.Module):
    def __init__(self, cfg: CodecEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(TransformerLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cos, sin = rope_cos_sin(torch.arange(x.shape[1], device=x.device), self.cfg.head_dim, self.cfg.rope_theta,
                                x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return x


class Codebook(nn.Module):
    """Euclidean codebook: rows embed_sum / max(cluster_usage, 1e-5); a vector's code is its nearest row."""

    def __init__(self, cfg: CodecEncoderConfig):
        super().__init__()
        self.register_buffer("initialized", torch.ones(1))
        self.register_buffer("cluster_usage", torch.ones(cfg.codebook_size))
        self.register_buffer("embed_sum", torch.zeros(cfg.codebook_size, cfg.codebook_dim))

    def embed(self) -> torch.Tensor:
        return self.embed_sum / self.cluster_usage.clamp(min=1e-5)[:, None]

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> (codes [T], their rows [T, D])."""
        table = self.embed()
        codes = torch.cdist(x[None].float(), table[None].float(), p=2)[0].argmin(dim=-1)
        return codes, table[codes]


class _CodebookHolder(nn.Module):
    def __init__(self, cfg: CodecEncoderConfig):
        super().__init__()
        self.codebook = Codebook(cfg)


class ResidualVQ(nn.Module):
    """Project latents [hidden] -> [codebook_dim], then quantize the residual codebook by codebook."""

    def __init__(self, cfg: CodecEncoderConfig, num_quantizers: int):
        super().__init__()
        self.layers = nn.ModuleList(_CodebookHolder(cfg) for _ in range(num_quantizers))
        if cfg.vector_quantization_hidden_dimension != cfg.hidden_size:
            self.input_proj = nn.Conv1d(cfg.hidden_size, cfg.vector_quantization_hidden_dimension, 1, bias=False)
            self.output_proj = nn.Conv1d(cfg.vector_quantization_hidden_dimension, cfg.hidden_size, 1, bias=False)
        else:
            self.input_proj = self.output_proj = None

    def encode(self, latents: torch.Tensor, count: int) -> torch.Tensor:
        """latents [1, hidden, T] -> codes [count, T] from the first `count` codebooks."""
        x = self.input_proj(latents) if self.input_proj is not None else latents
        residual = x[0].T
        codes = []
        for holder in self.layers[:count]:
            idx, rows = holder.codebook.encode(residual)
            residual = residual - rows
            codes.append(idx)
        return torch.stack(codes)


class SplitResidualVQ(nn.Module):
    def __init__(self, cfg: CodecEncoderConfig):
        super().__init__()
        self.num_semantic = cfg.num_semantic_quantizers
        self.semantic_residual_vector_quantizer = ResidualVQ(cfg, cfg.num_semantic_quantizers)
        self.acoustic_residual_vector_quantizer = ResidualVQ(cfg, cfg.num_quantizers - cfg.num_semantic_quantizers)

    def encode(self, latents: torch.Tensor, count: int) -> torch.Tensor:
        """The semantic codebooks, then the first (count - semantic) acoustic ones, each RVQ from the same latents."""
        codes = self.semantic_residual_vector_quantizer.encode(latents, self.num_semantic)
        if count > self.num_semantic:
            rest = self.acoustic_residual_vector_quantizer.encode(latents, count - self.num_semantic)
            codes = torch.cat([codes, rest])
        return codes


class CodecEncoder(nn.Module):
    """Audio -> codes (state-dict prefix "encoder." of speech_tokenizer/model.safetensors)."""

    def __init__(self, cfg: CodecEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = SEANetEncoder(cfg)
        self.encoder_transformer = Transformer(cfg)
        self.downsample = CausalConv1d(cfg.hidden_size, cfg.hidden_size, 4, stride=2, bias=False,
                                       pad_mode="replicate")
        self.quantizer = SplitResidualVQ(cfg)

    @classmethod
    def from_state_dict(cls, cfg: CodecEncoderConfig, weights: dict[str, torch.Tensor], device=None,
                        dtype: torch.dtype = torch.float32) -> "CodecEncoder":
        """From the speech tokenizer's tensors (keys "encoder.*"; others are ignored). A missing or misshapen
        tensor raises naming it."""
        model = cls(cfg)
        own = {k[len("encoder."):]: v for k, v in weights.items() if k.startswith("encoder.")}
        for name, t in model.state_dict().items():
            if name not in own:
                raise ValueError(f"speech tokenizer tensor encoder.{name} is missing: this checkpoint cannot encode "
                                 "reference audio")
            if tuple(own[name].shape) != tuple(t.shape):
                raise ValueError(f"speech tokenizer tensor encoder.{name} has shape {list(own[name].shape)}, the "
                                 f"config implies {list(t.shape)}")
        model.load_state_dict(own, strict=False)
        return model.to(device=device, dtype=dtype).eval()

    @torch.inference_mode()
    def encode(self, audio: np.ndarray | torch.Tensor) -> np.ndarray:
        """Mono 24 kHz samples [N] -> codes [ceil(N / 1920), valid_num_quantizers] int64."""
        p = self.downsample.conv.weight
        x = torch.as_tensor(np.asarray(audio, dtype=np.float32), device=p.device).to(p.dtype)
        if x.ndim != 1 or len(x) == 0:
            raise ValueError(f"expected mono samples [N] with N > 0, got shape {list(x.shape)}")
        latents = self.encoder(x[None, None])
        latents = self.encoder_transformer(latents.transpose(1, 2)).transpose(1, 2)
        latents = self.downsample(latents)
        codes = self.quantizer.encode(latents, self.cfg.valid_num_quantizers)
        frames = -(-len(x) // self.cfg.samples_per_frame)
        return codes[:, :frames].T.cpu().numpy().astype(np.int64)


def codec_encoder_shapes(cfg: CodecEncoderConfig) -> dict[str, tuple[int, ...]]:
    """Official tensor names ("encoder.*") and shapes for `cfg`."""
    with torch.device("meta"):
        return {"encoder." + k: tuple(v.shape) for k, v in CodecEncoder(cfg).state_dict().items()}
