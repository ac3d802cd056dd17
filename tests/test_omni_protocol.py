"""vLLM-Omni's streaming TTS WebSocket protocol on /v1/audio/speech/stream (server/omni_protocol.py): a real
server on loopback with the tiny checkpoint and a plain websockets client speaking vLLM-Omni's messages."""

from __future__ import annotations

import contextlib
import io
import json
import time
import wave

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
ws_client = pytest.importorskip("websockets.sync.client")
ws_exceptions = pytest.importorskip("websockets.exceptions")

from qwen_tts_megakernel.engine import Synthesizer  # noqa: E402
from qwen_tts_megakernel.server.protocol import ServerSettings  # noqa: E402
from qwen_tts_megakernel.synthetic import write_tiny_model  # noqa: E402
from qwen_tts_megakernel.testing.server import running_server  # noqa: E402

WS_PATH = "/v1/audio/speech/stream"
TEXT = "Hello from a vLLM-Omni client, streaming its text a few tokens at a time."
KEY = "omni-secret"


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_omni")
    write_tiny_model(path, "0.6b", "custom_voice", seed=0)
    return Synthesizer.from_pretrained(str(path), device="cpu")


@pytest.fixture(scope="module")
def server(synth):
    settings = ServerSettings(max_text_chars=400, ws_idle_flush_s=5.0)
    with running_server(synth, model_name="qwen3-tts-tiny", settings=settings) as (url, app):
        yield url.replace("http://", "ws://") + WS_PATH, app


@pytest.fixture(scope="module")
def ws_url(server):
    return server[0]


