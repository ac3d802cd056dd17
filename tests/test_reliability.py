"""No client can exhaust the server's memory, connections or slots (issue 25), each class through the real code:
reference clips bounded before they are decoded (FLAC, WAV, MP3 claiming an hour; the CLI on /dev/zero), the
connection limits (trickled bodies, oversized headers, chunked uploads, duplicate Host), WebSocket slots that
trickles cannot hold, idle sockets, a graceful shutdown, and the JSON shape of resource errors. Every server test
ends with a healthy server whose audio is exact; timeouts are small settings, never guesses of machine speed."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import select
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
from qwen_tts_megakernel.testing.server import TTSServerProcess, first_audio_s, running_server  # noqa: E402
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


# ---------------------------------------------------------------------------------------------------------------
# The server (tiny CustomVoice model)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_reliability")
    write_tiny_model(path, "0.6b", "custom_voice", seed=0)
    return Synthesizer.from_pretrained(str(path), device="cpu")


@pytest.fixture(scope="module")
def healthy_pcm(synth):
    stream = synth.stream(HEALTHY["text"], voice="ryan", seed=3, max_new_tokens=2)
    return b"".join(chunk.pcm.astype("<i2").tobytes() for chunk in stream)


def assert_healthy(url: str, healthy_pcm: bytes) -> None:
    r = httpx.post(f"{url}/tts/stream", json=HEALTHY, timeout=30)
    assert r.status_code == 200, r.text
    assert r.content == healthy_pcm
    assert httpx.get(f"{url}/health").json()["status"] == "ok"


def host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def read_response(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (b"" if it closes without an answer)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while True:
            piece = sock.recv(65536)
            if not piece:
                return data
            data += piece
    except ConnectionResetError:
        return data


def send_until_answered(sock: socket.socket, piece: bytes, limit: int) -> int:
    """Send `piece` again and again until the server answers (or closes), at most `limit` bytes: the bytes sent."""
    sock.settimeout(10)
    sent = 0
    while sent < limit and not select.select([sock], [], [], 0)[0]:
        try:
            sock.sendall(piece)
        except OSError:
            break
        sent += len(piece)
    return sent


def status_of(response: bytes) -> int | None:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else None


def json_body(response: bytes) -> dict:
    return json.loads(response.split(b"\r\n\r\n", 1)[1])


def test_trickled_bodies_are_closed_within_the_body_deadline(synth, healthy_pcm):
    """20 requests that declare a body (within the caps) and send a byte now and then, on every kind of route
    (answered at once, 404, JSON routes that read the body, the upload route): all 20 connections are closed by the
    deadline, although they are nearly every connection the server allows."""
    settings = ServerSettings(body_timeout_s=0.5, upload_timeout_s=0.8, max_connections=21)
    routes = [("GET", "/health"), ("POST", "/nowhere"), ("POST", "/tts/stream"), ("POST", "/v1/audio/speech"),
              ("POST", "/v1/audio/voices")]
    with running_server(synth, settings=settings) as (url, app):
        socks = []
        for i in range(20):
            method, path = routes[i % len(routes)]
            sock = socket.create_connection(host_port(url))
            sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         f"Content-Length: 100000\r\n\r\n{{".encode())  # within every cap
            socks.append((path, sock))
        start = time.monotonic()
        answers: dict[int, bytes] = {}
        try:
            while len(answers) < len(socks) and time.monotonic() - start < 10:
                for i, (path, sock) in enumerate(socks):
                    if i in answers:
                        continue
                    try:
                        sock.sendall(b" ")  # one byte: the body goes on arriving, too slowly
                    except OSError:
                        answers[i] = read_response(sock, 1)
                        continue
                    sock.settimeout(0.01)
                    try:
                        piece = sock.recv(65536)
                    except (socket.timeout, BlockingIOError):
                        continue
                    except ConnectionResetError:
                        piece = b""
                    answers[i] = piece + (read_response(sock, 1) if piece else b"")
                time.sleep(0.05)
            elapsed = time.monotonic() - start
        finally:
            for _, sock in socks:
                sock.close()
        assert len(answers) == 20 and elapsed < 10
        for i, (path, _) in enumerate(socks):
            status = status_of(answers[i])
            answered_at_once = {"/health": 200, "/nowhere": 404, "/v1/audio/voices": 400}  # (no cloning here)
            if path in answered_at_once:  # then the body was not drained for ever: the connection closed
                assert status in (answered_at_once[path], None)
            else:  # the body was awaited: 408 in the API's JSON shape
                assert status == 408, (path, answers[i][:200])
                assert "did not arrive within" in json_body(answers[i])["error"]["message"]
        assert_healthy(url, healthy_pcm)


def read_stream(url: str, body: dict, arrivals: list, audio: bytearray) -> None:
    """Read a stream, recording when each piece arrived."""
    with httpx.stream("POST", f"{url}/tts/stream", json=body, timeout=120) as r:
        for piece in r.iter_raw():
            arrivals.append(time.monotonic())
            audio += piece


def send_huge_header(url: str, results: list) -> None:
    """Up to 16 MB of one header, 64 KB at a time, stopping when the server answers."""
    sock = socket.create_connection(host_port(url))
    try:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
        send_until_answered(sock, b"a" * 65536, 16 * 2 ** 20)
        results.append(read_response(sock, 5))
    finally:
        sock.close()


def rss() -> int:
    psutil = pytest.importorskip("psutil")
    return psutil.Process().memory_info().rss


def test_oversized_headers_get_431_and_another_stream_keeps_going(synth):
    """8 clients sending megabytes of header are answered 431 at the limit, within a second, without the server's
    memory growing; another client's stream goes on with no gap longer than 1 s beyond its own pace (this test's
    machine may be slow: the stream's longest gap away from the attack is its pace), and its audio is exact."""
    settings = ServerSettings(max_header_bytes=16384)
    body = {"text": "A long one to listen to while the others shout. " * 2, "speaker": "ryan", "seed": 5,
            "max_new_tokens": 400}
    expected = b"".join(c.pcm.astype("<i2").tobytes()
                        for c in synth.stream(body["text"], voice="ryan", seed=5, max_new_tokens=400))
    with running_server(synth, settings=settings) as (url, app):
        arrivals, audio = [], bytearray()
        reader = threading.Thread(target=read_stream, args=(url, body, arrivals, audio))
        reader.start()
        assert wait_until(lambda: len(arrivals) >= 4 or not reader.is_alive(), 60)
        results: list[bytes] = []
        shouters = [threading.Thread(target=send_huge_header, args=(url, results)) for _ in range(8)]
        memory_before = rss()
        attack_start = time.monotonic()
        for t in shouters:
            t.start()
        for t in shouters:
            t.join(30)
        attack_end = time.monotonic()
        growth = rss() - memory_before
        reader.join(120)
        assert len(results) == 8
        for response in results:
            assert status_of(response) == 431, response[:200]
            assert "larger than 16384 bytes" in json_body(response)["error"]["message"]
        assert attack_end - attack_start < 1.0 and growth < MEMORY_BOUND, (attack_end - attack_start, growth)
        assert bytes(audio) == expected
        gaps = [(earlier, later) for earlier, later in zip(arrivals, arrivals[1:])]
        during = [b - a for a, b in gaps if b >= attack_start and a <= attack_end]
        pace = max([b - a for a, b in gaps if b < attack_start or a > attack_end], default=0.0)
        assert max(during, default=0.0) < 1.0 + pace, (during, pace)
        assert httpx.get(f"{url}/health", headers={"X-Fine": "a" * 8000}).status_code == 200


