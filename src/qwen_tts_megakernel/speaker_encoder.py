"""The Base models' speaker encoder: 24 kHz audio -> log-mel (128 bins) -> ECAPA-TDNN -> one x-vector of width H.

The x-vector is the codec term of one talker prefill row (qwen3-tts-model.md sections 1.4 and 2a); it is computed
once per reference clip. Module and parameter names follow the official checkpoint ("speaker_encoder.*"), so its
tensors load without renaming.

    mel [T, 128] -> TDNN(k5) -> 3 x SE-Res2Net(k3, dilation 2/3/4) -> concat -> TDNN(k1) (multi-layer aggregation)
                 -> attentive statistics pooling (mean and std, weighted by a learnt attention over time)
                 -> 1x1 conv -> x-vector [H]

Every convolution pads "same" by reflection, like the official one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SAMPLE_RATE = 24000
N_FFT, HOP, WIN, N_MELS, F_MIN, F_MAX = 1024, 256, 1024, 128, 0.0, 12000.0


@dataclass(frozen=True)
class SpeakerEncoderConfig:
    """config.json "speaker_encoder_config" (Base models); missing keys take the official defaults."""

    enc_dim: int = 1024
    mel_dim: int = N_MELS
    enc_channels: tuple[int, ...] = (512, 512, 512, 512, 1536)
    enc_kernel_sizes: tuple[int, ...] = (5, 3, 3, 3, 1)
    enc_dilations: tuple[int, ...] = (1, 2, 3, 4, 1)
    enc_attention_channels: int = 128
    enc_res2net_scale: int = 8
    enc_se_channels: int = 128
    sample_rate: int = SAMPLE_RATE

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SpeakerEncoderConfig":
        known = {f for f in cls.__dataclass_fields__}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known}
        cfg = cls(**values)
        if not len(cfg.enc_channels) == len(cfg.enc_kernel_sizes) == len(cfg.enc_dilations):
            raise ValueError("speaker_encoder_config: enc_channels, enc_kernel_sizes and enc_dilations differ in "
                             "length")
        if cfg.mel_dim != N_MELS or cfg.sample_rate != SAMPLE_RATE:
            raise ValueError(f"speaker_encoder_config: only {N_MELS} mels at {SAMPLE_RATE} Hz exist, got "
                             f"{cfg.mel_dim} mels at {cfg.sample_rate} Hz")
        return cfg


# ---------------------------------------------------------------------------------------------------------------
# Mel front end


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    mels = f / (200.0 / 3)
    log_region = f >= 1000.0
    mels[log_region] = 15.0 + np.log(f[log_region] / 1000.0) / (math.log(6.4) / 27.0)
    return mels


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    freqs = m * (200.0 / 3)
    log_region = m >= 15.0
    freqs[log_region] = 1000.0 * np.exp((math.log(6.4) / 27.0) * (m[log_region] - 15.0))
    return freqs


def mel_filterbank(sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS, f_min: float = F_MIN,
                   f_max: float = F_MAX) -> torch.Tensor:
    """Triangular slaney-scale filters with slaney (area) normalisation: [n_mels, n_fft // 2 + 1], float32."""
    fft_freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    mel_points = _mel_to_hz(np.linspace(_hz_to_mel(np.array([f_min]))[0], _hz_to_mel(np.array([f_max]))[0],
                                        n_mels + 2))
    widths = np.diff(mel_points)
    ramps = mel_points[:, None] - fft_freqs[None, :]
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= (2.0 / (mel_points[2:] - mel_points[:-2]))[:, None]
    return torch.from_numpy(weights.astype(np.float32))


def log_mel(audio: torch.Tensor, filterbank: torch.Tensor) -> torch.Tensor:
    """24 kHz samples [N] -> log-mel frames [T, 128]: reflect pad (n_fft - hop) / 2, Hann STFT, magnitude,
    mel filters, log(max(x, 1e-5))."""
    pad = (N_FFT - HOP) // 2
    x = F.pad(audio.float()[None, None], (pad, pad), mode="reflect")[0]
    spec = torch.stft(x, N_FFT, hop_length=HOP, win_length=WIN, window=torch.hann_window(WIN, device=x.device),
                      center=False, normalized=False, onesided=True, return_complex=True)
    magnitude = torch.sqrt(torch.view_as_real(spec).pow(2).sum(-1) + 1e-9)
    mel = filterbank.to(magnitude.device) @ magnitude
    return torch.log(torch.clamp(mel, min=1e-5))[0].T


# ---------------------------------------------------------------------------------------------------------------
# ECAPA-TDNN


def _conv(in_ch: int, out_ch: int, kernel: int = 1, dilation: int = 1) -> nn.Conv1d:
    return nn.Conv1d(in_ch, out_ch, kernel, dilation=dilation, padding="same", padding_mode="reflect")


class TimeDelayNetBlock(nn.Module):
    """relu(conv(x)): [B, C_in, T] -> [B, C_out, T]."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, dilation: int):
        super().__init__()
        self.conv = _conv(in_ch, out_ch, kernel, dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(x))


class Res2NetBlock(nn.Module):
    """Split channels into `scale` groups; group 0 passes through, group i > 0 is TDNN(group i + output i-1)."""

    def __init__(self, channels: int, scale: int, kernel: int, dilation: int):
        super().__init__()
        self.scale = scale
        width = channels // scale
        self.blocks = nn.ModuleList(TimeDelayNetBlock(width, width, kernel, dilation) for _ in range(scale - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.chunk(x, self.scale, dim=1)
        out = [parts[0]]
        for i, block in enumerate(self.blocks, start=1):
            out.append(block(parts[i] if i == 1 else parts[i] + out[-1]))
        return torch.cat(out, dim=1)


class SqueezeExcitationBlock(nn.Module):
    """Scale every channel by sigmoid(conv2(relu(conv1(mean over time))))."""

    def __init__(self, channels: int, se_channels: int):
        super().__init__()
        self.conv1 = _conv(channels, se_channels)
        self.conv2 = _conv(se_channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.conv2(F.relu(self.conv1(x.mean(dim=2, keepdim=True)))))
        return x * gate


class SqueezeExcitationRes2NetBlock(nn.Module):
    """x + SE(TDNN(Res2Net(TDNN(x))))."""

    def __init__(self, in_ch: int, out_ch: int, scale: int, se_channels: int, kernel: int, dilation: int):
        super().__init__()
        self.tdnn1 = TimeDelayNetBlock(in_ch, out_ch, 1, 1)
        self.res2net_block = Res2NetBlock(out_ch, scale, kernel, dilation)
        self.tdnn2 = TimeDelayNetBlock(out_ch, out_ch, 1, 1)
        self.se_block = SqueezeExcitationBlock(out_ch, se_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.se_block(self.tdnn2(self.res2net_block(self.tdnn1(x))))


def _mean_std(x: torch.Tensor, weights: torch.Tensor, eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean and standard deviation over time: x [B, C, T], weights [B, C or 1, T] summing to 1."""
    mean = (weights * x).sum(2)
    std = torch.sqrt((weights * (x - mean.unsqueeze(2)).pow(2)).sum(2).clamp(eps))
    return mean, std


class AttentiveStatisticsPooling(nn.Module):
    """[B, C, T] -> [B, 2C, 1]: mean and std over time, weighted by a per-channel attention that sees each frame
    together with the clip's plain mean and std."""

    def __init__(self, channels: int, attention_channels: int):
        super().__init__()
        self.tdnn = TimeDelayNetBlock(channels * 3, attention_channels, 1, 1)
        self.conv = _conv(attention_channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames = x.shape[2]
        uniform = torch.full((x.shape[0], 1, frames), 1.0 / frames, device=x.device, dtype=x.dtype)
        mean, std = _mean_std(x, uniform)
        context = torch.cat([x, mean.unsqueeze(2).expand_as(x), std.unsqueeze(2).expand_as(x)], dim=1)
        attention = F.softmax(self.conv(torch.tanh(self.tdnn(context))), dim=2)
        mean, std = _mean_std(x, attention)
        return torch.cat([mean, std], dim=1).unsqueeze(2)


class SpeakerEncoder(nn.Module):
    """ECAPA-TDNN (state-dict prefix "speaker_encoder."): log-mel [B, T, 128] -> x-vectors [B, enc_dim]."""

    def __init__(self, cfg: SpeakerEncoderConfig):
        super().__init__()
        self.cfg = cfg
        ch, ks, dil = cfg.enc_channels, cfg.enc_kernel_sizes, cfg.enc_dilations
        blocks: list[nn.Module] = [TimeDelayNetBlock(cfg.mel_dim, ch[0], ks[0], dil[0])]
        for i in range(1, len(ch) - 1):
            blocks.append(SqueezeExcitationRes2NetBlock(ch[i - 1], ch[i], cfg.enc_res2net_scale,
                                                        cfg.enc_se_channels, ks[i], dil[i]))
        self.blocks = nn.ModuleList(blocks)
        self.mfa = TimeDelayNetBlock(ch[-1], ch[-1], ks[-1], dil[-1])
        self.asp = AttentiveStatisticsPooling(ch[-1], cfg.enc_attention_channels)
        self.fc = _conv(ch[-1] * 2, cfg.enc_dim)
        self.register_buffer("filterbank", mel_filterbank(), persistent=False)

    @classmethod
    def from_state_dict(cls, cfg: SpeakerEncoderConfig, weights: dict[str, torch.Tensor], device=None,
                        dtype: torch.dtype = torch.float32) -> "SpeakerEncoder":
        """From official tensors (keys "speaker_encoder.*"; others are ignored). A missing or misshapen tensor
        raises naming it."""
        encoder = cls(cfg)
        own = {k[len("speaker_encoder."):]: v for k, v in weights.items() if k.startswith("speaker_encoder.")}
        expected = encoder.state_dict()
        missing = sorted(set(expected) - set(own))
        if missing:
            raise ValueError(f"speaker encoder tensor speaker_encoder.{missing[0]} is missing from the checkpoint "
                             f"({len(missing)} missing): is this a Base model?")
        for name, t in expected.items():
            if tuple(own[name].shape) != tuple(t.shape):
                raise ValueError(f"speaker encoder tensor speaker_encoder.{name} has shape {list(own[name].shape)}, "
                                 f"the config implies {list(t.shape)}")
        encoder.load_state_dict(own, strict=False)
        return encoder.to(device=device, dtype=dtype).eval()

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = mel.transpose(1, 2)
        outputs = []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        x = self.mfa(torch.cat(outputs[1:], dim=1))
        return self.fc(self.asp(x)).squeeze(-1)

    @torch.inference_mode()
    def embed(self, audio: np.ndarray | torch.Tensor) -> torch.Tensor:
        """The x-vector [enc_dim] of one mono 24 kHz clip (float samples in [-1, 1])."""
        p = self.fc.weight
        samples = torch.as_tensor(np.asarray(audio, dtype=np.float32), device=p.device)
        if samples.ndim != 1:
            raise ValueError(f"expected mono samples [N], got shape {list(samples.shape)}")
        if len(samples) <= (N_FFT - HOP) // 2:
            raise ValueError(f"audio too short for the speaker encoder: {len(samples)} samples")
        mel = log_mel(samples, self.filterbank)
        return self.forward(mel.unsqueeze(0).to(p.dtype))[0]


def speaker_encoder_shapes(cfg: SpeakerEncoderConfig) -> dict[str, tuple[int, ...]]:
    """Official tensor names ("speaker_encoder.*") and shapes for `cfg`."""
    with torch.device("meta"):
        return {"speaker_encoder." + k: tuple(v.shape) for k, v in SpeakerEncoder(cfg).state_dict().items()}
