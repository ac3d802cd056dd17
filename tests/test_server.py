"""The streaming server, end to end: a real uvicorn server on loopback, the tiny checkpoint, real clients
(httpx, the official openai SDK, websockets)."""

from __future__ import annotations

import base64
import json
import socket
import struct
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
ws_client = pytest.importorskip("websockets.sync.client")

from qwen_tts_megakernel.engine import Synthesizer  # noqa: E402
from qwen_tts_megakernel.server.protocol import ServerSettings  # noqa: E402
from qwen_tts_megakernel.testing.server import prometheus_sum, running_server  # noqa: E402
from qwen_tts_megakernel.synthetic import write_tiny_model  # noqa: E402

TEXT = "Hello there, this is the streaming server speaking."
LONG_TEXT = "This sentence is long enough that the tiny model would talk for quite a few seconds without a limit."
WS_PATH = "/v1/audio/speech/stream"


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_server")
    write_tiny_model(path, "0.6b", "custom_voice", seed=0)
    return Synthesizer.from_pretrained(str(path), device="cpu")


@pytest.fixture(scope="module")
def server(synth):
    settings = ServerSettings(max_active=16, max_queue=16, max_text_chars=300, max_new_tokens_limit=2000)
    with running_server(synth, model_name="qwen3-tts-tiny", settings=settings) as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def url(server):
    return server[0]


def reference_pcm(synth, text, *, voice="ryan", language="auto", seed, max_new_tokens, text_layout="prefill",
                  **sampling) -> bytes:
    stream = synth.stream(text, voice=voice, language=language, seed=seed, max_new_tokens=max_new_tokens,
                          text_layout=text_layout, **sampling)
    return b"".join(chunk.pcm.astype("<i2").tobytes() for chunk in stream)


def metric_value(url: str, name: str, **labels) -> float:
    return prometheus_sum(httpx.get(f"{url}/metrics").text, name, **labels)


def wait_until(predicate, timeout=10.0, interval=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


# ---------------------------------------------------------------------------------------------------------------
# Plain endpoints


def test_health_voices_models(url, synth):
    r = httpx.get(f"{url}/health")
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["sample_rate"] == 24000
    v = httpx.get(f"{url}/v1/audio/voices").json()
    assert v["voices"] == sorted(synth.voices) and "english" in v["languages"] and v["sample_rate"] == 24000
    m = httpx.get(f"{url}/v1/models").json()
    assert m["data"][0]["id"] == "qwen3-tts-tiny"


def test_tts_stream_equals_in_process(url, synth):
    body = {"text": TEXT, "language": "english", "speaker": "ryan", "max_new_tokens": 20, "seed": 11}
    chunks = []
    with httpx.stream("POST", f"{url}/tts/stream", json=body) as r:
        assert r.status_code == 200
        assert r.headers["x-sample-rate"] == "24000"
        assert r.headers["content-type"] == "application/octet-stream"
        assert r.headers["x-seed"] == "11"
        for piece in r.iter_raw():
            chunks.append(piece)
    audio = b"".join(chunks)
    assert len(audio) == 20 * 1920 * 2
    assert audio == reference_pcm(synth, TEXT, language="english", seed=11, max_new_tokens=20)
    assert len(chunks) > 1  # streamed, not one body


def test_first_chunk_arrives_before_the_stream_ends(url):
    """Audio leaves as soon as each chunk is decoded: the first bytes come long before the last."""
    body = {"text": LONG_TEXT, "speaker": "ryan", "max_new_tokens": 60, "seed": 1}
    start = time.perf_counter()
    first = None
    with httpx.stream("POST", f"{url}/tts/stream", json=body) as r:
        for piece in r.iter_raw():
            if first is None and piece:
                first = time.perf_counter() - start
    total = time.perf_counter() - start
    assert first is not None and first < total / 3


def test_long_stream_does_not_block_another_first_chunk(url):
    long_body = {"text": LONG_TEXT, "speaker": "ryan", "max_new_tokens": 400, "seed": 2}
    short_body = {"text": "Short one.", "speaker": "aiden", "max_new_tokens": 5, "seed": 3}
    with httpx.stream("POST", f"{url}/tts/stream", json=long_body) as long_r:
        it = long_r.iter_raw()
        next(it)  # the long stream is running
        start = time.perf_counter()
        short = httpx.post(f"{url}/tts/stream", json=short_body)
        short_s = time.perf_counter() - start
        assert short.status_code == 200 and len(short.content) == 5 * 1920 * 2
        # The long one is still going: its 400 frames take several seconds at ~100 frames/s shared.
        assert short_s < 2.0
    # Leaving the `with` closes the long stream early (the server cancels it).


def test_eight_simultaneous_clients_get_exact_audio(url, synth):
    results: dict[int, bytes] = {}
    errors = []

    def client(i):
        try:
            body = {"text": f"Client number {i} says hello.", "speaker": synth.voices[i % len(synth.voices)],
                    "max_new_tokens": 12 + i, "seed": 100 + i}
            with httpx.Client(timeout=60) as c:
                r = c.post(f"{url}/tts/stream", json=body)
                assert r.status_code == 200, r.text
                results[i] = r.content
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    for i in range(8):
        expected = reference_pcm(synth, f"Client number {i} says hello.", voice=synth.voices[i % len(synth.voices)],
                                 seed=100 + i, max_new_tokens=12 + i)
        assert results[i] == expected, f"client {i}"


def test_http_disconnect_cancels_the_stream(url):
    before = metric_value(url, "qwen_tts_streams_total", endpoint="tts_stream", stop_reason="cancelled")
    frames_before = metric_value(url, "qwen_tts_frames_total")
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"text": LONG_TEXT, "speaker": "ryan", "max_new_tokens": 1500, "seed": 4}).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /tts/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    got = b""
    while len(got) < 4000:
        got += sock.recv(65536)
    assert b"200 OK" in got
    sock.close()
    assert wait_until(lambda: metric_value(url, "qwen_tts_streams_total", endpoint="tts_stream",
                                           stop_reason="cancelled") == before + 1, timeout=10)
    assert wait_until(lambda: httpx.get(f"{url}/health").json()["active_streams"] == 0)
    # Far fewer frames than the 278-frame length guard: generation stopped at the disconnect.
    assert metric_value(url, "qwen_tts_frames_total") - frames_before < 200