class OmniReader:
    """Sends vLLM-Omni messages and collects the events and binary audio of one socket."""

    def __init__(self, conn):
        self.conn = conn
        self.events: list[dict] = []
        self.audio: list[bytes] = []

    def send(self, **msg) -> None:
        self.conn.send(json.dumps(msg))

    def read_until(self, kind: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            msg = self.conn.recv(timeout=max(0.01, deadline - time.monotonic()))
            if isinstance(msg, bytes):
                self.audio.append(msg)
                continue
            event = json.loads(msg)
            self.events.append(event)
            if event["type"] == kind:
                return event

    def types(self) -> list[str]:
        return [e["type"] for e in self.events]


def omni_utterance(ws: OmniReader, deltas, **config) -> dict:
    ws.send(type="session.config", **config)
    for delta in deltas:
        ws.send(type="input.text", text=delta)
    ws.send(type="input.done")
    return ws.read_until("session.done")


def ours_pcm(ws_url, text, deltas, **config) -> bytes:
    """The same utterance through our own protocol."""
    audio = bytearray()
    with ws_client.connect(ws_url) as conn:
        conn.send(json.dumps({"type": "config", "context_id": "c", **config}))
        for delta in deltas:
            conn.send(json.dumps({"type": "text", "context_id": "c", "text": delta}))
        conn.send(json.dumps({"type": "flush", "context_id": "c"}))
        while True:
            msg = conn.recv(timeout=60)
            if isinstance(msg, bytes):
                audio += msg[1 + msg[0]:]
            elif json.loads(msg)["type"] == "audio_done":
                return bytes(audio)


def deltas_of(text: str, size: int = 6) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


def test_streamed_pcm_equals_our_websocket(ws_url):
    """What LiveKit's plugin sends: pcm + stream_audio, text in pieces; audio equal to our protocol's."""
    with ws_client.connect(ws_url) as conn:
        ws = OmniReader(conn)
        done = omni_utterance(ws, deltas_of(TEXT), task_type="CustomVoice", voice="serena", language="English",
                              response_format="pcm", stream_audio=True, speed=1.0, seed=11, max_new_tokens=30)
    assert done == {"type": "session.done", "utterance_index": 0, "total_sentences": 1}
    assert ws.types() == ["audio.start", "audio.done", "session.done"]
    start, audio_done = ws.events[0], ws.events[1]
    assert start["sample_rate"] == 24000 and start["channels"] == 1 and start["format"] == "pcm"
    assert len(ws.audio) > 1  # streamed in chunks, not one message
    pcm = b"".join(ws.audio)
    assert audio_done["total_bytes"] == len(pcm) == 30 * 1920 * 2 and audio_done["error"] is False
    assert audio_done["stop_reason"] == "max_new_tokens" and audio_done["seed"] == 11
    assert pcm == ours_pcm(ws_url, TEXT, deltas_of(TEXT, 11), voice="serena", language="english", seed=11,
                           max_new_tokens=30)


def test_audio_starts_before_input_done(ws_url):
    """Speech starts while text is still arriving: audio comes before input.done is sent."""
    with ws_client.connect(ws_url) as conn:
        ws = OmniReader(conn)
        ws.send(type="session.config", voice="ryan", response_format="pcm", stream_audio=True, seed=3,
                max_new_tokens=12)
        ws.send(type="input.text", text="Hello there, this is ")
        ws.read_until("audio.start")
        first = conn.recv(timeout=60)  # the first audio, before the rest of the text and input.done were sent
        assert isinstance(first, bytes) and len(first) == 1920 * 2
        ws.audio.append(first)
        ws.send(type="input.text", text="the rest of it.")
        ws.send(type="input.done")
        ws.read_until("session.done")
    assert len(b"".join(ws.audio)) == 12 * 1920 * 2


def test_whole_wav_by_default_and_two_utterances_on_one_socket(ws_url, synth):
    """vLLM-Omni's defaults (wav, stream_audio false): one binary message per utterance; the config is sticky and
    can be replaced between utterances; an empty input.done (LiveKit's keepalive) answers session.done at once."""
    with ws_client.connect(ws_url) as conn:
        ws = OmniReader(conn)
        omni_utterance(ws, ["Short one."], voice="ryan", seed=5, max_new_tokens=8)
        assert len(ws.audio) == 1 and ws.events[0]["format"] == "wav"
        with wave.open(io.BytesIO(ws.audio[0])) as f:
            assert f.getframerate() == 24000 and f.getnchannels() == 1 and f.getsampwidth() == 2
        first_pcm = ws.audio[0][44:]
        assert len(first_pcm) == 8 * 1920 * 2
        ws.send(type="input.done")  # keepalive: nothing buffered
        assert ws.read_until("session.done") == {"type": "session.done", "utterance_index": 1, "total_sentences": 0}
        omni_utterance(ws, ["Short one."], voice="ryan", seed=5, max_new_tokens=8, response_format="pcm")
        assert ws.audio[-1] == first_pcm  # same seed, same audio; pcm this time
        assert ws.events[-1]["utterance_index"] == 2
        assert "error" not in ws.types()


def test_estimated_word_times_in_audio_done(ws_url):
    """Baseten's timestamp_type 'word': the words and their estimated times ride audio.done."""
    with ws_client.connect(ws_url) as conn:
        ws = OmniReader(conn)
        omni_utterance(ws, ["One two three."], voice="ryan", seed=2, max_new_tokens=40, response_format="pcm",
                       stream_audio=True, timestamp_type="word", timestamp_transport_strategy="sync")
    done = next(e for e in ws.events if e["type"] == "audio.done")
    alignment = done["timestamp_info"]["word_alignment"]
    assert alignment["words"] == ["One", "two", "three."]
    starts, ends = alignment["word_start_times_seconds"], alignment["word_end_times_seconds"]
    assert starts == sorted(starts) and all(s < e for s, e in zip(starts, ends)) and ends[-1] <= 40 * 0.08 + 1e-6


def test_speed_is_the_same_stretch_as_our_websocket(ws_url):
    with ws_client.connect(ws_url) as conn:
        ws = OmniReader(conn)
        omni_utterance(ws, deltas_of(TEXT), voice="serena", response_format="pcm", stream_audio=True, speed=2.0,
                       seed=11, max_new_tokens=30)
    pcm = b"".join(ws.audio)
    audio_done = [e for e in ws.events if e["type"] == "audio.done"][0]
    assert audio_done["total_bytes"] == len(pcm)
    assert abs(len(pcm) / (30 * 1920 * 2 / 2.0) - 1) < 0.05  # half the duration
    assert pcm == ours_pcm(ws_url, TEXT, deltas_of(TEXT), voice="serena", speed=2.0, seed=11, max_new_tokens=30)


@pytest.mark.parametrize("config, field", [
    ({"ref_audio": "https://example.com/a.wav"}, "ref_audio"),
    ({"task_type": "Base"}, "task_type"),
    ({"voice": "nobody"}, "voice"),
    ({"language": "klingon"}, "language"),
    ({"response_format": "wav", "stream_audio": True}, "response_format"),
    ({"speed": 5.0}, "speed"),
    ({"word_timestamps": True}, "word_timestamps"),
    ({"non_streaming_mode": True}, "non_streaming_mode"),
    ({"instructions": "a calm voice"}, "instructions"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"model": "someone-else"}, "model"),
    ({"temperature": 99}, "temperature"),
])
def test_refused_first_config_closes_with_an_error(ws_url, config, field):
    with ws_client.connect(ws_url) as conn:
        ws = OmniReader(conn)
        ws.send(type="session.config", **config)
        error = ws.read_until("error")
        assert error["message"].startswith("Invalid session config:") and field in error["message"]
        with pytest.raises(ws_exceptions.ConnectionClosed):
            conn.recv(timeout=10)


