"""LiveKit Agents' own TTS plugins against our server, unmodified, in-process (no LiveKit server needed):
`livekit.plugins.baseten.TTS(model="qwen3-tts")` speaks vLLM-Omni's WebSocket protocol, `livekit.plugins.openai.TTS`
our OpenAI route. The tests drive the plugins' `synthesize()` and `stream()` APIs and check the audio they emit."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
aiohttp = pytest.importorskip("aiohttp")
httpx = pytest.importorskip("httpx")
baseten = pytest.importorskip("livekit.plugins.baseten")
lk_openai = pytest.importorskip("livekit.plugins.openai")
ws_client = pytest.importorskip("websockets.sync.client")

from qwen_tts_megakernel.engine import Synthesizer  # noqa: E402
from qwen_tts_megakernel.synthetic import write_tiny_model  # noqa: E402
from qwen_tts_megakernel.testing.server import prometheus_sum, running_server  # noqa: E402

WS_PATH = "/v1/audio/speech/stream"
RATE = 24000
FRAME_SAMPLES = 1920  # one 80 ms codec frame
TEXT = "Hello from a LiveKit agent, spoken by the megakernel server."
LONG_TEXT = " ".join(["This utterance is long enough to keep the server busy for a while."] * 12)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_livekit")
    write_tiny_model(path, "0.6b", "custom_voice", seed=0)
    return Synthesizer.from_pretrained(str(path), device="cpu")


@pytest.fixture(scope="module")
def server(synth):
    with running_server(synth, model_name="qwen3-tts-tiny") as (url, app):
        yield url, app


def qwen3_tts(url: str, session, **options):
    """The Baseten plugin pointed at our server: only the endpoint changes (the key is unused without --api-key)."""
    options = {"voice": "ryan", "task_type": "CustomVoice", "language": "English"} | options
    return baseten.TTS(model="qwen3-tts", model_endpoint=url.replace("http://", "ws://") + WS_PATH,
                       api_key="unused", http_session=session, **options)


def pcm_of(events) -> bytes:
    """The audio the plugin emitted, without LiveKit's end-of-segment marker (10 ms of synthetic silence the
    emitter adds when the audio ends on a frame boundary; it is not counted in the segment's duration)."""
    assert events and all(e.frame.sample_rate == RATE and e.frame.num_channels == 1 for e in events)
    frames = [bytes(e.frame.data) for e in events]
    if events[-1].is_final and len(frames[-1]) == RATE // 100 * 2 and not any(frames[-1]):
        frames.pop()
    return b"".join(frames)


def ours_pcm(url: str, text: str, **config) -> bytes:
    """The same text through our own WebSocket protocol."""
    audio = bytearray()
    with ws_client.connect(url.replace("http://", "ws://") + WS_PATH) as conn:
        conn.send(json.dumps({"type": "config", "context_id": "c", **config}))
        conn.send(json.dumps({"type": "text", "context_id": "c", "text": text}))
        conn.send(json.dumps({"type": "flush", "context_id": "c"}))
        while True:
            msg = conn.recv(timeout=60)
            if isinstance(msg, bytes):
                audio += msg[1 + msg[0]:]
            elif json.loads(msg)["type"] == "audio_done":
                return bytes(audio)


def sockets_opened(url: str) -> float:
    return prometheus_sum(httpx.get(f"{url}/metrics").text, "qwen_tts_requests_total", endpoint="ws")


