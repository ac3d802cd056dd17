"""Clients get what they ask for: speed (a streamed, pitch-keeping time stretch), instructions tolerated on the
OpenAI route, WAV/FLAC files with their true length, ISO language codes, per-stream sample rate and G.711
encoding, and the server's log lines. A real server on loopback with the tiny checkpoint; real clients."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest

pytest.importorskip("fastapi")
av = pytest.importorskip("av")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
soundfile = pytest.importorskip("soundfile")
soxr = pytest.importorskip("soxr")
ws_client = pytest.importorskip("websockets.sync.client")

from qwen_tts_megakernel.engine import Synthesizer  # noqa: E402
from qwen_tts_megakernel.languages import model_language  # noqa: E402
from qwen_tts_megakernel.server.output_format import OutputFormat, StreamOutput  # noqa: E402
from qwen_tts_megakernel.synthetic import write_tiny_model  # noqa: E402
from qwen_tts_megakernel.testing.server import running_server  # noqa: E402
from qwen_tts_megakernel.time_stretch import TimeStretch, atempo_stages, check_speed  # noqa: E402

TEXT = "Hello there, this is a client asking for things."
RATE = 24000
FRAMES = 25


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_clients")
    write_tiny_model(path, "0.6b", "custom_voice", seed=0)
    return Synthesizer.from_pretrained(str(path), device="cpu")


@pytest.fixture(scope="module")
def url(synth):
    with running_server(synth, model_name="qwen3-tts-tiny") as (base_url, _app):
        yield base_url


@pytest.fixture(scope="module")
def oai(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def reference_pcm(synth, **kw) -> np.ndarray:
    kw = {"voice": "ryan", "seed": 5, "max_new_tokens": FRAMES} | kw
    return np.concatenate([c.pcm for c in synth.stream(TEXT, **kw)]).astype(np.int16)


def tone(seconds: float, hz: float = 220.0) -> np.ndarray:
    t = np.arange(int(RATE * seconds)) / RATE
    return (8000 * np.sin(2 * np.pi * hz * t) * (1 + 0.3 * np.sin(2 * np.pi * 3 * t))).astype(np.int16)


def peak_hz(x: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(x.astype(np.float64) * np.hanning(len(x))))
    return float(np.argmax(spectrum) * RATE / len(x))


def aligned_correlation(reference: np.ndarray, other: np.ndarray, max_shift: int = 2000) -> float:
    """The best normalized correlation of `other` against `reference` over delays of -max_shift..max_shift."""
    a, b = reference.astype(np.float64), other.astype(np.float64)
    n = len(a) + len(b)
    xcorr = np.fft.irfft(np.fft.rfft(b, n) * np.conj(np.fft.rfft(a, n)), n)
    best = max(xcorr[:max_shift + 1].max(), xcorr[-max_shift:].max())
    return float(best / (np.linalg.norm(a) * np.linalg.norm(b)))


# ---------------------------------------------------------------------------------------------------------------
# The time stretch itself


@pytest.mark.parametrize("speed", [0.25, 0.5, 0.8, 1.5, 2.0, 2.75, 4.0])
def test_time_stretch_keeps_pitch_and_scales_duration_chunk_by_chunk(speed):
    x = tone(3.0)
    stretch = TimeStretch(speed, RATE)
    chunks = [x[:1920]] + [x[i:i + 7680] for i in range(1920, len(x), 7680)]  # the engine's chunk sizes
    pieces = [stretch.process(c) for c in chunks]
    out = np.concatenate(pieces + [stretch.finish()])
    assert abs(len(out) / len(x) - 1 / speed) < 0.02 / speed
    assert abs(peak_hz(out[len(out) // 4:3 * len(out) // 4]) - 220.0) < 5.0
    # Streaming: every chunk after the first gives its share of audio as it comes, not at the end.
    # (The filter emits whole output blocks of about 1024 samples, so a chunk's share may be off by one block.)
    for piece, chunk in list(zip(pieces, chunks))[2:-1]:
        assert abs(len(piece) - len(chunk) / speed) <= 1100
    if speed <= 2.75:  # the first 80 ms frame already gives audio (the filter keeps ~40 ms of look-ahead)
        assert len(pieces[0]) > 0


def test_speed_bounds_and_stages():
    assert check_speed(1) == 1.0
    for bad in (0.2, 4.01, float("nan"), True, "2"):
        with pytest.raises(ValueError, match="speed"):
            check_speed(bad)
    assert atempo_stages(0.25) == pytest.approx([0.5, 0.5]) and atempo_stages(3.0) == [3.0]


def test_time_stretch_cost_is_small(capsys):
    """Reports the CPU cost per second of audio (time.process_time: no wall-clock race) and bounds it loosely."""
    import time

    x = tone(5.0)
    for speed in (0.5, 1.5):
        start = time.process_time()
        stretch = TimeStretch(speed, RATE)
        for i in range(0, len(x), 1920):
            stretch.process(x[i:i + 1920])
        stretch.finish()
        per_second_ms = (time.process_time() - start) / 5.0 * 1000
        print(f"time stretch at {speed}x: {per_second_ms:.2f} ms CPU per second of audio")
        assert per_second_ms < 200  # a twentieth of real time even on a loaded CI core


# ---------------------------------------------------------------------------------------------------------------
# speed on every path


def test_openai_sdk_speed_scales_the_duration(oai):
    def duration(speed):
        r = oai.audio.speech.create(model="tts-1", voice="alloy", input=TEXT, response_format="pcm", speed=speed,
                                    extra_body={"seed": 5, "max_new_tokens": FRAMES})
        return len(r.content) / 2 / RATE

    base = duration(1.0)
    assert base == pytest.approx(FRAMES * 0.08)
    for speed in (1.5, 0.5):
        assert abs(duration(speed) / (base / speed) - 1) < 0.05


def test_tts_stream_speed_and_python_api_stream_the_first_frame(url, synth):
    """/tts/stream with speed: the duration scales; the first engine chunk (one frame) already gives audio."""
    body = {"text": TEXT, "speaker": "ryan", "seed": 5, "max_new_tokens": FRAMES, "speed": 1.5}
    r = httpx.post(f"{url}/tts/stream", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert abs(len(r.content) / 2 / RATE / (FRAMES * 0.08 / 1.5) - 1) < 0.05
    chunks = list(synth.stream(TEXT, voice="ryan", seed=5, max_new_tokens=FRAMES))
    output = StreamOutput(OutputFormat(speed=1.5), RATE)
    assert len(chunks[0].pcm) == 1920 and len(output.process(chunks[0].pcm)) > 0
    # The Python API's speed is the same stretch.
    stretched = np.concatenate([c.pcm for c in synth.stream(TEXT, voice="ryan", seed=5, max_new_tokens=FRAMES,
                                                               speed=1.5)])
    assert stretched.tobytes() == r.content


def test_ws_config_speed(url):
    with ws_client.connect(url.replace("http://", "ws://") + "/v1/audio/speech/stream") as conn:
        conn.send(json.dumps({"type": "config", "context_id": "s", "voice": "ryan", "seed": 5,
                              "max_new_tokens": FRAMES, "speed": 0.5}))
        conn.send(json.dumps({"type": "text", "context_id": "s", "text": TEXT}))
        conn.send(json.dumps({"type": "flush", "context_id": "s"}))
        audio, done = read_context(conn, "s")
    assert abs(len(audio) / 2 / RATE / (FRAMES * 0.08 / 0.5) - 1) < 0.05
    assert done["audio_seconds"] == pytest.approx(len(audio) / 2 / RATE, abs=1e-3)


def read_context(conn, cid):
    audio, done = [], None
    while done is None:
        msg = conn.recv(timeout=60)
        if isinstance(msg, bytes):
            assert msg[1:1 + msg[0]].decode() == cid
            audio.append(msg[1 + msg[0]:])
        else:
            event = json.loads(msg)
            assert event["type"] != "error", event
            if event["type"] == "audio_start":
                start = event
            if event["type"] == "audio_done":
                done = event | {"start": start}
    return b"".join(audio), done


@pytest.mark.asyncio
async def test_pipecats_openai_service_with_speed_and_instructions_speaks(url):
    pytest.importorskip("pipecat")
    from pipecat.frames.frames import ErrorFrame, TTSAudioRawFrame, TTSSpeakFrame
    from pipecat.services.openai.tts import OpenAITTSService
    from pipecat.tests.utils import run_test

    tts = OpenAITTSService(api_key="unused", base_url=f"{url}/v1",
                           settings=OpenAITTSService.Settings(voice="nova", model="gpt-4o-mini-tts", speed=1.25,
                                                              instructions="Speak cheerfully."))
    down, up = await run_test(tts, frames_to_send=[TTSSpeakFrame(TEXT)])
    assert not [f for f in up if isinstance(f, ErrorFrame)], [f.error for f in up if isinstance(f, ErrorFrame)]
    audio = b"".join(f.audio for f in down if isinstance(f, TTSAudioRawFrame))
    assert len(audio) > 1920 * 2 * 5


# ---------------------------------------------------------------------------------------------------------------
# instructions, files, languages


def test_instructions_ignored_on_the_openai_route_only(url, caplog):
    body = {"model": "tts-1", "input": TEXT, "voice": "alloy", "seed": 5, "max_new_tokens": 10,
            "response_format": "pcm", "instructions": "Speak slowly."}
    with caplog.at_level(logging.INFO, logger="qwen_tts_megakernel.server"):
        r = httpx.post(f"{url}/v1/audio/speech", json=body, timeout=60)
    assert r.status_code == 200 and r.headers["x-ignored-fields"] == "instructions"
    assert len(r.content) == 10 * 1920 * 2
    assert any("ignored instructions" in m for m in caplog.messages)
    r = httpx.post(f"{url}/tts/stream", json={"text": TEXT, "instructions": "Speak slowly."}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "instructions"


@pytest.mark.parametrize("response_format", ["wav", "flac"])
def test_whole_files_carry_their_true_length(oai, synth, response_format):
    r = oai.audio.speech.create(model="tts-1", voice="alloy", input=TEXT, response_format=response_format,
                                extra_body={"seed": 5, "max_new_tokens": FRAMES, "stream": False})
    assert int(r.response.headers["content-length"]) == len(r.content)
    data, rate = soundfile.read(io.BytesIO(r.content), dtype="int16")
    assert rate == RATE and len(data) == FRAMES * 1920
    assert np.array_equal(data, reference_pcm(synth, voice="vivian"))  # alloy -> vivian


def test_language_codes_on_every_endpoint(url, synth):
    assert [model_language(v, synth.languages) for v in ("en", "EN-us", "en_GB", "English", "eng")] == \
        ["english"] * 5
    assert model_language("zh-Hans-CN", synth.languages) == "chinese" and model_language("xx", synth.languages) \
        is None
    reference = reference_pcm(synth, language="english").tobytes()
    assert reference_pcm(synth, language="en").tobytes() == reference  # the Python API
    r = httpx.post(f"{url}/tts/stream", json={"text": TEXT, "speaker": "ryan", "seed": 5,
                                               "max_new_tokens": FRAMES, "language": "en"}, timeout=60)
    assert r.status_code == 200 and r.content == reference
    r = httpx.post(f"{url}/v1/audio/speech", json={"model": "tts-1", "input": TEXT, "voice": "ryan", "seed": 5,
                                                    "max_new_tokens": FRAMES, "language": "en-US",
                                                    "response_format": "pcm"}, timeout=60)
    assert r.status_code == 200 and r.content == reference
    with ws_client.connect(url.replace("http://", "ws://") + "/v1/audio/speech/stream") as conn:
        conn.send(json.dumps({"type": "config", "context_id": "l", "voice": "ryan", "seed": 5,
                              "max_new_tokens": FRAMES, "language": "en"}))
        conn.send(json.dumps({"type": "text", "context_id": "l", "text": TEXT}))
        conn.send(json.dumps({"type": "flush", "context_id": "l"}))
        audio, done = read_context(conn, "l")
    assert done["frames"] == FRAMES
    r = httpx.post(f"{url}/tts/stream", json={"text": TEXT, "language": "xx"}, timeout=60)
    assert r.status_code == 400 and "'en'" in r.json()["error"]["message"]


def test_pipecat_services_map_languages_with_the_same_table():
    pytest.importorskip("pipecat")
    from pipecat.transcriptions.language import Language

    from qwen_tts_megakernel.pipecat import qwen_language

    assert qwen_language(Language.EN_US) == "english" and qwen_language("ja") == "japanese"
    assert qwen_language("pt-BR") == "portuguese" and qwen_language("english") == "english"


# ---------------------------------------------------------------------------------------------------------------
# Per-stream output format


def decode_g711(data: bytes, codec: str, rate: int) -> np.ndarray:
    context = av.CodecContext.create(codec, "r")
    context.sample_rate, context.layout = rate, "mono"
    frames = context.decode(av.Packet(data))
    return np.concatenate([f.to_ndarray().reshape(-1) for f in frames]).astype(np.int16)


@pytest.mark.parametrize("encoding,codec", [("mulaw", "pcm_mulaw"), ("alaw", "pcm_alaw")])
def test_ws_8khz_g711_context_is_the_24khz_audio_resampled(url, synth, encoding, codec):
    with ws_client.connect(url.replace("http://", "ws://") + "/v1/audio/speech/stream") as conn:
        conn.send(json.dumps({"type": "config", "context_id": "t", "voice": "ryan", "seed": 5,
                              "max_new_tokens": FRAMES, "sample_rate": 8000, "encoding": encoding}))
        conn.send(json.dumps({"type": "text", "context_id": "t", "text": TEXT}))
        conn.send(json.dumps({"type": "flush", "context_id": "t"}))
        audio, done = read_context(conn, "t")
    assert done["start"]["sample_rate"] == 8000 and done["start"]["encoding"] == encoding
    assert len(audio) == pytest.approx(FRAMES * 1920 / 3, abs=2)  # one byte a sample at 8 kHz
    # The same context at 24 kHz PCM (the WebSocket's text layout), resampled offline for the comparison.
    with ws_client.connect(url.replace("http://", "ws://") + "/v1/audio/speech/stream") as conn:
        conn.send(json.dumps({"type": "config", "context_id": "r", "voice": "ryan", "seed": 5,
                              "max_new_tokens": FRAMES}))
        conn.send(json.dumps({"type": "text", "context_id": "r", "text": TEXT}))
        conn.send(json.dumps({"type": "flush", "context_id": "r"}))
        pcm24, _ = read_context(conn, "r")
    expected = soxr.resample(np.frombuffer(pcm24, "<i2").astype(np.float32), RATE, 8000)
    assert aligned_correlation(expected, decode_g711(audio, codec, 8000), max_shift=200) >= 0.95


@pytest.mark.parametrize("rate", [16000, 48000])
def test_tts_stream_sample_rate(url, synth, rate):
    r = httpx.post(f"{url}/tts/stream", json={"text": TEXT, "speaker": "ryan", "seed": 5, "max_new_tokens": FRAMES,
                                               "sample_rate": rate}, timeout=60)
    assert r.status_code == 200 and r.headers["x-sample-rate"] == str(rate)
    got = np.frombuffer(r.content, "<i2")
    assert len(got) == pytest.approx(FRAMES * 1920 * rate / RATE, abs=2)
    expected = soxr.resample(reference_pcm(synth).astype(np.float32), RATE, rate)
    assert aligned_correlation(expected, got, max_shift=400) >= 0.99


def test_default_format_is_exactly_the_engines(url, synth):
    r = httpx.post(f"{url}/tts/stream", json={"text": TEXT, "speaker": "ryan", "seed": 5, "max_new_tokens": FRAMES,
                                               "sample_rate": 24000, "encoding": "pcm_s16le", "speed": 1.0},
                   timeout=60)
    assert r.content == reference_pcm(synth).tobytes()


# ---------------------------------------------------------------------------------------------------------------
# Log lines


def test_a_log_line_per_stream_and_per_refusal(url, caplog):
    with caplog.at_level(logging.INFO, logger="qwen_tts_megakernel.server"):
        httpx.post(f"{url}/tts/stream", json={"text": TEXT, "speaker": "ryan", "seed": 5, "max_new_tokens": 6},
                   timeout=60)
        httpx.post(f"{url}/tts/stream", json={"text": TEXT, "speed": 9}, timeout=60)
    streams = [m for m in caplog.messages if m.startswith("stream ") and " tts_stream:" in m]
    assert streams and "frames=6" in streams[-1] and "stop=max_new_tokens" in streams[-1]
    assert "first_audio_ms=" in streams[-1]
    assert any(m.startswith("refused 400 param=speed") for m in caplog.messages)


@pytest.mark.asyncio
@pytest.mark.parametrize("service", ["http", "ws"])
async def test_pipecat_services_ask_for_the_pipelines_rate_and_speed(url, service):
    pytest.importorskip("pipecat")
    from pipecat.frames.frames import ErrorFrame, TTSAudioRawFrame, TTSSpeakFrame
    from pipecat.pipeline.task import PipelineParams
    from pipecat.tests.utils import run_test

    from qwen_tts_megakernel.pipecat import QwenHttpTTSService, QwenTTSService

    cls = QwenHttpTTSService if service == "http" else QwenTTSService
    tts = cls(base_url=url, settings=cls.Settings(voice="ryan", language="en", seed=5, max_new_tokens=FRAMES,
                                                  speed=2.0))
    down, up = await run_test(tts, frames_to_send=[TTSSpeakFrame(TEXT)],
                              pipeline_params=PipelineParams(audio_out_sample_rate=16000))
    assert not [f for f in up if isinstance(f, ErrorFrame)], [f.error for f in up if isinstance(f, ErrorFrame)]
    audio = [f for f in down if isinstance(f, TTSAudioRawFrame)]
    assert audio and all(f.sample_rate == 16000 for f in audio)
    samples = sum(len(f.audio) for f in audio) // 2
    assert abs(samples / (FRAMES * 1920 * 2 / 3 / 2.0) - 1) < 0.05  # 16 kHz, twice as fast
    # The service asked the server for the pipeline's rate (the server resampled) and the speed.
    request = tts._request_body("x") if service == "http" else tts._config_message("c")
    assert request["sample_rate"] == 16000 and request["speed"] == 2.0 and request["language"] == "english"


def test_a_stream_whose_client_left_is_logged(url, caplog):
    import time

    with caplog.at_level(logging.INFO, logger="qwen_tts_megakernel.server"):
        with httpx.stream("POST", f"{url}/tts/stream", json={"text": TEXT, "speaker": "ryan", "seed": 5,
                                                              "max_new_tokens": 1500}, timeout=60) as r:
            next(r.iter_raw())  # the first chunk, then hang up
        deadline = time.monotonic() + 60  # a bound, not a tuned wait: the line comes at the next frame
        while time.monotonic() < deadline and not any("client went away" in m for m in caplog.messages):
            time.sleep(0.05)
    assert any(m.startswith("stream ") and "tts_stream" in m and "client went away" in m for m in caplog.messages)
