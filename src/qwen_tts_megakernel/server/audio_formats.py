"""Streaming audio encoders for the speech endpoints: PCM16 chunks in, container bytes out as they are encoded.

OpenAI's `response_format` values map to:

    mp3   MPEG-2 Layer III (libmp3lame, 128 kb/s), audio/mpeg    aac   AAC-LC in ADTS frames, audio/aac
    opus  Opus in Ogg pages (libopus), audio/ogg                 flac  FLAC, audio/flac
    wav   RIFF header with unknown length, then raw PCM16   pcm   raw PCM16LE, no header

Streamed files cannot know their length when their header goes out. Streamed WAV carries 0xFFFFFFFF sizes (as
OpenAI's does): browsers, FFmpeg/PyAV, soundfile (libsndfile) and `sox` read it to the end; Python's `wave` and
scipy.io.wavfile take the size literally. Streamed FLAC leaves STREAMINFO's total length unknown (0): FFmpeg/PyAV,
`flac -d` and browsers read it; soundfile refuses it ("array is too big"). A request with `"stream": false` gets
the whole file at the end instead (`encode_whole`): WAV with its real sizes, FLAC with STREAMINFO's sample count
and MD5 (the muxer rewrites the header on a seekable buffer), and Content-Length.

The compressed formats use FFmpeg's encoders and muxers through PyAV (`av`, in the `server` extra); wav and pcm
need no encoder. Every encoder writes to a non-seekable sink, so nothing waits for the end of the stream: the
muxers write their headers first and then each packet as the encoder produces it (the Ogg muxer is told to close
a page every 20 ms instead of every second). The encoders themselves hold some audio back (their frame size
and look-ahead: 576 samples for mp3 at 24 kHz, 1024 for aac, 2304 for flac), which `finish()` drains.

    encoder = AudioEncoder("mp3", 24000)
    for pcm in chunks:                 # bytes of little-endian int16 mono samples
        yield encoder.encode(pcm)      # possibly b"" while the encoder fills a frame
    yield encoder.finish()
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AudioFormat:
    name: str
    media_type: str
    container: str | None = None  # FFmpeg muxer; None: no encoder (wav, pcm)
    codec: str | None = None
    bit_rate: int | None = None  # None: the encoder's default
    options: tuple[tuple[str, str], ...] = ()  # muxer options


AUDIO_FORMATS = {f.name: f for f in (
    AudioFormat("mp3", "audio/mpeg", "mp3", "libmp3lame", bit_rate=128_000),  # lame's default is 32 kb/s
    AudioFormat("opus", "audio/ogg", "ogg", "libopus", options=(("page_duration", "20000"),)),
    AudioFormat("aac", "audio/aac", "adts", "aac"),
    AudioFormat("flac", "audio/flac", "flac", "flac"),
    AudioFormat("wav", "audio/wav"),
    AudioFormat("pcm", "audio/pcm"),
)}
RESPONSE_FORMATS = tuple(AUDIO_FORMATS)


def wav_header(sample_rate: int, num_samples: int | None = None) -> bytes:
    """A 44-byte PCM16 mono WAV header. Streamed WAV (length unknown) uses 0xFFFFFFFF sizes, as OpenAI does."""
    if num_samples is None:
        data_size = riff_size = 0xFFFFFFFF
    else:
        data_size = 2 * num_samples
        riff_size = 36 + data_size
    return (b"RIFF" + struct.pack("<I", riff_size) + b"WAVEfmt " +
            struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, 2 * sample_rate, 2, 16) +
            b"data" + struct.pack("<I", data_size))


class _Sink:
    """A write-only, non-seekable file for the muxer: it collects bytes until they are taken."""

    def __init__(self):
        self._buffer = bytearray()

    def write(self, data) -> int:
        self._buffer += data
        return len(data)

    def take(self) -> bytes:
        data = bytes(self._buffer)
        self._buffer.clear()
        return data


class AudioEncoder:
    """One stream's encoder. `encode(pcm)` returns whatever container bytes are ready (maybe b""); `finish()` returns
    the rest and closes the container. Not thread-safe; one encoder per response."""

    def __init__(self, format_name: str, sample_rate: int):
        if format_name not in AUDIO_FORMATS:
            raise ValueError(f"unknown audio format {format_name!r}; supported: {', '.join(RESPONSE_FORMATS)}")
        self.format = AUDIO_FORMATS[format_name]
        self.sample_rate = sample_rate
        self.media_type = self.format.media_type
        self._header = wav_header(sample_rate) if format_name == "wav" else b""
        self._leftover = b""  # a trailing odd byte (half a sample)
        self._container = self._stream = self._sink = None
        if self.format.container is not None:
            import av  # the server extra; imported here so that pcm/wav servers work without it

            self._sink = _Sink()
            self._container = av.open(self._sink, mode="w", format=self.format.container,
                                      options=dict(self.format.options))
            self._stream = self._container.add_stream(self.format.codec, rate=sample_rate, layout="mono")
            if self.format.bit_rate:
                self._stream.codec_context.bit_rate = self.format.bit_rate
            self._av = av
        self.finished = False

    def encode(self, pcm: bytes) -> bytes:
        if self.finished:
            raise RuntimeError("encode() after finish()")
        header, self._header = self._header, b""
        pcm = self._leftover + pcm
        whole = len(pcm) & ~1
        pcm, self._leftover = pcm[:whole], pcm[whole:]
        if self._container is None:
            return header + pcm
        if pcm:
            samples = np.frombuffer(pcm, dtype="<i2").reshape(1, -1)
            frame = self._av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
            frame.sample_rate = self.sample_rate
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
        return header + self._sink.take()

    def finish(self) -> bytes:
        """Drain the encoder and close the container; the bytes returned end the stream."""
        if self.finished:
            return b""
        out = self.encode(b"\x00" if self._leftover else b"")
        self.finished = True
        if self._container is None:
            return out
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        return out + self._sink.take()

    def close(self) -> None:
        """Release the encoder without finishing (the client went away)."""
        if not self.finished and self._container is not None:
            self.finished = True
            try:
                self._container.close()
            except Exception:  # noqa: BLE001 - nothing to report to a client that is gone
                pass


def encode_whole(format_name: str, pcm: bytes, sample_rate: int) -> bytes:
    """A whole utterance (PCM16 mono bytes) as one file whose header carries its true length."""
    if format_name == "wav":
        return wav_header(sample_rate, len(pcm) // 2) + pcm[:len(pcm) & ~1]
    if format_name != "flac":
        encoder = AudioEncoder(format_name, sample_rate)
        return encoder.encode(pcm) + encoder.finish()
    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="flac") as container:
        stream = container.add_stream("flac", rate=sample_rate, layout="mono")
        samples = np.frombuffer(pcm[:len(pcm) & ~1], dtype="<i2").reshape(1, -1)
        if samples.shape[1]:
            frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
            frame.sample_rate = sample_rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buffer.getvalue()
