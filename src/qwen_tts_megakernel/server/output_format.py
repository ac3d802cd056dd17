"""What a client asked its stream to sound like: speaking rate, sample rate and sample encoding, applied to the
engine's 24 kHz PCM16 chunk by chunk.

    speed        0.25-4.0 (time_stretch.py: pitch kept)          default 1.0
    sample_rate  8000, 16000, 22050, 24000, 44100, 48000          default the model's (24000)
    encoding     pcm_s16le, mulaw (G.711 μ-law), alaw (G.711 A-law)  default pcm_s16le

Each stream gets its own `StreamOutput`: the time stretch, then a streaming resampler (soxr's ResampleStream, its
state kept between chunks, its tail drained at the end), then the G.711 encoder (FFmpeg's pcm_mulaw / pcm_alaw
through PyAV; 8 bits a sample). At the model's rate, speed 1.0 and pcm_s16le every stage is skipped: the bytes are
the engine's, exactly as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..time_stretch import TimeStretch

SAMPLE_RATES = (8000, 16000, 22050, 24000, 44100, 48000)
ENCODINGS = ("pcm_s16le", "mulaw", "alaw")
_G711_CODECS = {"mulaw": "pcm_mulaw", "alaw": "pcm_alaw"}


@dataclass(frozen=True)
class OutputFormat:
    speed: float = 1.0
    sample_rate: int | None = None  # None: the model's
    encoding: str = "pcm_s16le"

    def rate(self, model_rate: int) -> int:
        return self.sample_rate or model_rate

    @property
    def bytes_per_sample(self) -> int:
        return 2 if self.encoding == "pcm_s16le" else 1


class StreamOutput:
    """One stream's conversion: `process(pcm)` -> bytes ready now (maybe b""), `finish()` -> the rest."""

    def __init__(self, fmt: OutputFormat, model_rate: int):
        self.format = fmt
        self.rate = fmt.rate(model_rate)
        self._stretch = TimeStretch(fmt.speed, model_rate) if fmt.speed != 1.0 else None
        self._resampler = None
        if self.rate != model_rate:
            import soxr

            self._resampler = soxr.ResampleStream(model_rate, self.rate, 1, dtype="int16")
        self._codec = None
        if fmt.encoding in _G711_CODECS:
            import av

            self._av = av
            self._codec = av.CodecContext.create(_G711_CODECS[fmt.encoding], "w")
            self._codec.sample_rate = self.rate
            self._codec.format = "s16"
            self._codec.layout = "mono"
            self._codec.open()
        self.samples_out = 0  # samples at the output rate, so far

    @property
    def passthrough(self) -> bool:
        return self._stretch is None and self._resampler is None and self._codec is None

    def _encode(self, pcm: np.ndarray) -> bytes:
        self.samples_out += len(pcm)
        if self._codec is None or len(pcm) == 0:
            return pcm.astype("<i2", copy=False).tobytes()
        frame = self._av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self.rate
        return b"".join(bytes(packet) for packet in self._codec.encode(frame))

    def process(self, pcm: np.ndarray) -> bytes:
        pcm = np.asarray(pcm, dtype=np.int16).reshape(-1)
        if self._stretch is not None:
            pcm = self._stretch.process(pcm)
        if self._resampler is not None and len(pcm):
            pcm = self._resampler.resample_chunk(pcm)
        return self._encode(pcm)

    def finish(self) -> bytes:
        pcm = self._stretch.finish() if self._stretch is not None else np.zeros(0, np.int16)
        if self._resampler is not None:
            pcm = self._resampler.resample_chunk(pcm, last=True)
        return self._encode(pcm)