def test_later_bad_config_keeps_the_previous_one(ws_url):
    with ws_client.connect(ws_url) as conn:
        ws = OmniReader(conn)
        ws.send(type="session.config", voice="ryan", seed=4, max_new_tokens=5, response_format="pcm")
        ws.send(type="session.config", voice="nobody")
        assert "voice" in ws.read_until("error")["message"]
        ws.send(type="input.text", text="Still here.")
        ws.send(type="unknown.kind")
        assert "Unknown message type" in ws.read_until("error")["message"]
        ws.send(type="input.done")
        ws.read_until("session.done")
    assert len(ws.audio) == 1 and len(ws.audio[0]) == 5 * 1920 * 2


def test_text_before_config_is_refused(ws_url):
    with ws_client.connect(ws_url) as conn:
        ws = OmniReader(conn)
        ws.send(type="input.text", text="No config yet.")
        assert ws.read_until("error")["message"].startswith("Expected session.config")
        with pytest.raises(ws_exceptions.ConnectionClosed):
            conn.recv(timeout=10)


def test_voice_list_and_session_close(ws_url, synth):
    with ws_client.connect(ws_url) as conn:
        ws = OmniReader(conn)
        ws.send(type="voice.list")
        listed = ws.read_until("voice.list")
        assert listed["voices"] == sorted(synth.voices) and listed["uploaded_voices"] == []
        assert "english" in listed["languages"]
        ws.send(type="voice.add", name="x", consent="user_consent", audio_data="")
        assert "cannot clone voices: serve a Base model" in ws.read_until("error")["message"]
        ws.send(type="session.close")
        with pytest.raises(ws_exceptions.ConnectionClosed):
            conn.recv(timeout=10)


def test_text_over_the_limit_is_dropped_and_the_utterance_goes_on(ws_url):
    with ws_client.connect(ws_url) as conn:
        ws = OmniReader(conn)
        ws.send(type="session.config", voice="ryan", seed=4, max_new_tokens=4, response_format="pcm")
        ws.send(type="input.text", text="Fine text. ")
        ws.send(type="input.text", text="x" * 500)  # max_text_chars is 400
        assert "400 characters" in ws.read_until("error")["message"]
        ws.send(type="input.done")
        ws.read_until("session.done")
    assert len(ws.audio[-1]) == 4 * 1920 * 2


def test_disconnect_mid_utterance_cancels_the_stream(server):
    ws_url, app = server
    with ws_client.connect(ws_url) as conn:
        ws = OmniReader(conn)
        ws.send(type="session.config", voice="ryan", seed=1, max_new_tokens=1500, response_format="pcm",
                stream_audio=True)
        ws.send(type="input.text", text="A long utterance that the client abandons after its first audio.")
        ws.send(type="input.done")
        ws.read_until("audio.start")
    worker = app.state.worker
    deadline = time.monotonic() + 20
    while worker.active_count and time.monotonic() < deadline:
        time.sleep(0.02)
    assert worker.active_count == 0


def test_idle_socket_gets_an_error_and_is_closed(ws_url):
    with ws_client.connect(ws_url) as conn:
        ws = OmniReader(conn)
        ws.send(type="session.config", voice="ryan")
        assert ws.read_until("error", timeout=30)["message"].startswith("Idle timeout")
        with pytest.raises(ws_exceptions.ConnectionClosed):
            conn.recv(timeout=10)


def test_api_key_schemes(synth):
    """With a key: vLLM-Omni's and Baseten's 'Authorization: Api-Key <key>' and Bearer are accepted."""
    with running_server(synth, api_key=KEY) as (url, _app):
        ws_url = url.replace("http://", "ws://") + WS_PATH
        for header in (f"Api-Key {KEY}", f"Bearer {KEY}"):
            with ws_client.connect(ws_url, additional_headers={"Authorization": header}) as conn:
                ws = OmniReader(conn)
                omni_utterance(ws, ["Key."], voice="ryan", seed=1, max_new_tokens=3, response_format="pcm")
                assert len(ws.audio[0]) == 3 * 1920 * 2
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Api-Key {KEY}"}).status_code == 200
        for header in ({}, {"Authorization": "Api-Key wrong"}):
            with pytest.raises(ws_exceptions.WebSocketException):
                with ws_client.connect(ws_url, additional_headers=header) as conn:
                    conn.send(json.dumps({"type": "session.config"}))
                    conn.recv(timeout=10)


