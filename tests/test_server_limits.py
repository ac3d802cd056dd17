"""The server's limits, timeouts and safe defaults, through a real server on loopback (tiny checkpoint): bad input
over HTTP and WebSocket (each case followed by a healthy-server check), streamed text split inside a character,
body/JSON limits, Host/Origin/Content-Type, the API key (docs, logs, empty key, public bind), idle contexts, queue
timeouts, one abusive client against another's first audio, and a soak of cancelled streams."""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import socket
import threading
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
ws_client = pytest.importorskip("websockets.sync.client")
ws_exceptions = pytest.importorskip("websockets.exceptions")

from qwen_tts_megakernel.backends import reference as engine_module  # noqa: E402
from qwen_tts_megakernel.engine import Synthesizer  # noqa: E402
from qwen_tts_megakernel.sampling import SamplingError  # noqa: E402
from qwen_tts_megakernel.server.app import create_app, run_serve  # noqa: E402
from qwen_tts_megakernel.server.protocol import ServerSettings  # noqa: E402
from qwen_tts_megakernel.synthetic import write_tiny_model  # noqa: E402
from qwen_tts_megakernel.testing.server import first_audio_s, prometheus_sum, running_server  # noqa: E402

WS_PATH = "/v1/audio/speech/stream"
KV_POSITIONS = 600  # the module's backend gets a small KV capacity, so that prompts + frames can overflow it
HEALTHY = {"text": "Still healthy.", "speaker": "ryan", "max_new_tokens": 2, "seed": 3}
SETTINGS = dict(max_active=8, max_queue=8, max_text_chars=300, max_text_tokens=200, max_new_tokens_limit=2000,
                max_body_bytes=8192, max_json_depth=8, max_json_number_chars=24, max_ws_contexts=3,
                max_ws_message_bytes=16384)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_limits")
    write_tiny_model(path, "0.6b", "custom_voice", seed=0)
    synth = Synthesizer.from_pretrained(str(path), device="cpu")
    synth.backend.max_seq_len = KV_POSITIONS
    return synth


@pytest.fixture(scope="module")
def url(synth):
    with running_server(synth, model_name="tiny", settings=ServerSettings(**SETTINGS)) as (url, app):
        yield url


@pytest.fixture(scope="module")
def healthy_pcm(synth):
    stream = synth.stream(HEALTHY["text"], voice="ryan", seed=3, max_new_tokens=2)
    return b"".join(chunk.pcm.astype("<i2").tobytes() for chunk in stream)


def ws_url(url: str) -> str:
    return url.replace("http://", "ws://") + WS_PATH


def assert_healthy(url: str, healthy_pcm: bytes) -> None:
    """A normal request still gets the right audio, and /health says ok."""
    r = httpx.post(f"{url}/tts/stream", json=HEALTHY, timeout=30)
    assert r.status_code == 200, r.text
    assert r.content == healthy_pcm
    assert httpx.get(f"{url}/health").json()["status"] == "ok"


