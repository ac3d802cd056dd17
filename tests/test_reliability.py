"""No client can exhaust the server's memory, connections or slots (issue 25), each class through the real code:
reference clips bounded before they are decoded (FLAC, WAV, MP3 claiming an hour; the CLI on /dev/zero), the
connection limits (trickled bodies, oversized headers, chunked uploads, duplicate Host), WebSocket slots that
trickles cannot hold, idle sockets, a graceful shutdown, and the JSON shape of resource errors. Every server test
ends with a healthy server whose audio is exact; timeouts are small settings, never guesses of machine speed."""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import tracemalloc

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
sf = pytest.importorskip("soundfile")
ws_client = pytest.importorskip("websockets.sync.client")
ws_exceptions = pytest.importorskip("websockets.exceptions")

from qwen_tts_megakernel.engine import Synthesizer  # noqa: E402
from qwen_tts_megakernel.server.protocol import ServerSettings  # noqa: E402
from qwen_tts_megakernel.synthetic import write_tiny_model  # noqa: E402
from qwen_tts_megakernel.testing.server import TTSServerProcess, running_server  # noqa: E402
from qwen_tts_megakernel.voices import (ReferenceLimits, VoiceError, VoiceLibrary, check_voice_name,  # noqa: E402
                                        read_reference_audio, speaker_encoder_fingerprint)

WS_PATH = "/v1/audio/speech/stream"
HEALTHY = {"text": "Still healthy.", "speaker": "ryan", "max_new_tokens": 2, "seed": 3}
MEMORY_BOUND = 50 * 2 ** 20
HOUR_S = 3600


def tone(seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    mono = (0.3 * np.sin(2 * np.pi * 180 * t)).astype(np.float32)
    return np.stack([mono] * channels, 1) if channels > 1 else mono


def encoded(audio: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# Decompression bombs: files whose header claims an hour


def flac_claiming(seconds: float, rate: int = 48000, channels: int = 8) -> bytes:
    """A 2 s FLAC whose STREAMINFO says `seconds` (total samples: the low 36 bits of bytes 10..17 of the block)."""
    data = bytearray(encoded(tone(2.0, rate, channels), rate, "FLAC"))
    assert data[:4] == b"fLaC"
    start = 8 + 10
    field = int.from_bytes(data[start:start + 8], "big")
    field = (field & ~((1 << 36) - 1)) | int(seconds * rate)
    data[start:start + 8] = field.to_bytes(8, "big")
    return bytes(data)


def adpcm_wav_of(seconds: float, rate: int = 8000) -> bytes:
    """A real `seconds`-long IMA ADPCM WAV (4 bits a sample: an hour at 8 kHz is 14 MB, under the upload cap)."""
    buf = io.BytesIO()
    minute = tone(60.0, rate)
    with sf.SoundFile(buf, "w", rate, 1, format="WAV", subtype="IMA_ADPCM") as out:
        for _ in range(int(seconds // 60)):
            out.write(minute)
    return buf.getvalue()


def mp3_stream_of(seconds: float, rate: int = 16000) -> bytes:
    """`seconds` of MP3 frames with no length header (the Xing frame removed): only decoding can tell the length."""
    piece = encoded(tone(10.0, rate), rate, "MP3")
    xing = piece.find(b"Xing")
    assert xing >= 0
    first = xing
    while not (piece[first] == 0xFF and piece[first + 1] & 0xE0 == 0xE0):  # the next frame's sync word
        first += 1
    return piece[first:] * int(seconds // 10)


def peak_memory_of(call) -> tuple[BaseException | None, int]:
    """(what `call` raised, the peak of Python-tracked memory it allocated; numpy arrays are tracked)."""
    tracemalloc.start()
    try:
        call()
        raised = None
    except BaseException as exc:  # noqa: BLE001 - returned to the test
        raised = exc
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return raised, peak


@pytest.mark.parametrize("kind", ["flac", "wav", "mp3"])
def test_a_clip_claiming_an_hour_is_refused_within_50_mb(kind):
    data = {"flac": lambda: flac_claiming(HOUR_S), "wav": lambda: adpcm_wav_of(HOUR_S),
            "mp3": lambda: mp3_stream_of(HOUR_S)}[kind]()
    assert len(data) <= ReferenceLimits().max_bytes
    raised, peak = peak_memory_of(lambda: read_reference_audio(data))
    assert isinstance(raised, VoiceError) and raised.status == 400, raised
    assert "long; the limit is 30 s" in str(raised)
    assert peak < MEMORY_BOUND, f"{kind}: {peak / 2**20:.0f} MiB"


class LyingFile:
    """A decoder whose header says 2 s and which goes on for ever (what an MP3 header may do)."""

    samplerate, channels, frames = 48000, 8, 96000

    def read(self, frames, dtype, always_2d):
        return np.full((frames, self.channels), 0.25, dtype=np.float32)


def test_decoding_stops_one_block_past_the_limit_whatever_the_header_says():
    from qwen_tts_megakernel import voices

    limits = ReferenceLimits()
    raised, peak = peak_memory_of(lambda: voices._decode_mono(LyingFile(), int(30 * 48000) + 1, limits, "audio"))
    assert isinstance(raised, VoiceError) and "the limit is 30 s" in str(raised)
    assert peak < MEMORY_BOUND


def test_too_many_channels_and_real_clips():
    with pytest.raises(VoiceError, match="12 channels; the limit is 8"):
        read_reference_audio(encoded(tone(2.0, 16000, 12), 16000, "WAV"))
    for data in (encoded(tone(2.0, 48000, 8), 48000, "FLAC"), encoded(tone(2.0, 16000), 16000, "MP3"),
                 encoded(tone(29.0, 8000), 8000, "WAV")):
        out = read_reference_audio(data)
        assert out.dtype == np.float32 and 0.15 < float(np.sqrt(np.mean(out ** 2))) < 0.3


def test_voice_names_are_matched_in_full():
    assert check_voice_name("Alice-2") == "alice-2"
    for bad in ("alice\n", "alice\nbob", "\nalice", "a" * 65):
        with pytest.raises(VoiceError, match="must be 1-64 characters"):
            check_voice_name(bad)
    with pytest.raises(VoiceError) as info:
        check_voice_name("x" * 200_000)
    assert len(str(info.value)) < 300  # the value is shortened, not echoed


def test_cli_reads_at_most_the_cap(tmp_path):
    model = write_tiny_model(tmp_path / "m", "0.6b", "base", seed=1)
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "qwen_tts_megakernel.cli", "voices", "add", "zero", "/dev/zero",
                        "--x-vector-only", "--model", str(model), "--voices-dir", str(tmp_path / "lib")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "larger than 20971520 bytes" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert time.monotonic() - start < 300