def wait_until(predicate, timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def test_chunked_body_without_length_is_refused_at_the_cap(synth, healthy_pcm):
    """Bodies are counted as they arrive: a chunked body gets 413 at the cap, long before it ends."""
    settings = ServerSettings(max_body_bytes=8192)
    with running_server(synth, settings=settings) as (url, app):
        for path in ("/tts/stream", "/v1/audio/speech"):
            sock = socket.create_connection(host_port(url))
            try:
                sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                             "Transfer-Encoding: chunked\r\n\r\n".encode())
                chunk = b"a" * 65536
                sent = send_until_answered(sock, b"%x\r\n" % len(chunk) + chunk + b"\r\n", 64 * 2 ** 20)
                response = read_response(sock, 5)
            finally:
                sock.close()
            assert status_of(response) == 413, response[:200]
            assert "larger than" in json_body(response)["error"]["message"]
            assert sent < 32 * 2 ** 20  # answered long before the body ends (the rest: kernel buffers)
        assert_healthy(url, healthy_pcm)


def test_two_host_headers_are_refused(synth, healthy_pcm):
    with running_server(synth) as (url, app):
        sock = socket.create_connection(host_port(url))
        try:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\n\r\n")
            response = read_response(sock, 5)
        finally:
            sock.close()
        assert status_of(response) == 400
        assert "2 Host headers" in json_body(response)["error"]["message"]
        assert_healthy(url, healthy_pcm)