def test_full_server_refuses_the_utterance_in_its_shape(synth):
    """No slot and no queue place: an error, then the utterance's audio.done with error true, then session.done;
    the session goes on."""
    settings = ServerSettings(max_active=1, max_queue=0)
    with running_server(synth, settings=settings) as (url, app):
        ws_url = url.replace("http://", "ws://") + WS_PATH
        with ws_client.connect(ws_url) as busy, ws_client.connect(ws_url) as conn:
            holder = OmniReader(busy)
            holder.send(type="session.config", voice="ryan", max_new_tokens=1500, response_format="pcm",
                        stream_audio=True)
            holder.send(type="input.text", text="Holding the only slot for a while. ")
            holder.read_until("audio.start")
            ws = OmniReader(conn)
            ws.send(type="session.config", voice="ryan", response_format="pcm")
            ws.send(type="input.text", text="No room for me.")
            assert "capacity" in ws.read_until("error")["message"]
            ws.send(type="input.done")
            ws.read_until("session.done")
            assert ws.types() == ["error", "audio.start", "audio.done", "session.done"]
            assert ws.events[2]["error"] is True and ws.audio == []


def test_one_client_holds_at_most_max_client_streams_utterances(synth):
    """The per-client cap of our WebSocket counts vLLM-Omni utterances too (same client: loopback)."""
    settings = ServerSettings(max_client_streams=2, max_active=8)
    with running_server(synth, settings=settings) as (url, _app):
        ws_url = url.replace("http://", "ws://") + WS_PATH
        with ws_client.connect(ws_url) as a, ws_client.connect(ws_url) as b, ws_client.connect(ws_url) as c:
            holders = [OmniReader(a), OmniReader(b)]
            for h in holders:
                h.send(type="session.config", voice="ryan", max_new_tokens=1500, response_format="pcm")
                h.send(type="input.text", text="Holding a slot for a while. ")
                h.read_until("audio.start")
            third = OmniReader(c)
            third.send(type="session.config", voice="ryan", response_format="pcm")
            third.send(type="input.text", text="One too many.")
            assert "the limit" in third.read_until("error")["message"]


def test_trickled_characters_do_not_keep_an_utterance_open(synth):
    """An utterance whose text comes one letter at a time with no new word is closed after ws_idle_flush_s from its
    latest word, however often the letters come."""
    settings = ServerSettings(ws_idle_flush_s=1.0)
    with running_server(synth, settings=settings) as (url, _app):
        ws_url = url.replace("http://", "ws://") + WS_PATH
        with ws_client.connect(ws_url) as conn:
            ws = OmniReader(conn)
            ws.send(type="session.config", voice="ryan", max_new_tokens=1500, response_format="pcm")
            ws.send(type="input.text", text="Word ")
            started = time.monotonic()
            while time.monotonic() - started < 10:
                try:
                    ws.send(type="input.text", text=" ")
                except ws_exceptions.ConnectionClosed:
                    break
                time.sleep(0.2)
            assert time.monotonic() - started < 10, "the trickled socket was never closed"
            with contextlib.suppress(ws_exceptions.ConnectionClosed, TimeoutError):
                while True:
                    ws.read_until("never", timeout=5)
            assert any(e["type"] == "error" and e["message"].startswith("Idle timeout") for e in ws.events)


def test_shutdown_drain_cuts_an_open_utterance_with_an_error(synth):
    """The shutdown drain (server/shutdown.py) reaches vLLM-Omni sessions: an utterance still speaking after the
    grace period gets an error, then its audio.done."""
    import threading

    stack = contextlib.ExitStack()
    url, _app = stack.enter_context(running_server(synth, settings=ServerSettings(shutdown_grace_s=0.3)))
    stopper = threading.Thread(target=stack.close)
    try:
        with ws_client.connect(url.replace("http://", "ws://") + WS_PATH) as conn:
            ws = OmniReader(conn)
            ws.send(type="session.config", voice="ryan", max_new_tokens=1500, response_format="pcm")
            ws.send(type="input.text", text="Still talking when the server stops. ")
            ws.read_until("audio.start")
            stopper.start()  # what SIGTERM does: should_exit, then the drain
            assert "shutting down" in ws.read_until("error", timeout=30)["message"]
            assert ws.read_until("audio.done", timeout=30)["stop_reason"] == "cancelled"
    finally:
        if stopper.ident:
            stopper.join(30)
        else:
            stack.close()