async def wait_idle(app, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while app.state.worker.active_count and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return app.state.worker.active_count


@pytest.mark.asyncio
async def test_baseten_qwen3_synthesize_is_our_websocket_audio(server):
    url, _app = server
    async with aiohttp.ClientSession() as session:
        tts = qwen3_tts(url, session, max_new_tokens=30, extra_config={"seed": 21})
        try:
            events = [e async for e in tts.synthesize(TEXT)]
        finally:
            await tts.aclose()
    pcm = pcm_of(events)
    assert len(pcm) == 30 * FRAME_SAMPLES * 2  # 2.4 s at 24 kHz
    assert pcm == await asyncio.to_thread(ours_pcm, url, TEXT, voice="ryan", language="english", seed=21,
                                          max_new_tokens=30)


@pytest.mark.asyncio
async def test_baseten_qwen3_stream_speaks_before_the_text_ends(server):
    """stream(): the first audio arrives while the agent is still writing the text (the rest is pushed only after
    it), word times come through, and a second turn reuses the plugin's parked socket."""
    url, app = server
    sockets_before = sockets_opened(url)
    async with aiohttp.ClientSession() as session:
        tts = qwen3_tts(url, session, max_new_tokens=40, word_timestamps=True, extra_config={"seed": 3})
        try:
            for turn in range(2):
                stream = tts.stream()
                stream.push_text("Hello there, this is ")
                events = [await asyncio.wait_for(stream.__anext__(), 60)]
                stream.push_text("the rest of the turn.")
                stream.end_input()
                events += [e async for e in stream]
                await stream.aclose()
                pcm = pcm_of(events)
                assert len(pcm) == 40 * FRAME_SAMPLES * 2, turn
                words = [w for e in events for w in (e.frame.userdata.get("lk.timed_transcripts") or [])]
                # Estimated times of the words whose audio went out (the tiny model stops at max_new_tokens, not
                # at EOS, so the last words are never "heard").
                spoken = "".join(str(w) for w in words).split()
                assert 2 <= len(spoken) and spoken == "Hello there, this is the rest of the turn.".split()[:len(spoken)]
                assert [w.start_time for w in words] == sorted(w.start_time for w in words)
        finally:
            await tts.aclose()
    assert sockets_opened(url) == sockets_before + 1  # both turns on one socket
    assert await wait_idle(app) == 0


@pytest.mark.asyncio
async def test_baseten_qwen3_interrupted_stream_stops_the_server(server):
    """Barge-in: closing the plugin's stream mid-utterance closes its socket, and the server stops generating."""
    url, app = server
    async with aiohttp.ClientSession() as session:
        tts = qwen3_tts(url, session)
        try:
            stream = tts.stream()
            stream.push_text(LONG_TEXT)
            stream.end_input()
            await asyncio.wait_for(stream.__anext__(), 60)
            assert app.state.worker.active_count == 1
            await stream.aclose()
        finally:
            await tts.aclose()
    assert await wait_idle(app) == 0


def expected_frames(synth, text: str, voice: str) -> int:
    """Frames of a text the tiny model speaks to its length guard (random weights never sample EOS)."""
    return synth.prepare(text, voice=voice).limit


@pytest.mark.asyncio
@pytest.mark.parametrize("options", [{}, {"model": "tts-1", "voice": "ryan", "response_format": "pcm"}],
                         ids=["defaults-sse-mp3", "tts-1-pcm"])
async def test_openai_tts_complete_audio(server, synth, options):
    """livekit-plugins-openai with base_url: its defaults (gpt-4o-mini-tts, voice ash, mp3 over SSE) and raw pcm."""
    url, _app = server
    tts = lk_openai.TTS(base_url=f"{url}/v1", api_key="unused", **options)
    try:
        events = [e async for e in tts.synthesize("Hello there.")]
    finally:
        await tts.aclose()
    samples = len(pcm_of(events)) // 2
    frames = expected_frames(synth, "Hello there.", options.get("voice", "ryan"))  # ash is ryan
    if options.get("response_format") == "pcm":
        assert samples == frames * FRAME_SAMPLES
    else:  # mp3: the decoder's priming and padding, within one mp3 frame (1152 samples) or so
        assert abs(samples - frames * FRAME_SAMPLES) <= 2 * 1152


@pytest.mark.asyncio
async def test_openai_tts_streams_and_stops(server):
    """The first audio reaches the plugin's consumer while the server still generates; closing the stream then
    stops the server's stream."""
    url, app = server
    tts = lk_openai.TTS(base_url=f"{url}/v1", api_key="unused", model="tts-1", voice="ryan", response_format="pcm")
    try:
        stream = tts.synthesize(LONG_TEXT)
        first = await asyncio.wait_for(stream.__anext__(), 60)
        assert np.frombuffer(bytes(first.frame.data), "<i2").size > 0
        assert app.state.worker.active_count == 1  # the utterance (hundreds of frames) is still being generated
        await stream.aclose()
    finally:
        await tts.aclose()
    assert await wait_idle(app) == 0


def wav_file(path, seconds: float = 2.0) -> str:
    import soundfile as sf

    t = np.arange(int(RATE * seconds)) / RATE
    audio = 0.3 * np.sin(2 * np.pi * 180 * t) + 0.02 * np.random.default_rng(0).standard_normal(len(t))
    sf.write(str(path), audio.astype(np.float32), RATE)
    return str(path)


@pytest.mark.asyncio
async def test_baseten_register_voice_then_speak_with_it(tmp_path, monkeypatch):
    """On a Base model: the plugin's register_voice (voice.add over the socket) clones a voice, list_voices shows it,
    and the plugin's defaults (task_type Base, language Auto) speak with it."""
    monkeypatch.setenv("QWEN_TTS_MK_VOICES_DIR", str(tmp_path / "voices"))
    model = write_tiny_model(tmp_path / "base", "0.6b", "base", seed=1)
    synth = Synthesizer.from_pretrained(str(model), device="cpu")
    with running_server(synth) as (url, app):
        endpoint = url.replace("http://", "ws://") + WS_PATH
        voice = await baseten.register_voice(model_endpoint=endpoint, name="agent_voice", api_key="unused",
                                             ref_audio_path=wav_file(tmp_path / "ref.wav"),
                                             ref_text="This is what the reference clip says.")
        assert voice["name"] == "agent_voice" and voice["duration_s"] == 2.0
        listed = await baseten.list_voices(model_endpoint=endpoint, api_key="unused")
        assert listed["uploaded_voices"] == ["agent_voice"] and listed["voices"] == []
        with pytest.raises(RuntimeError, match="already exists"):
            await baseten.register_voice(model_endpoint=endpoint, name="agent_voice", api_key="unused",
                                         ref_audio_path=str(tmp_path / "ref.wav"))
        async with aiohttp.ClientSession() as session:
            tts = baseten.TTS(model="qwen3-tts", model_endpoint=endpoint, api_key="unused", voice="agent_voice",
                              http_session=session, max_new_tokens=10)
            try:
                events = [e async for e in tts.synthesize("Hello in a cloned voice.")]
            finally:
                await tts.aclose()
        assert len(pcm_of(events)) == 10 * FRAME_SAMPLES * 2
        assert await wait_idle(app) == 0