# ---------------------------------------------------------------------------------------------------------------
# WebSocket slots


def ws_url(url: str) -> str:
    return url.replace("http://", "ws://") + WS_PATH


def msg(**fields) -> str:
    return json.dumps(fields)


class Trickler:
    """A socket whose contexts each get a piece of text every `period_s`, never flushed, read in the background."""

    def __init__(self, url: str, contexts: list[str], piece: str, period_s: float):
        self.stack = contextlib.ExitStack()
        self.conn = self.stack.enter_context(ws_client.connect(ws_url(url)))
        self.contexts, self.piece, self.period_s = contexts, piece, period_s
        self.events: list[dict] = []
        self.stop = threading.Event()
        for cid in contexts:
            self.conn.send(msg(type="config", context_id=cid, max_new_tokens=4, seed=1))
        self.threads = [threading.Thread(target=self.send_loop), threading.Thread(target=self.read_loop)]
        for t in self.threads:
            t.start()

    def send_loop(self) -> None:
        while not self.stop.wait(self.period_s):
            try:
                for cid in self.contexts:
                    self.conn.send(msg(type="text", context_id=cid, text=self.piece))
            except ws_exceptions.ConnectionClosed:
                return

    def read_loop(self) -> None:
        try:
            while not self.stop.is_set():
                try:
                    message = self.conn.recv(timeout=0.1)
                except TimeoutError:
                    continue
                if isinstance(message, str):
                    self.events.append(json.loads(message))
        except ws_exceptions.ConnectionClosed:
            return

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)
        self.stack.close()

    def of_kind(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["type"] == kind]


def first_ws_audio_s(url: str, headers: dict | None = None) -> float:
    start = time.monotonic()
    with ws_client.connect(ws_url(url), additional_headers=headers or {}) as conn:
        conn.send(msg(type="config", context_id="other", max_new_tokens=2))
        conn.send(msg(type="text", context_id="other", text="Another client speaks."))
        conn.send(msg(type="flush", context_id="other"))
        deadline = start + 30
        while time.monotonic() < deadline:
            message = conn.recv(timeout=deadline - time.monotonic())
            if isinstance(message, bytes):
                return time.monotonic() - start
            event = json.loads(message)
            assert event["type"] != "error", event
    raise AssertionError("no audio")