def wait_until(predicate, timeout=10.0, interval=0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def read_event(conn, timeout=20.0):
    """The next JSON event (audio frames are skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        msg = conn.recv(timeout=max(0.01, deadline - time.monotonic()))
        if isinstance(msg, str):
            return json.loads(msg)


def read_until(conn, kind, cid=None, timeout=20.0):
    """Events up to and including the first of `kind` (for `cid`); returns them and the audio bytes of `cid`."""
    events, audio = [], bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = conn.recv(timeout=max(0.01, deadline - time.monotonic()))
        if isinstance(msg, bytes):
            n = msg[0]
            if cid is None or msg[1:1 + n].decode() == cid:
                audio += msg[1 + n:]
            continue
        event = json.loads(msg)
        events.append(event)
        if event["type"] == kind and (cid is None or event.get("context_id") == cid):
            return events, bytes(audio)
    raise TimeoutError(f"no {kind} event")


# ---------------------------------------------------------------------------------------------------------------
# Bad input over HTTP: (path, body: object | raw bytes, extra headers, status, substring of the message)

_DEEP = ("[" * 9 + "]" * 9)
OPENAI = {"model": "tiny", "input": "hi", "voice": "ryan"}
HTTP_BAD = [
    ("/tts/stream", b'{"text": "hi \\ud83d there"}', {}, 400, "Unicode"),
    ("/tts/stream", b'{"text": "\\ude00"}', {}, 400, "Unicode"),
    ("/v1/audio/speech", b'{"model": "tiny", "voice": "ryan", "input": "a\\udbffb"}', {}, 400, "input"),
    ("/tts/stream", {"text": "hi", "temperature": 1e-45}, {}, 400, "temperature"),
    ("/tts/stream", {"text": "hi", "temperature": 0.001}, {}, 400, "temperature"),
    ("/tts/stream", {"text": "hi", "temperature": 11}, {}, 400, "temperature"),
    ("/tts/stream", {"text": "hi", "temperature": "hot"}, {}, 400, "temperature"),
    ("/tts/stream", {"text": "hi", "top_k": 0}, {}, 400, "top_k"),
    ("/tts/stream", {"text": "hi", "top_k": 257}, {}, 400, "top_k"),
    ("/tts/stream", {"text": "hi", "top_k": 3.5}, {}, 400, "top_k"),
    ("/tts/stream", {"text": "hi", "top_p": 0}, {}, 400, "top_p"),
    ("/tts/stream", {"text": "hi", "top_p": -1}, {}, 400, "top_p"),
    ("/tts/stream", {"text": "hi", "repetition_penalty": 0.1}, {}, 400, "repetition_penalty"),
    ("/tts/stream", {"text": "hi", "repetition_penalty": 1e300}, {}, 400, "repetition_penalty"),
    ("/v1/audio/speech", {**OPENAI, "repetition_penalty": 2.5}, {}, 400, "repetition_penalty"),
    ("/v1/audio/speech", {**OPENAI, "temperature": 1e-30}, {}, 400, "temperature"),
    ("/tts/stream", {"text": "\u00ff" * 300}, {}, 400, "tokens"),
    ("/tts/stream", {"text": "word " * 60, "max_new_tokens": 2000}, {}, 400, "max_new_tokens"),
    ("/tts/stream", {"text": "word " * 60, "max_new_tokens": 1200}, {}, 400, "positions"),
    ("/tts/stream", {"text": "x" * 9000}, {}, 413, "larger than 8192"),
    ("/tts/stream", None, {"_chunked": "1"}, 413, "larger than 8192"),
    ("/tts/stream", ('{"text": "hi", "x": ' + _DEEP + "}").encode(), {}, 400, "nests deeper than 8"),
    ("/tts/stream", b"[" * 4000 + b"]" * 4000, {}, 400, "nests deeper"),
    ("/tts/stream", b'{"text": "hi", "seed": 1' + b"0" * 4000 + b"}", {}, 400, "characters; the limit is 24"),
    ("/tts/stream", b'{"text": "hi", "temperature": 1e999}', {}, 400, "out of range"),
    ("/tts/stream", b'{"text": "hi", "top_p": NaN}', {}, 400, "NaN"),
    ("/tts/stream", b'{"text": "hi", "top_p": -Infinity}', {}, 400, "Infinity"),
    ("/tts/stream", {"text": "hi"}, {"Content-Type": "text/plain"}, 415, "Content-Type"),
    ("/tts/stream", {"text": "hi"}, {"Content-Type": ""}, 415, "Content-Type"),
    ("/v1/audio/speech", OPENAI, {"Content-Type": "application/x-www-form-urlencoded"}, 415, "Content-Type"),
    ("/tts/stream", {"text": "hi"}, {"Host": "evil.example"}, 403, "Host"),
    ("/tts/stream", {"text": "hi"}, {"Host": "attacker.com:8001"}, 403, "Host"),
    ("/tts/stream", {"text": "hi"}, {"Origin": "https://evil.example"}, 403, "Origin"),
    ("/v1/audio/speech", OPENAI, {"Origin": "null"}, 403, "Origin"),
    ("/v1/audio/speech", {**OPENAI, "model": "m" * 5000}, {}, 404, "model"),
    ("/v1/audio/speech", {**OPENAI, "voice": "v" * 5000}, {}, 400, "voice"),
    ("/tts/stream", {"text": "hi", "language": "l" * 5000}, {}, 400, "language"),
    ("/v1/audio/speech", {**OPENAI, "response_format": "f" * 5000}, {}, 400, "response_format"),
    ("/tts/stream", {"text": {"nested": "object"}}, {}, 400, "text"),
    ("/v1/audio/speech", {**OPENAI, "input": None}, {}, 400, "input"),
    ("/tts/stream", {"text": "hi", "seed": 2 ** 63}, {}, 400, "seed"),
    ("/tts/stream", {"text": "hi", "seed": "1"}, {}, 400, "seed"),
    ("/tts/stream", {"text": "hi", "max_new_tokens": True}, {}, 400, "max_new_tokens"),
    ("/tts/stream", b'{"text": "\xff\xfe"}', {}, 400, "JSON"),
    ("/tts/stream", b"", {}, 400, "JSON"),
    ("/tts/stream", b"null", {}, 400, "JSON object"),
    ("/tts/stream", b'"just a string"', {}, 400, "JSON object"),
    ("/tts/stream", {"text": "hi", "instructions": "i" * 400}, {}, 400, "instructions"),
]


def _post(url, path, body, headers):
    headers = dict(headers)
    if headers.pop("_chunked", None):
        def pieces():  # no Content-Length: the limit is counted while the body streams in
            for _ in range(20):
                yield b" " * 1000
        return httpx.post(f"{url}{path}", content=pieces(), headers={"Content-Type": "application/json"})
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{url}{path}", content=content, headers={"Content-Type": "application/json", **headers})


@pytest.mark.parametrize("path,body,headers,status,needle", HTTP_BAD,
                         ids=[f"http{i:02d}-{n[:24]}" for i, (_, _, _, _, n) in enumerate(HTTP_BAD)])
def test_http_bad_input(url, healthy_pcm, path, body, headers, status, needle):
    r = _post(url, path, body, headers)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle in error["message"], error
    assert len(error["message"]) < 400  # never the whole offending value
    assert_healthy(url, healthy_pcm)


# ---------------------------------------------------------------------------------------------------------------
# Bad input over the WebSocket: raw messages sent in order; the last must answer an error naming `needle`.


def _msg(**fields) -> str:
    return json.dumps(fields)  # ensure_ascii: lone surrogates travel as \udXXX escapes, as JSON.stringify writes them


WS_BAD = [
    ([_msg(type="text", context_id="a", text="hi \ude00")], "half a character"),
    ([_msg(type="text", context_id="a", text="hi \ud83d"), _msg(type="text", context_id="a", text="x")],
     "half a character"),
    ([_msg(type="text", context_id="a", text="bye \ud83d"), _msg(type="flush", context_id="a")],
     "ended in half a character"),
    ([_msg(type="config", context_id="a", temperature=1e-45)], "temperature"),
    ([_msg(type="config", context_id="a", top_k=0)], "top_k"),
    ([_msg(type="config", context_id="a", top_p=2)], "top_p"),
    ([_msg(type="config", context_id="a", repetition_penalty=100)], "repetition_penalty"),
    ([_msg(type="config", context_id="a", max_new_tokens=2001)], "max_new_tokens"),
    ([_msg(type="config", context_id="a", max_new_tokens=599)], "positions"),
    ([json.dumps({"type": "config", "context_id": "a", "x": [[[[[[[[[]]]]]]]]]})], "nests deeper"),
    (['{"type": "config", "context_id": "a", "seed": 1' + "0" * 100 + "}"], "characters"),
    (['{"type": "config", "context_id": "a", "seed": NaN}'], "NaN"),
    ([_msg(type="text", context_id="c" * 300, text="hi")], "context_id"),
    ([_msg(type="text", context_id="\ud800", text="hi")], "context_id"),
    ([_msg(type="config", context_id=f"k{i}") for i in range(4)], "open contexts"),
    ([_msg(type="text", context_id="a", text="x" * 301)], "300 characters"),
    ([_msg(type="text", context_id="a", text="\u00ff" * 150)], "200 tokens"),
    ([_msg(type="shout" * 2000, context_id="a")], "unknown message type"),
    ([_msg(type="config", context_id="a", voice="v" * 5000)], "voice"),
    ([_msg(type="text", context_id="a", text="hi"), _msg(type="flush", context_id="a"),
      _msg(type="text", context_id="a", text="more")], "flushed"),
    ([_msg(type="config", context_id="a"), _msg(type="config", context_id="a")], "already exists"),
    (["{not json"], "JSON"),
    ([json.dumps([1, 2])], "JSON object"),
    ([_msg(context_id="a")], "unknown message type"),
    ([_msg(type="text", context_id="a", text=7)], "'text' must be a string"),
    ([_msg(type="config", context_id="a", language="klingon")], "language"),
    ([_msg(type="flush", context_id="never")], "unknown context"),
]


@pytest.mark.parametrize("messages,needle", WS_BAD, ids=[f"ws{i:02d}-{n[:24]}" for i, (_, n) in enumerate(WS_BAD)])
def test_ws_bad_input(url, synth, healthy_pcm, messages, needle):
    with ws_client.connect(ws_url(url)) as conn:
        for message in messages:
            conn.send(message)
        events, _ = read_until(conn, "error")
        while needle not in events[-1]["message"]:  # earlier messages may have their own answers first
            events += read_until(conn, "error")[0]
        assert len(events[-1]["message"]) < 400
        for message in messages:  # end what the case opened (it may hold this socket's contexts)
            try:
                conn.send(_msg(type="cancel", context_id=json.loads(message)["context_id"]))
            except (ValueError, KeyError, TypeError):
                pass
        # The session goes on: a good context on the same socket gets its audio.
        conn.send(_msg(type="config", context_id="good", max_new_tokens=2, seed=5))
        conn.send(_msg(type="text", context_id="good", text="Fine."))
        conn.send(_msg(type="flush", context_id="good"))
        events, audio = read_until(conn, "audio_done", "good")
        assert events[-1]["frames"] == 2 and len(audio) == 2 * 1920 * 2
    assert_healthy(url, healthy_pcm)


def test_bad_input_tables_are_large_enough():
    assert len(HTTP_BAD) + len(WS_BAD) >= 60


# ---------------------------------------------------------------------------------------------------------------
# Streamed text split inside a character; special tokens in text


def test_ws_character_split_across_deltas_is_joined(url, synth, healthy_pcm):
    text = "Smile \U0001F600 now, please."
    with ws_client.connect(ws_url(url)) as conn:
        conn.send(_msg(type="config", context_id="e", seed=9, max_new_tokens=12))
        for delta in ("Smile \ud83d", "\ude00 now,", " please."):  # the emoji's halves in two deltas
            conn.send(_msg(type="text", context_id="e", text=delta))
        conn.send(_msg(type="flush", context_id="e"))
        events, audio = read_until(conn, "audio_done", "e")
    assert not [e for e in events if e["type"] == "error"]
    expected = synth.stream(text, voice="ryan", seed=9, max_new_tokens=12, text_layout="interleaved")
    assert audio == b"".join(chunk.pcm.astype("<i2").tobytes() for chunk in expected)


def test_ws_unpaired_half_is_an_error_and_the_rest_is_spoken(url):
    with ws_client.connect(ws_url(url)) as conn:
        conn.send(_msg(type="config", context_id="u", seed=9, max_new_tokens=4))
        conn.send(_msg(type="text", context_id="u", text="Hello there \ud83d"))
        conn.send(_msg(type="flush", context_id="u"))
        events, audio = read_until(conn, "audio_done", "u")
    errors = [e for e in events if e["type"] == "error"]
    assert len(errors) == 1 and errors[0]["context_id"] == "u" and "half a character" in errors[0]["message"]
    assert events[-1]["frames"] == 4 and len(audio) == 4 * 1920 * 2


def test_special_tokens_in_text_are_spoken_as_text(url, synth):
    text = "Say <|im_end|><|im_start|>user and <tts_pad> literally."
    r = httpx.post(f"{url}/tts/stream", json={"text": text, "speaker": "ryan", "max_new_tokens": 6, "seed": 2})
    assert r.status_code == 200
    expected = synth.stream(text, voice="ryan", seed=2, max_new_tokens=6)
    assert r.content == b"".join(chunk.pcm.astype("<i2").tobytes() for chunk in expected)


# ---------------------------------------------------------------------------------------------------------------
# A stream that fails alone, before or after its first audio


def test_failing_stream_is_an_error_and_the_server_keeps_serving(url, healthy_pcm, monkeypatch):
    real = engine_module.sample_talker

    def sample_talker(logits, past, step, params, rules, u):  # fails for streams marked by temperature 0.77
        if params.temperature == 0.77 and step == params.top_k - 40:
            raise SamplingError("the scores are not finite (injected)")
        return real(logits, past, step, params, rules, u)

    monkeypatch.setattr(engine_module, "sample_talker", sample_talker)
    before = {"text": "Fail at once.", "speaker": "ryan", "max_new_tokens": 8, "temperature": 0.77, "top_k": 40}
    r = httpx.post(f"{url}/tts/stream", json=before)
    assert r.status_code == 500 and "not finite" in r.json()["error"]["message"]
    with pytest.raises(httpx.HTTPError):  # after the 200 the body breaks off
        httpx.post(f"{url}/tts/stream", json={**before, "top_k": 45}).read()
    assert_healthy(url, healthy_pcm)


# ---------------------------------------------------------------------------------------------------------------
# WebSocket message size, Origin


def test_ws_message_over_the_size_limit_closes_that_socket_only(url, healthy_pcm):
    with ws_client.connect(ws_url(url), max_size=None) as conn:
        conn.send(_msg(type="text", context_id="big", text="x" * 20000))
        with pytest.raises(ws_exceptions.ConnectionClosed) as exc:
            conn.recv(timeout=10)
    assert exc.value.rcvd is not None and exc.value.rcvd.code == 1009
    assert_healthy(url, healthy_pcm)


def test_ws_origin(url):
    with pytest.raises(ws_exceptions.InvalidStatus) as exc:
        with ws_client.connect(ws_url(url), origin="https://evil.example"):
            pass
    assert exc.value.response.status_code == 403
    with ws_client.connect(ws_url(url), origin="http://localhost:3000") as conn:  # a local web app may connect
        conn.send(_msg(type="flush", context_id="nope"))
        assert read_event(conn)["type"] == "error"


def test_allowed_and_cors_origins(synth):
    settings = ServerSettings(cors_origins=("https://app.example",))
    with running_server(synth, settings=settings) as (url, app):
        r = httpx.options(f"{url}/tts/stream", headers={"Origin": "https://app.example",
                                                        "Access-Control-Request-Method": "POST",
                                                        "Access-Control-Request-Headers": "content-type"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        assert httpx.get(f"{url}/v1/models", headers={"Origin": "https://other.example"}).status_code == 403
    with running_server(synth) as (url, app):  # no CORS unless configured
        r = httpx.get(f"{url}/v1/models", headers={"Origin": "http://127.0.0.1:9999"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


# ---------------------------------------------------------------------------------------------------------------
# The API key: docs, logs, empty key, public bind


def test_docs_are_off_with_a_key(synth):
    with running_server(synth) as (url, app):
        assert httpx.get(f"{url}/docs").status_code == 200 and httpx.get(f"{url}/openapi.json").status_code == 200
    with running_server(synth, api_key="k") as (url, app):
        for path in ("/docs", "/openapi.json"):
            assert httpx.get(f"{url}{path}").status_code == 404
            assert httpx.get(f"{url}{path}", headers={"Authorization": "Bearer k"}).status_code == 404


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_api_key_never_appears_in_logs(synth):
    key = "s3cret-key-123"
    capture = _Capture()
    loggers = [logging.getLogger(n) for n in ("uvicorn.access", "uvicorn.error")]
    with running_server(synth, api_key=key, log_level="info") as (url, app):
        for logger in loggers:
            logger.addHandler(capture)
        try:
            with ws_client.connect(ws_url(url) + f"?api_key={key}") as conn:
                conn.send(_msg(type="flush", context_id="x"))
                read_event(conn)
            httpx.get(f"{url}/v1/models?api_key={key}&x=1")
        finally:
            for logger in loggers:
                logger.removeHandler(capture)
    text = "\n".join(capture.lines)
    assert "api_key=***" in text and key not in text


def _serve_args(**kw):
    base = dict(model="/nonexistent/model", backend="reference", device="cpu", dtype=None, host="127.0.0.1",
                port=1, api_key=None, allow_unauthenticated_public=False)
    return SimpleNamespace(**{**base, **kw})


def test_empty_key_is_refused(synth, capsys, monkeypatch):
    with pytest.raises(ValueError, match="empty"):
        create_app(synth, api_key="")
    assert run_serve(_serve_args(api_key="")) == 2
    assert "API key is empty" in capsys.readouterr().err
    monkeypatch.setenv("QWEN_TTS_MK_API_KEY", "  ")
    assert run_serve(_serve_args()) == 2


def test_public_bind_without_key_is_refused(capsys, monkeypatch):
    monkeypatch.delenv("QWEN_TTS_MK_API_KEY", raising=False)
    for host in ("0.0.0.0", "192.168.1.10", "::"):
        assert run_serve(_serve_args(host=host)) == 2
        err = capsys.readouterr().err
        assert "--allow-unauthenticated-public" in err and "Traceback" not in err and "loading" not in err


# ---------------------------------------------------------------------------------------------------------------
# Idle contexts, queue timeouts


def test_idle_context_is_flushed_with_an_event(synth):
    with running_server(synth, settings=ServerSettings(ws_idle_flush_s=0.3)) as (url, app):
        with ws_client.connect(ws_url(url)) as conn:
            # "Never" is committed (3 tokens: 3 frames), then the context waits for more text until the idle flush.
            conn.send(_msg(type="config", context_id="talk", seed=4, max_new_tokens=6))
            conn.send(_msg(type="text", context_id="talk", text="Never flushed"))
            conn.send(_msg(type="config", context_id="silent"))
            start = time.monotonic()
            events, audio = [], bytearray()
            while {e["context_id"] for e in events if e["type"] == "audio_done"} != {"talk", "silent"}:
                more, pcm = read_until(conn, "audio_done", None)
                events += more
                audio += pcm
            assert time.monotonic() - start < 5
            assert {"type": "idle_flush", "context_id": "talk"} in [
                {k: e[k] for k in ("type", "context_id")} for e in events]
            done = {e["context_id"]: e for e in events if e["type"] == "audio_done"}
            assert done["talk"]["frames"] == 6 and len(audio) == 6 * 1920 * 2  # "silent" has no audio
            assert done["silent"]["frames"] == 0
            assert any(e["type"] == "error" and e["context_id"] == "silent" and "empty" in e["message"]
                       for e in events)


def test_queue_timeout(synth):
    settings = ServerSettings(max_active=1, max_queue=4, queue_timeout_s=0.5)
    long_body = {"text": "A long one that keeps its slot.", "speaker": "ryan", "max_new_tokens": 1500, "seed": 1}
    with running_server(synth, settings=settings) as (url, app):
        with httpx.Client(timeout=30) as c1, c1.stream("POST", f"{url}/tts/stream", json=long_body) as r1:
            it = r1.iter_raw()
            next(it)
            start = time.monotonic()
            r2 = httpx.post(f"{url}/tts/stream", json={**long_body, "max_new_tokens": 2}, timeout=30)
            assert r2.status_code == 503 and "no stream slot" in r2.json()["error"]["message"]
            assert 0.4 < time.monotonic() - start < 5 and r2.headers["retry-after"] == "1"
            with ws_client.connect(ws_url(url)) as conn:
                conn.send(_msg(type="text", context_id="q", text="Waiting."))
                conn.send(_msg(type="flush", context_id="q"))
                events, _ = read_until(conn, "audio_done", "q")
            assert any(e["type"] == "error" and "no stream slot" in e["message"] for e in events)
            assert events[-1]["stop_reason"] == "cancelled"
        assert wait_until(lambda: httpx.get(f"{url}/health").json()["queue_depth"] == 0)


# ---------------------------------------------------------------------------------------------------------------
# One abusive client cannot keep another from its first audio




SLOT_SETTINGS = dict(max_active=4, max_queue=2, max_ws_contexts=2, ws_idle_flush_s=0.5, queue_timeout_s=5,
                     consumer_stall_s=0.5, max_buffered_chunks=2)


def test_idle_websocket_contexts_cannot_hold_every_slot(synth):
    with running_server(synth, settings=ServerSettings(**SLOT_SETTINGS)) as (url, app):
        with ws_client.connect(ws_url(url)) as abuser:
            for i in range(10):  # contexts with text, never flushed
                abuser.send(_msg(type="text", context_id=f"idle{i}", text="Hold this slot "))
            refused = 0
            while refused < 8:
                event = read_event(abuser)
                refused += event["type"] == "error" and "open contexts" in event["message"]
            assert first_audio_s(url, HEALTHY) < 1.0  # the per-socket cap leaves slots for others
            # The idle contexts are flushed after ws_idle_flush_s (then they speak, up to their length guard).
            read_until(abuser, "idle_flush", "idle0", timeout=10)
            for cid in ("idle0", "idle1"):
                abuser.send(_msg(type="cancel", context_id=cid))
            read_until(abuser, "audio_done", "idle0", timeout=20)
            read_until(abuser, "audio_done", "idle1", timeout=20)
        assert wait_until(lambda: httpx.get(f"{url}/health").json()["active_streams"] == 0)


def test_readers_that_stop_reading_cannot_hold_every_slot(synth):
    """Readers that never read fill every slot and queue place; once their socket buffers are full, the engine ends
    their streams after consumer_stall_s, and another client gets its first audio within 1 s again."""
    settings = ServerSettings(**SLOT_SETTINGS)
    body = {"text": "word " * 40, "speaker": "ryan", "seed": 1}  # about 540 frames: the KV capacity's rest
    # Small kernel send buffers: the readers back the server up within a few chunks (with loopback's megabytes
    # the streams were nearly over before they stalled, and the test took minutes).
    with running_server(synth, settings=settings, send_buffer_bytes=8192) as (url, app):
        host, port = url.removeprefix("http://").split(":")
        raw = json.dumps(body).encode()
        readers = []
        try:
            for _ in range(settings.max_active + settings.max_queue):  # readers that never read
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.connect((host, int(port)))
                sock.sendall(b"POST /tts/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                             + f"Content-Length: {len(raw)}\r\n\r\n".encode() + raw)
                readers.append(sock)
            assert wait_until(lambda: httpx.get(f"{url}/health").json()["active_streams"] == settings.max_active)
            # How long that takes depends on how fast this machine fills the readers' socket buffers with audio.
            assert wait_until(lambda: httpx.get(f"{url}/health").json()["active_streams"] == 0, timeout=120)
            assert first_audio_s(url, HEALTHY) < 1.0
        finally:
            for sock in readers:
                sock.close()


# ---------------------------------------------------------------------------------------------------------------
# Soak: cancelled and disconnected streams leave nothing behind


def _rss() -> int:
    """Resident memory after a full collection, with the C allocator's free pages given back (glibc)."""
    psutil = pytest.importorskip("psutil")
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return psutil.Process().memory_info().rss


def test_soak_cancelled_and_disconnected_streams(synth):
    """1,000 streams cancelled or hung up on, over HTTP and WebSocket: memory stays flat, nothing stays active."""
    settings = ServerSettings(max_active=16, max_queue=64)
    body = {"text": "Soak test stream.", "speaker": "ryan", "max_new_tokens": 40, "seed": 1}

    def http_disconnects(n):
        with httpx.Client(timeout=30) as client:
            for _ in range(n):
                with client.stream("POST", f"{url}/tts/stream", json=body) as r:
                    assert r.status_code == 200
                    next(r.iter_raw())  # first audio, then hang up (an unread response closes its connection)

    def ws_cancels(n):
        with ws_client.connect(ws_url(url)) as conn:
            for i in range(n):
                cid = f"c{i}"
                conn.send(_msg(type="config", context_id=cid, max_new_tokens=40))
                conn.send(_msg(type="text", context_id=cid, text="Soak test "))
                if i % 2:
                    conn.send(_msg(type="flush", context_id=cid))
                conn.send(_msg(type="cancel", context_id=cid))
                read_until(conn, "audio_done", cid)

    def ws_disconnects(n):
        for _ in range(n):
            with ws_client.connect(ws_url(url)) as conn:
                conn.send(_msg(type="text", context_id="d", text="Disconnect mid stream."))
                conn.send(_msg(type="flush", context_id="d"))
                while not isinstance(conn.recv(timeout=20), bytes):
                    pass

    errors = []

    def guarded(fn, n):
        try:
            fn(n)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    def run(n_http, n_ws_cancel, n_ws_disconnect):
        jobs = [(http_disconnects, n_http // 2)] * 2 + [(ws_cancels, n_ws_cancel // 2)] * 2 + [
            (ws_disconnects, n_ws_disconnect)]
        threads = [threading.Thread(target=guarded, args=job) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors

    start = time.monotonic()
    with running_server(synth, settings=settings) as (url, app):
        run(60, 60, 10)  # warm-up
        assert wait_until(lambda: httpx.get(f"{url}/health").json()["active_streams"] == 0)
        rss_before = _rss()
        run(150, 800, 50)  # 1,000 streams
        assert wait_until(lambda: httpx.get(f"{url}/health").json()["active_streams"] == 0, timeout=30)
        health = httpx.get(f"{url}/health").json()
        assert health["queue_depth"] == 0 and health["status"] == "ok"
        cancelled = prometheus_sum(httpx.get(f"{url}/metrics").text, "qwen_tts_streams_total",
                                   stop_reason="cancelled")
        assert cancelled >= 1000 + 130
        rss_after = _rss()
        print(f"soak: RSS {rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB, "
              f"{time.monotonic() - start:.1f} s")
    assert rss_after <= rss_before * 1.05, (rss_before, rss_after)


def test_serve_reports_its_address_only_once_bound(tmp_path):
    import subprocess
    import sys

    write_tiny_model(tmp_path, "0.6b", "custom_voice", seed=0)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "qwen_tts_megakernel.cli", "serve", "--model", str(tmp_path),
                            "--device", "cpu", "--port", str(port)], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "serving on" not in r.stderr and "Traceback" not in r.stderr
    assert "address already in use" in r.stderr.lower() or "errno" in r.stderr.lower()


def test_slow_headers_and_silent_connections_are_closed(synth, healthy_pcm):
    with running_server(synth, settings=ServerSettings(header_timeout_s=0.5)) as (url, app):
        host, port = url.removeprefix("http://").split(":")
        slow, silent = socket.create_connection((host, int(port))), socket.create_connection((host, int(port)))
        try:
            slow.sendall(b"POST /tts/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and the rest never comes
            for sock in (slow, silent):
                sock.settimeout(5)
                start = time.monotonic()
                assert sock.recv(1024) == b""  # closed by the server
                assert time.monotonic() - start < 3
        finally:
            slow.close()
            silent.close()
        # Complete requests are not affected, including on a kept-alive connection.
        with httpx.Client() as client:
            for _ in range(2):
                r = client.post(f"{url}/tts/stream", json=HEALTHY)
                assert r.status_code == 200 and r.content == healthy_pcm
                time.sleep(0.7)
