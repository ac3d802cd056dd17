"""OpenAI compatibility of POST /v1/audio/speech: the openai SDK with its defaults (mp3, an OpenAI voice name), every
response_format decoded with PyAV against the pcm output of the same seed, streaming, and the voice alias table."""

from __future__ import annotations

import base64
import io
import json
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
av = pytest.importorskip("av")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from qwen_tts_megakernel.engine import Synthesizer  # noqa: E402
from qwen_tts_megakernel.server.audio_formats import AUDIO_FORMATS, AudioEncoder  # noqa: E402
from qwen_tts_megakernel.server.voice_aliases import (DEFAULT_ALIASES, OPENAI_VOICES, parse_aliases,  # noqa: E402
                                                      voice_aliases)
from qwen_tts_megakernel.synthetic import write_tiny_model  # noqa: E402
from qwen_tts_megakernel.testing.server import running_server  # noqa: E402

TEXT = "Hello there, this is the speech endpoint."
RATE = 24000


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_openai")
    write_tiny_model(path, "0.6b", "custom_voice", seed=0)
    return Synthesizer.from_pretrained(str(path), device="cpu")


@pytest.fixture(scope="module")
def url(synth):
    with running_server(synth, model_name="qwen3-tts-tiny") as (base_url, _app):
        yield base_url


@pytest.fixture(scope="module")
def oai(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def decode(data: bytes) -> np.ndarray:
    """Any container PyAV reads -> int16 mono samples at 24 kHz."""
    resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE)
    out = []
    with av.open(io.BytesIO(data)) as container:
        for frame in container.decode(audio=0):
            out.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
    out.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
    return np.concatenate(out).astype(np.int16)


def aligned_correlation(reference: np.ndarray, decoded: np.ndarray, max_shift: int = 4000) -> float:
    """The best normalized correlation of `decoded` against `reference` over delays of 0..`max_shift` samples
    (lossy codecs delay the audio: encoder priming, look-ahead)."""
    a, b = reference.astype(np.float64), decoded.astype(np.float64)
    n = len(a) + len(b)
    xcorr = np.fft.irfft(np.fft.rfft(b, n) * np.conj(np.fft.rfft(a, n)), n)[:max_shift + 1]
    return float(xcorr.max() / (np.linalg.norm(a) * np.linalg.norm(b)))


def speech(url: str, **body) -> httpx.Response:
    body = {"model": "tts-1", "input": TEXT, "voice": "alloy", "seed": 5, "max_new_tokens": 25} | body
    return httpx.post(f"{url}/v1/audio/speech", json=body, timeout=60)


def test_openai_sdk_defaults_get_playable_mp3(oai, url):
    """No response_format and an OpenAI voice name: what every OpenAI example sends."""
    r = oai.audio.speech.create(model="tts-1", voice="alloy", input=TEXT, extra_body={"max_new_tokens": 20})
    data = r.content
    assert r.response.headers["content-type"] == "audio/mpeg"
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        assert stream.codec_context.name.startswith("mp3") and stream.codec_context.sample_rate == RATE
    samples = decode(data)
    assert len(samples) >= 20 * 1920 and np.abs(samples).max() > 0


@pytest.fixture(scope="module")
def pcm(url):
    return np.frombuffer(speech(url, response_format="pcm").content, dtype="<i2")


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3", "opus", "aac"])
def test_every_format_decodes_to_the_pcm_audio(url, pcm, fmt):
    r = speech(url, response_format=fmt)
    assert r.status_code == 200 and r.headers["content-type"] == AUDIO_FORMATS[fmt].media_type
    decoded = decode(r.content)
    if fmt in ("wav", "flac"):  # lossless: the same samples
        assert np.array_equal(decoded, pcm)
    else:
        assert abs(len(decoded) - len(pcm)) < 0.1 * RATE
        assert aligned_correlation(pcm, decoded) >= 0.9


@pytest.mark.parametrize("fmt", ["mp3", "pcm"])
def test_sse_carries_the_format(url, fmt):
    body = speech(url, response_format=fmt, stream_format="sse").text
    events = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: ")]
    audio = b"".join(base64.b64decode(e["audio"]) for e in events if e["type"] == "speech.audio.delta")
    assert events[-1]["type"] == "speech.audio.done"
    expected = speech(url, response_format=fmt).content
    assert audio == expected