def test_trickling_contexts_cannot_keep_another_client_from_first_audio(synth, healthy_pcm):
    """16 contexts on 2 sockets of one client, trickling: 8 get a character at a time (no word ever completes, so
    they take no slot, and their lifetime counts from their config: idle-flushed), 8 get a word at a time (they
    take slots, within the client's cap). Another client, over HTTP and over a WebSocket behind the proxy
    (X-Forwarded-For), gets its first audio within 5 s, more than once while the trickles go on."""
    settings = ServerSettings(max_active=4, max_queue=4, max_ws_contexts=8, max_client_streams=2,
                              ws_idle_flush_s=1.0, queue_timeout_s=5.0)
    with running_server(synth, settings=settings) as (url, app):
        letters = Trickler(url, [f"c{i}" for i in range(8)], "a", 0.2)
        words = Trickler(url, [f"w{i}" for i in range(8)], "word ", 0.2)
        try:
            for _ in range(2):
                assert first_audio_s(url, HEALTHY) < 5.0
                assert first_ws_audio_s(url, {"X-Forwarded-For": "203.0.113.7"}) < 5.0
            assert wait_until(lambda: len({e["context_id"] for e in letters.of_kind("idle_flush")}) == 8, 20)
            capped = [e for e in words.of_kind("error") if "contexts speaking or waiting" in e["message"]]
            assert len({e["context_id"] for e in capped}) >= 6  # 2 of the client's 16 hold its 2 slots
        finally:
            letters.close()
            words.close()
        assert wait_until(lambda: httpx.get(f"{url}/health").json()["active_streams"] == 0, 30)
        assert_healthy(url, healthy_pcm)


def test_a_socket_without_an_open_context_is_closed_after_the_idle_time(synth, healthy_pcm):
    settings = ServerSettings(ws_idle_close_s=0.5)
    with running_server(synth, settings=settings) as (url, app):
        with ws_client.connect(ws_url(url)) as idle, ws_client.connect(ws_url(url)) as busy:
            busy.send(msg(type="config", context_id="long", max_new_tokens=2))
            busy.send(msg(type="text", context_id="long", text="Unfinished"))  # open, no word yet: no slot
            start = time.monotonic()
            with pytest.raises(ws_exceptions.ConnectionClosed) as closed:
                while True:
                    idle.recv(timeout=10)
            assert closed.value.rcvd.code == 1000 and "no open context" in closed.value.rcvd.reason
            assert time.monotonic() - start < 10
            busy.send(msg(type="flush", context_id="long"))  # the socket with a context is still open
            events = []
            while not events or events[-1]["type"] != "audio_done":
                message = busy.recv(timeout=30)
                if isinstance(message, str):
                    events.append(json.loads(message))
            assert events[-1]["context_id"] == "long" and events[-1]["frames"] == 2
            with pytest.raises(ws_exceptions.ConnectionClosed) as closed:  # its context done: now it is idle too
                while True:
                    busy.recv(timeout=10)
            assert closed.value.rcvd.code == 1000 and "no open context" in closed.value.rcvd.reason
        assert_healthy(url, healthy_pcm)


def test_a_context_whose_first_word_comes_late_still_gets_its_slot(synth, healthy_pcm):
    """Its job is created at config and submitted at its first word: the engine's queue backstop (counted from the
    creation) must not fail it for the time it spent waiting for text."""
    settings = ServerSettings(queue_timeout_s=0.5, ws_idle_flush_s=3.0)
    with running_server(synth, settings=settings) as (url, app):
        with ws_client.connect(ws_url(url)) as conn:
            conn.send(msg(type="config", context_id="late", max_new_tokens=2, voice="ryan"))
            time.sleep(1.5)  # longer than the old backstop, 2 x queue_timeout_s
            conn.send(msg(type="text", context_id="late", text="Here it comes."))
            conn.send(msg(type="flush", context_id="late"))
            events, audio = [], 0
            while not events or events[-1]["type"] != "audio_done":
                message = conn.recv(timeout=30)
                if isinstance(message, bytes):
                    audio += len(message)
                else:
                    events.append(json.loads(message))
        assert not [e for e in events if e["type"] == "error"], events
        assert events[-1]["frames"] == 2 and audio > 0
        assert_healthy(url, healthy_pcm)


# ---------------------------------------------------------------------------------------------------------------
# Graceful shutdown


