"""The codec decoder: Qwen3-TTS-Tokenizer-12Hz codes -> 24 kHz waveform, one causal pass that can continue a stream.

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

Every layer is causal with zero lookahead, so the decoder can run frame by frame with carried state and give the
same samples as one pass over the whole utterance: `CodecDecoder.forward(codes, state)` consumes a chunk of frames
and updates `state` in place (codec/modules.py describes the state). `decode` is one call with a fresh state;
codec/streaming.py keeps many streams' states between calls.

Versus the official `Qwen3TTSTokenizerV2Model.decode`: that calls `chunked_decode(chunk_size=300,
left_context_size=25)`, i.e. it re-decodes 300-frame chunks with only 25 frames of left context and
drops the context's samples. For T <= 300 frames it is one full pass and equal to ours up to float
rounding. Beyond 300 frames it differs from the true causal decode at each chunk boundary (25 < the
72-frame attention window, and the RoPE positions restart); ours is the exact causal decode.
This package does not import the official package or transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import CodecDecoderConfig
from .modules import (
    CausalConv1d,
    DecoderBlock,
    DecoderState,
    PreTransformer,
    RVQDequantizer,
    SnakeBeta,
    State,
    Stateful,
    Upsampler,
)
from .weights import load_official_state_dict


class CodecDecoder(nn.Module):
    """Qwen3-TTS-Tokenizer-12Hz decoder. `decode(codes [T, Q]) -> wav [T * samples_per_frame]`.

    Build with `CodecDecoder.from_pretrained(dir)` or `CodecDecoder.from_state_dict(cfg, official_tensors)`.
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
            if isinstance(module, Stateful):
                module.state_key = name

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

        Continues the streams described by `state` (a new DecoderState, or a BatchState of B streams) and updates
        it in place.
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

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor | np.ndarray) -> torch.Tensor:
        """codes [T, Q] -> wav [T * samples_per_frame] in [-1, 1]: one causal pass over the utterance.

        Equal to the official decode for T <= 300 frames; exact (unchunked) beyond that.
        """
        codes = check_codes(codes, self.cfg)
        if codes.shape[0] < 1:
            raise ValueError("codes must hold at least one frame")
        return self(codes.to(self.device)[None], DecoderState())[0]

    @classmethod
    def from_state_dict(cls, cfg: CodecDecoderConfig, sd: dict[str, torch.Tensor], device=None,
                        dtype=None) -> "CodecDecoder":
        """Build, load official `decoder.*` tensors (codec/weights.py), move to device/dtype, eval mode."""
        model = cls(cfg)
        load_official_state_dict(model, sd)
        return model.to(device=device, dtype=dtype).eval()

    @classmethod
    def from_pretrained(cls, speech_tokenizer_dir: str | Path, device=None, dtype=None) -> "CodecDecoder":
        """Load from a speech_tokenizer/ folder (config.json + model.safetensors)."""
        from safetensors.torch import load_file

        d = Path(speech_tokenizer_dir)
        cfg = CodecDecoderConfig.from_json_dict(json.loads((d / "config.json").read_text()))
        sd = load_file(str(d / "model.safetensors"))
        return cls.from_state_dict(cfg, sd, device=device, dtype=dtype)


def check_codes(codes: torch.Tensor | np.ndarray, cfg: CodecDecoderConfig, name: str = "codes") -> torch.Tensor:
    """`codes` [T, Q] (integers in [0, codebook_size), T may be 0) as a long tensor on its own device; ValueError
    naming `name` otherwise. Checking the range of a device tensor waits for the device."""
    codes = torch.as_tensor(codes)
    if codes.dim() != 2 or codes.shape[1] != cfg.num_quantizers:
        raise ValueError(f"{name} must be [T, {cfg.num_quantizers}], got {tuple(codes.shape)}")
    if codes.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"{name} must be an integer array, got {codes.dtype}")
    if codes.numel():
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= cfg.codebook_size:
            raise ValueError(f"{name} must be in [0, {cfg.codebook_size}), got min {lo} max {hi}")
    return codes.long()