# ---------------------------------------------------------------------------------------------------------------
# OpenAI-compatible API, through the official SDK


@pytest.fixture(scope="module")
def oai(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def test_openai_sdk_pcm_non_streaming(oai, synth):
    r = oai.audio.speech.create(model="qwen3-tts-tiny", voice="vivian", input=TEXT, response_format="pcm",
                                extra_body={"seed": 21, "max_new_tokens": 15, "language": "english"})
    assert r.content == reference_pcm(synth, TEXT, voice="vivian", language="english", seed=21, max_new_tokens=15)
    assert r.response.headers["x-sample-rate"] == "24000"


def test_openai_sdk_wav_and_model_alias(oai, synth):
    r = oai.audio.speech.create(model="tts-1", voice="ryan", input=TEXT, response_format="wav",
                                extra_body={"seed": 22, "max_new_tokens": 10})
    data = r.content
    assert data[:4] == b"RIFF" and data[8:16] == b"WAVEfmt "
    channels, rate, bits = struct.unpack("<H", data[22:24])[0], struct.unpack("<I", data[24:28])[0], \
        struct.unpack("<H", data[34:36])[0]
    assert (channels, rate, bits) == (1, 24000, 16)
    assert data[44:] == reference_pcm(synth, TEXT, seed=22, max_new_tokens=10)


def test_openai_sdk_streaming(oai, synth):
    pieces = []
    with oai.audio.speech.with_streaming_response.create(
            model="qwen3-tts-tiny", voice="ryan", input=TEXT, response_format="pcm",
            extra_body={"seed": 23, "max_new_tokens": 16, "temperature": 0.7, "top_k": 20}) as r:
        for piece in r.iter_bytes():
            pieces.append(piece)
    assert b"".join(pieces) == reference_pcm(synth, TEXT, seed=23, max_new_tokens=16, temperature=0.7, top_k=20)


def test_openai_sdk_sse(oai, synth):
    deltas, done = [], None
    with oai.audio.speech.with_streaming_response.create(
            model="qwen3-tts-tiny", voice="ryan", input=TEXT, response_format="pcm", stream_format="sse",
            extra_body={"seed": 24, "max_new_tokens": 14}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if event["type"] == "speech.audio.delta":
                deltas.append(base64.b64decode(event["audio"]))
            elif event["type"] == "speech.audio.done":
                done = event
    assert len(deltas) > 1
    assert b"".join(deltas) == reference_pcm(synth, TEXT, seed=24, max_new_tokens=14)
    assert done["usage"]["output_tokens"] == 14 and done["stop_reason"] == "max_new_tokens"


# ---------------------------------------------------------------------------------------------------------------
# WebSocket with streamed text


class WsReader:
    """Collects a WS session's events and audio per context."""

    def __init__(self, conn):
        self.conn = conn
        self.events: list[dict] = []
        self.audio: dict[str, list[bytes]] = {}
        self.order: list[tuple[str, str]] = []  # (kind, context) in arrival order

    def send(self, **msg):
        self.conn.send(json.dumps(msg))

    def read_one(self, timeout=30.0):
        msg = self.conn.recv(timeout=timeout)
        if isinstance(msg, bytes):
            n = msg[0]
            cid = msg[1:1 + n].decode()
            self.audio.setdefault(cid, []).append(msg[1 + n:])
            self.order.append(("audio", cid))
            return ("audio", cid)
        event = json.loads(msg)
        self.events.append(event)
        self.order.append((event["type"], event.get("context_id")))
        return (event["type"], event.get("context_id"))

    def read_until(self, kind, cid, timeout=30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.read_one(timeout=deadline - time.monotonic())
            if got == (kind, cid):
                return [e for e in self.events if e.get("context_id") == cid and e["type"] == kind][-1] \
                    if kind != "audio" else None
        raise TimeoutError(f"no {kind} for {cid}")

    def pcm(self, cid) -> bytes:
        return b"".join(self.audio.get(cid, []))


def ws_url(url):
    return url.replace("http://", "ws://") + WS_PATH


def test_ws_streamed_text_two_contexts(url, synth):
    text1 = "Hello from the first context, spoken while its text is still arriving."
    text2 = "And a second voice at the same time."
    with ws_client.connect(ws_url(url)) as conn:
        ws = WsReader(conn)
        ws.send(type="config", context_id="c1", voice="ryan", language="english", seed=7, max_new_tokens=25)
        ws.send(type="config", context_id="c2", voice="serena", seed=8, max_new_tokens=18)
        # c1: only the first words; speech must start before the rest of the text exists.
        ws.send(type="text", context_id="c1", text="Hello from the ")
        ws.read_until("audio", "c1")
        assert ("audio_start", "c1") in ws.order and ws.order.index(("audio_start", "c1")) < ws.order.index(
            ("audio", "c1"))
        # Deltas of any size, split inside words.
        rest1 = text1[len("Hello from the "):]
        for i in range(0, len(rest1), 7):
            ws.send(type="text", context_id="c1", text=rest1[i:i + 7])
        for i in range(0, len(text2), 5):
            ws.send(type="text", context_id="c2", text=text2[i:i + 5])
        ws.send(type="flush", context_id="c2")
        ws.send(type="flush", context_id="c1")
        done = {}
        while len(done) < 2:
            kind, cid = ws.read_one()
            if kind == "audio_done":
                done[cid] = [e for e in ws.events if e["type"] == "audio_done" and e["context_id"] == cid][-1]
        assert not [e for e in ws.events if e["type"] == "error"]
    assert done["c1"]["stop_reason"] == "max_new_tokens" and done["c1"]["frames"] == 25
    assert done["c2"]["frames"] == 18 and done["c1"]["time_to_first_audio_ms"] > 0
    assert abs(done["c1"]["audio_seconds"] - 25 * 0.08) < 1e-6
    # Streamed text gives exactly the whole-text interleaved layout's audio for the same seed.
    assert ws.pcm("c1") == reference_pcm(synth, text1, language="english", seed=7, max_new_tokens=25,
                                         text_layout="interleaved")
    assert ws.pcm("c2") == reference_pcm(synth, text2, voice="serena", seed=8, max_new_tokens=18,
                                         text_layout="interleaved")


def test_ws_text_without_config_and_natural_end(url, synth):
    with ws_client.connect(ws_url(url)) as conn:
        ws = WsReader(conn)
        ws.send(type="text", context_id="only", text="Short.")
        ws.send(type="flush", context_id="only")
        done = ws.read_until("audio_done", "only")
    # The tiny random model never samples EOS, so a short text stops at the length guard.
    assert done["stop_reason"] == "length_guard"
    assert len(ws.pcm("only")) == done["frames"] * 1920 * 2


def test_ws_cancel(url):
    with ws_client.connect(ws_url(url)) as conn:
        ws = WsReader(conn)
        ws.send(type="config", context_id="long", voice="ryan", seed=1, max_new_tokens=1500)
        ws.send(type="text", context_id="long", text=LONG_TEXT)
        ws.send(type="flush", context_id="long")
        ws.read_until("audio", "long")
        ws.send(type="cancel", context_id="long")
        done = ws.read_until("audio_done", "long")
        assert done["stop_reason"] == "cancelled" and done["frames"] < 200
        n_audio = len(ws.audio["long"])
        # The session goes on; no more audio for the cancelled context.
        ws.send(type="text", context_id="next", text="Next one.")
        ws.send(type="cancel", context_id="nonexistent")  # ignored
        ws.send(type="config", context_id="next2", max_new_tokens=3)
        ws.send(type="text", context_id="next2", text="Three frames.")
        ws.send(type="flush", context_id="next2")
        ws.read_until("audio_done", "next2")
        ws.send(type="cancel", context_id="next")
        ws.read_until("audio_done", "next")
        assert len(ws.audio["long"]) == n_audio
        assert not [e for e in ws.events if e["type"] == "error"]
    assert wait_until(lambda: httpx.get(f"{url}/health").json()["active_streams"] == 0)


def test_ws_errors_keep_the_session_open(url):
    with ws_client.connect(ws_url(url)) as conn:
        ws = WsReader(conn)
        bad = ["{not json", json.dumps([1, 2]), json.dumps({"type": "shout", "context_id": "a"}),
               json.dumps({"type": "text", "text": "no id"}),
               json.dumps({"type": "config", "context_id": "v", "voice": "nobody"}),
               json.dumps({"type": "config", "context_id": "l", "language": "klingon"}),
               json.dumps({"type": "config", "context_id": "m", "max_new_tokens": -3}),
               json.dumps({"type": "text", "context_id": "t", "text": 5}),
               json.dumps({"type": "flush", "context_id": "never-opened"})]
        for msg in bad:
            conn.send(msg)
            kind, _ = ws.read_one()
            assert kind == "error", msg
        conn.send(b"\x00binary")
        assert ws.read_one()[0] == "error"
        ws.send(type="config", context_id="dup", max_new_tokens=2)
        ws.send(type="config", context_id="dup", max_new_tokens=2)
        assert ws.read_one() == ("error", "dup")
        messages = [e["message"] for e in ws.events]
        assert any("voice" in m for m in messages) and any("language" in m for m in messages)
        assert any("max_new_tokens" in m for m in messages)
        ws.send(type="text", context_id="dup", text="Still works.")
        ws.send(type="flush", context_id="dup")
        done = ws.read_until("audio_done", "dup")
        assert done["stop_reason"] == "max_new_tokens" and done["frames"] == 2


def test_ws_flush_without_text_is_an_error(url):
    with ws_client.connect(ws_url(url)) as conn:
        ws = WsReader(conn)
        ws.send(type="config", context_id="e", max_new_tokens=5)
        ws.send(type="text", context_id="e", text="   ")
        ws.send(type="flush", context_id="e")
        assert ws.read_one() == ("error", "e")
        done = ws.read_until("audio_done", "e")
        assert done["frames"] == 0


# ---------------------------------------------------------------------------------------------------------------
# Bad input never kills the server


BAD_INPUTS = [
    # (path, raw body, status, field named in the message)
    ("/tts/stream", b"{not json", 400, "JSON"),
    ("/tts/stream", b"[1, 2, 3]", 400, "JSON object"),
    ("/tts/stream", {"speaker": "ryan"}, 400, "text"),
    ("/tts/stream", {"text": ""}, 400, "text"),
    ("/tts/stream", {"text": "   \n\t "}, 400, "text"),
    ("/tts/stream", {"text": "x" * 301}, 400, "text"),
    ("/tts/stream", {"text": 42}, 400, "text"),
    ("/tts/stream", {"text": "hi", "speaker": "nobody"}, 400, "speaker"),
    ("/tts/stream", {"text": "hi", "language": "klingon"}, 400, "language"),
    ("/tts/stream", {"text": "hi", "max_new_tokens": -5}, 400, "max_new_tokens"),
    ("/tts/stream", {"text": "hi", "max_new_tokens": 0}, 400, "max_new_tokens"),
    ("/tts/stream", {"text": "hi", "max_new_tokens": 10 ** 9}, 400, "max_new_tokens"),
    ("/tts/stream", {"text": "hi", "max_new_tokens": "20"}, 400, "max_new_tokens"),
    ("/tts/stream", {"text": "hi", "max_new_tokens": 2.5}, 400, "max_new_tokens"),
    ("/tts/stream", {"text": "hi", "seed": -1}, 400, "seed"),
    ("/tts/stream", {"text": "hi", "temperature": 0}, 400, "temperature"),
    ("/tts/stream", {"text": "hi", "top_p": 1.5}, 400, "top_p"),
    ("/tts/stream", {"text": "hi", "instructions": "speak softly"}, 400, "instructions"),
    ("/v1/audio/speech", {"model": "qwen3-tts-tiny", "input": "hi", "voice": "ryan", "response_format": "m4a"},
     400, "response_format"),
    ("/v1/audio/speech", {"model": "qwen3-tts-tiny", "input": "hi", "voice": "ryan", "stream_format": "ogg"},
     400, "stream_format"),
    ("/v1/audio/speech", {"model": "qwen3-tts-tiny", "input": "hi", "voice": "ryan", "speed": 4.5}, 400, "speed"),
    ("/tts/stream", {"text": "hi", "speed": 0.2}, 400, "speed"),
    ("/tts/stream", {"text": "hi", "sample_rate": 11025}, 400, "sample_rate"),
    ("/tts/stream", {"text": "hi", "encoding": "opus"}, 400, "encoding"),
    ("/v1/audio/speech", {"model": "qwen3-tts-tiny", "input": "hi", "voice": "ryan", "stream": "no"}, 400,
     "stream"),
    ("/v1/audio/speech", {"model": "qwen3-tts-tiny", "input": "hi", "voice": "ryan", "speed": "fast"}, 400,
     "speed"),
    ("/v1/audio/speech", {"model": "whisper-1", "input": "hi", "voice": "ryan"}, 404, "model"),
    ("/v1/audio/speech", {"model": "qwen3-tts-tiny", "input": "hi", "voice": "nobody"}, 400, "voice"),
    ("/v1/audio/speech", {"model": "qwen3-tts-tiny", "input": "hi"}, 400, "voice"),
    ("/v1/audio/speech", {"model": "qwen3-tts-tiny", "input": "", "voice": "ryan"}, 400, "input"),
    ("/v1/audio/speech", {"model": "qwen3-tts-tiny", "input": ["hi"], "voice": "ryan"}, 400, "input"),
    ("/v1/audio/speech", {"model": "qwen3-tts-tiny", "input": "hi", "voice": 7}, 400, "voice"),
    ("/v1/audio/speech", {"model": "qwen3-tts-tiny", "input": "hi", "voice": "ryan", "top_k": True}, 400, "top_k"),
    ("/v1/audio/speech", {"model": "qwen3-tts-tiny", "input": "hi", "voice": "ryan", "repetition_penalty": -1},
     400, "repetition_penalty"),
]


@pytest.mark.parametrize("path,body,status,field", BAD_INPUTS,
                         ids=[f"{i:02d}-{p.split('/')[-1]}-{f}" for i, (p, _, _, f) in enumerate(BAD_INPUTS)])
def test_bad_input_is_a_4xx_naming_the_field(url, path, body, status, field):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{url}{path}", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert field in error["message"], error
    if error["param"] is not None:
        assert error["param"] == field


def test_server_still_correct_after_bad_inputs(url, synth):
    for path, body, _, _ in BAD_INPUTS:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        httpx.post(f"{url}{path}", content=content, headers={"Content-Type": "application/json"})
    r = httpx.post(f"{url}/tts/stream", json={"text": TEXT, "speaker": "ryan", "max_new_tokens": 9, "seed": 5})
    assert r.status_code == 200
    assert r.content == reference_pcm(synth, TEXT, seed=5, max_new_tokens=9)
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    assert metric_value(url, "qwen_tts_errors_total", kind="bad_request") >= len(BAD_INPUTS)


def test_metrics(url):
    text = httpx.get(f"{url}/metrics").text
    for name in ("qwen_tts_time_to_first_chunk_seconds", "qwen_tts_real_time_factor", "qwen_tts_active_streams",
                 "qwen_tts_queue_depth", "qwen_tts_frames_per_second", "qwen_tts_frames_total",
                 "qwen_tts_streams_total", "qwen_tts_errors_total"):
        assert name in text, name
    assert metric_value(url, "qwen_tts_streams_total", stop_reason="max_new_tokens") > 0
    assert metric_value(url, "qwen_tts_time_to_first_chunk_seconds_count", endpoint="tts_stream") > 0


# ---------------------------------------------------------------------------------------------------------------
# Backpressure and auth (their own small servers)


def test_queue_overflow_is_503_with_retry_after(synth):
    """One stream runs, one waits for its slot (its 200 comes when it starts), a third is refused at once."""
    settings = ServerSettings(max_active=1, max_queue=1)
    with running_server(synth, settings=settings) as (url, app):
        body = {"text": LONG_TEXT, "speaker": "ryan", "max_new_tokens": 1500, "seed": 1}
        queued: dict = {}
        with httpx.Client(timeout=30) as c1:
            with c1.stream("POST", f"{url}/tts/stream", json=body) as r1:
                assert r1.status_code == 200
                it = r1.iter_raw()  # keep the iterator: dropping it closes the connection
                next(it)
                waiter = threading.Thread(target=lambda: queued.update(
                    r=httpx.post(f"{url}/tts/stream", json={**body, "max_new_tokens": 3}, timeout=30)))
                waiter.start()
                assert wait_until(lambda: httpx.get(f"{url}/health").json()["queue_depth"] == 1)
                r3 = httpx.post(f"{url}/tts/stream", json=body)
                assert r3.status_code == 503 and r3.headers["retry-after"] == "1"
                assert "capacity" in r3.json()["error"]["message"]
                with ws_client.connect(ws_url(url)) as conn:
                    ws = WsReader(conn)
                    ws.send(type="text", context_id="x", text="hi there")  # a complete word: it asks for a slot
                    assert ws.read_one() == ("error", "x")
        waiter.join(30)  # r1 closed: the queued request got its slot
        assert queued["r"].status_code == 200 and len(queued["r"].content) == 3 * 1920 * 2
        assert wait_until(lambda: httpx.get(f"{url}/health").json()["active_streams"] == 0)
        assert wait_until(lambda: httpx.get(f"{url}/health").json()["queue_depth"] == 0)
        r4 = httpx.post(f"{url}/tts/stream", json={**body, "max_new_tokens": 3})
        assert r4.status_code == 200 and len(r4.content) == 3 * 1920 * 2
        assert metric_value(url, "qwen_tts_errors_total", kind="queue_full") == 2


def test_api_key(synth):
    with running_server(synth, api_key="s3cret") as (url, app):
        assert httpx.get(f"{url}/health").status_code == 200
        for path in ("/v1/audio/voices", "/metrics", "/v1/models"):
            assert httpx.get(f"{url}{path}").status_code == 401
            assert httpx.get(f"{url}{path}", headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert httpx.get(f"{url}{path}", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        r = httpx.post(f"{url}/tts/stream", json={"text": "hi", "max_new_tokens": 2})
        assert r.status_code == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).audio.speech.create(
                model="qwen3-tts", voice="ryan", input="hi", response_format="pcm")
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        r = good.audio.speech.create(model="qwen3-tts", voice="ryan", input="hi", response_format="pcm",
                                     extra_body={"max_new_tokens": 2})
        assert len(r.content) == 2 * 1920 * 2
        with pytest.raises(Exception):
            with ws_client.connect(ws_url(url)) as conn:
                conn.recv(timeout=5)
        with ws_client.connect(ws_url(url), additional_headers={"Authorization": "Bearer s3cret"}) as conn:
            ws = WsReader(conn)
            ws.send(type="config", context_id="a", max_new_tokens=2)
            ws.send(type="text", context_id="a", text="hi")
            ws.send(type="flush", context_id="a")
            assert ws.read_until("audio_done", "a")["frames"] == 2