def test_sigterm_lets_contexts_finish_then_cuts_the_rest_with_error_and_audio_done(tmp_path):
    model = write_tiny_model(tmp_path / "m", "0.6b", "custom_voice", seed=0)
    with TTSServerProcess(model, extra_args=["--shutdown-grace-s", "1.5"]) as server:
        url = server.base_url
        with ws_client.connect(ws_url(url)) as conn:
            conn.send(msg(type="config", context_id="open", voice="ryan"))
            conn.send(msg(type="text", context_id="open", text="This context never flushes"))
            conn.send(msg(type="config", context_id="short", voice="ryan", max_new_tokens=3))
            conn.send(msg(type="text", context_id="short", text="Short one."))
            conn.send(msg(type="flush", context_id="short"))
            events = []

            def read_until(predicate):
                while not predicate():
                    message = conn.recv(timeout=30)
                    if isinstance(message, str):
                        events.append(json.loads(message))

            read_until(lambda: any(e["type"] == "audio_start" for e in events))
            server.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            read_until(lambda: sum(e["type"] == "audio_done" for e in events) == 2)
            cut_after = time.monotonic() - signalled
            with pytest.raises(ws_exceptions.ConnectionClosed) as closed:
                while True:
                    conn.recv(timeout=30)
        done = {e["context_id"]: e for e in events if e["type"] == "audio_done"}
        assert done["short"]["stop_reason"] in ("eos", "max_new_tokens") and done["short"]["frames"] >= 1
        assert done["open"]["stop_reason"] == "shutdown"
        errors = [e for e in events if e["type"] == "error" and e["context_id"] == "open"]
        assert errors and "shutting down" in errors[0]["message"]
        assert events.index(errors[0]) < events.index(done["open"])
        assert 1.5 <= cut_after < 30
        assert closed.value.rcvd is None or closed.value.rcvd.code in (1001, 1012)
        assert server.proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down


# ---------------------------------------------------------------------------------------------------------------
# Voice uploads on a Base model: bombs, slow and endless uploads, resource errors, names, what fits the kernel


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny_base"), "0.6b", "base", seed=1)


def new_base_synth(model, voices_dir) -> Synthesizer:
    synth = Synthesizer.from_pretrained(str(model), device="cpu")
    synth.voice_library = VoiceLibrary(voices_dir, speaker_encoder_fingerprint(synth.checkpoint))
    return synth


@pytest.fixture(scope="module")
def base_synth(base_model, tmp_path_factory):
    return new_base_synth(base_model, tmp_path_factory.mktemp("voices"))


@pytest.fixture(scope="module")
def base_url(base_synth):
    with running_server(base_synth) as (url, app):
        yield url


def upload(url: str, name: str, data: bytes, transcript: str | None = None):
    fields = {"name": name, "consent": "true", **({"transcript": transcript} if transcript else {})}
    return httpx.post(f"{url}/v1/audio/voices", files={"audio": ("ref.bin", data, "application/octet-stream")},
                      data=fields, timeout=120)


def assert_base_healthy(url: str, synth) -> None:
    """A stored voice speaks with exactly the in-process audio."""
    if "steady" not in synth.voice_library:
        assert upload(url, "steady", encoded(tone(2.0, 24000), 24000, "WAV")).status_code == 201
    body = {"text": "Still here.", "voice": "steady", "max_new_tokens": 2, "seed": 2}
    expected = b"".join(c.pcm.astype("<i2").tobytes()
                        for c in synth.stream(body["text"], voice="steady", seed=2, max_new_tokens=2))
    r = httpx.post(f"{url}/tts/stream", json=body, timeout=60)
    assert r.status_code == 200 and r.content == expected


@pytest.mark.parametrize("kind", ["flac", "wav", "mp3"])
def test_upload_claiming_an_hour_is_refused_without_the_server_growing(base_url, base_synth, kind):
    data = {"flac": lambda: flac_claiming(HOUR_S), "wav": lambda: adpcm_wav_of(HOUR_S),
            "mp3": lambda: mp3_stream_of(HOUR_S)}[kind]()
    before = rss()
    r = upload(base_url, f"bomb-{kind}", data)
    growth = rss() - before
    assert r.status_code == 400 and r.json()["error"]["param"] == "audio", r.text
    assert "the limit is 30 s" in r.json()["error"]["message"]
    assert growth < MEMORY_BOUND, f"{growth / 2**20:.0f} MiB"
    assert_base_healthy(base_url, base_synth)