def test_first_bytes_arrive_before_synthesis_ends(url):
    """A long mp3 response: the first encoded bytes reach the client well before the last ones."""
    body = {"model": "tts-1", "input": TEXT * 3, "voice": "echo", "seed": 3, "max_new_tokens": 250,
            "response_format": "mp3"}
    arrivals = []
    start = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/audio/speech", json=body, timeout=120) as r:
        assert r.status_code == 200
        for piece in r.iter_raw():
            if piece:
                arrivals.append((time.perf_counter() - start, len(piece)))
    assert len(arrivals) > 3
    first, last = arrivals[0][0], arrivals[-1][0]
    assert last - first > 0.5 * last, arrivals[:3]


def test_voice_aliases_listed_and_resolved(url, synth):
    listed = httpx.get(f"{url}/v1/audio/voices").json()["voice_aliases"]
    assert set(listed) == set(OPENAI_VOICES) and all(v in synth.voices for v in listed.values())
    # An alias speaks exactly like the speaker it names.
    alias = speech(url, voice="onyx", response_format="pcm").content
    assert alias == speech(url, voice=DEFAULT_ALIASES["onyx"], response_format="pcm").content
    r = speech(url, voice="nobody")
    assert r.status_code == 400 and r.json()["error"]["param"] == "voice" and "alloy" in r.json()["error"]["message"]


def test_alias_table_defaults_fallback_and_overrides():
    assert voice_aliases(["ryan", "vivian"], overrides={})["alloy"] == "vivian"
    fallback = voice_aliases(["a_speaker", "b_speaker"], overrides={})
    assert set(fallback.values()) == {"a_speaker", "b_speaker"} and set(fallback) == set(OPENAI_VOICES)
    assert voice_aliases(["ryan", "vivian"], overrides=parse_aliases("alloy=ryan"))["alloy"] == "ryan"
    assert voice_aliases([], overrides={}) == {}
    assert "ryan" not in voice_aliases(["ryan", "vivian"], overrides={"ryan": "vivian"})  # a speaker wins
    with pytest.raises(ValueError, match="no speaker 'nobody'"):
        voice_aliases(["ryan"], overrides={"alloy": "nobody"})
    with pytest.raises(ValueError, match="NAME=SPEAKER"):
        parse_aliases("alloy")


def test_a_bad_alias_setting_stops_the_server_at_start_up(tmp_path):
    from fastapi.testclient import TestClient

    from qwen_tts_megakernel.server.app import create_app
    from qwen_tts_megakernel.server.protocol import ServerSettings

    write_tiny_model(tmp_path, "0.6b", "custom_voice", seed=0)
    synth = Synthesizer.from_pretrained(str(tmp_path), device="cpu")  # its own: the app's shutdown stops its engine

    with pytest.raises(ValueError, match="no speaker 'nobody'"):
        create_app(synth, settings=ServerSettings(voice_aliases="alloy=nobody"))
    with TestClient(create_app(synth, settings=ServerSettings(voice_aliases="alloy=ryan")),
                    base_url="http://127.0.0.1") as client:  # a loopback Host (the default allow-list)
        assert client.get("/v1/audio/voices").json()["voice_aliases"]["alloy"] == "ryan"


def test_encoder_streams_and_rejects_unknown_formats():
    enc = AudioEncoder("opus", RATE)
    tone = (np.sin(np.arange(RATE) * 2 * np.pi * 440 / RATE) * 8000).astype("<i2").tobytes()
    pieces = [enc.encode(tone[i:i + 3841]) for i in range(0, len(tone), 3841)]  # odd sizes split samples
    assert sum(1 for p in pieces if p) > len(pieces) // 2  # Ogg pages come out as the audio goes in
    data = b"".join(pieces) + enc.finish()
    assert abs(len(decode(data)) - RATE) < 0.05 * RATE
    with pytest.raises(ValueError, match="supported: mp3"):
        AudioEncoder("ogg_vorbis", RATE)


@pytest.mark.asyncio
async def test_pipecats_own_openai_tts_service_works_against_the_server(url):
    """Pipecat's OpenAITTSService sends only OpenAI's voice names and model; pointed at this server it speaks."""
    pytest.importorskip("pipecat")
    from pipecat.frames.frames import ErrorFrame, TTSAudioRawFrame, TTSSpeakFrame
    from pipecat.services.openai.tts import OpenAITTSService
    from pipecat.tests.utils import run_test

    tts = OpenAITTSService(api_key="unused", base_url=f"{url}/v1",
                           settings=OpenAITTSService.Settings(voice="nova", model="tts-1"))
    down, up = await run_test(tts, frames_to_send=[TTSSpeakFrame(TEXT)])
    assert not [f for f in up if isinstance(f, ErrorFrame)], [f.error for f in up if isinstance(f, ErrorFrame)]
    audio = b"".join(f.audio for f in down if isinstance(f, TTSAudioRawFrame))
    assert len(audio) > 1920 * 2 * 5