def test_slow_upload_gets_408(base_model, tmp_path):
    synth = new_base_synth(base_model, tmp_path)  # its own engine: this server stops it when it ends
    with running_server(synth, settings=ServerSettings(upload_timeout_s=1.0)) as (url, app):
        sock = socket.create_connection(host_port(url))
        try:
            sock.sendall(b"POST /v1/audio/voices HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                         b"boundary=x\r\nContent-Length: 100000\r\n\r\n--x\r\n")
            start = time.monotonic()
            response = read_response(sock, 20)
            assert status_of(response) == 408 and 1.0 <= time.monotonic() - start < 20
        finally:
            sock.close()
        assert_base_healthy(url, synth)


def test_chunked_upload_is_refused_at_the_cap(base_url, base_synth):
    """No Content-Length: 413 at the route's cap (20 MiB + 64 KiB), not after everything."""
    sock = socket.create_connection(host_port(base_url))
    try:
        sock.sendall(b"POST /v1/audio/voices HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                     b"boundary=x\r\nTransfer-Encoding: chunked\r\n\r\n")
        head = b'--x\r\nContent-Disposition: form-data; name="audio"; filename="a.wav"\r\n\r\n'
        sock.sendall(b"%x\r\n" % len(head) + head + b"\r\n")
        chunk = b"\0" * 65536
        sent = send_until_answered(sock, b"%x\r\n" % len(chunk) + chunk + b"\r\n", 100 * 2 ** 20)
        response = read_response(sock, 5)
        assert status_of(response) == 413 and sent < 30 * 2 ** 20, (response[:200], sent)
    finally:
        sock.close()
    assert_base_healthy(base_url, base_synth)


def test_memory_and_disk_errors_are_json_naming_the_cause(base_url, base_synth, monkeypatch):
    from qwen_tts_megakernel.server import voices_api

    def out_of_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(voices_api, "read_reference_audio", out_of_memory)
    r = upload(base_url, "oom", encoded(tone(2.0, 24000), 24000, "WAV"))
    assert r.status_code == 500 and "MemoryError" in r.json()["error"]["message"], r.text
    monkeypatch.undo()

    def disk_full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(VoiceLibrary, "add", disk_full)
    r = upload(base_url, "full", encoded(tone(2.0, 24000), 24000, "WAV"))
    assert r.status_code == 507 and "disk is full" in r.json()["error"]["message"], r.text
    monkeypatch.undo()
    assert_base_healthy(base_url, base_synth)


def test_names_in_full_and_short_echoes(base_url, base_synth):
    r = upload(base_url, "alice\n", encoded(tone(2.0, 24000), 24000, "WAV"))
    assert r.status_code == 400 and r.json()["error"]["param"] == "name"
    r = httpx.post(f"{base_url}/v1/audio/speech", json={"model": "tts-1", "input": "hi", "voice": "v" * 200_000},
                   timeout=30)
    assert r.status_code == 400 and len(r.json()["error"]["message"]) < 500, len(r.text)
    assert_base_healthy(base_url, base_synth)


def test_in_context_voice_that_cannot_fit_the_positions_is_refused_when_stored(base_url, base_synth):
    positions = base_synth.backend.max_seq_len
    base_synth.backend.max_seq_len = 40  # a 3 s clip alone is ~38 reference frames
    try:
        r = upload(base_url, "toolong", encoded(tone(3.0, 24000), 24000, "WAV"), transcript="What the clip says.")
    finally:
        base_synth.backend.max_seq_len = positions
    assert r.status_code == 400 and "positions" in r.json()["error"]["message"], r.text
    assert "toolong" not in base_synth.voice_library
    assert_base_healthy(base_url, base_synth)
