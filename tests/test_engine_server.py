"""Many streams through the real server at once, as one engine batches them: every stream gets exactly the audio it
gets alone with the same seed (HTTP whole-text streams, WebSocket live-text contexts fed in deltas, streams that
start while others run, a cancelled stream beside them), and a saturated engine answers 503 with Retry-After."""

from __future__ import annotations

import json
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
ws_client = pytest.importorskip("websockets.sync.client")
pytest.importorskip("fastapi")

from qwen_tts_megakernel.engine import Synthesizer  # noqa: E402
from qwen_tts_megakernel.server.protocol import ServerSettings  # noqa: E402
from qwen_tts_megakernel.synthetic import write_tiny_model  # noqa: E402
from qwen_tts_megakernel.testing.server import running_server  # noqa: E402

WS_PATH = "/v1/audio/speech/stream"
HTTP_TEXTS = ["Hello from the first caller.", "A second caller, somewhat longer than the first one.", "Third."]
WS_TEXTS = ["Live text arrives word by word.", "Another context, streamed in small pieces."]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_engine_server")
    write_tiny_model(path, "0.6b", "custom_voice", seed=0)
    return Synthesizer.from_pretrained(str(path), device="cpu")


def solo_pcm(synth, text, seed, frames, layout="prefill") -> bytes:
    stream = synth.stream(text, voice="ryan", seed=seed, max_new_tokens=frames, text_layout=layout)
    return b"".join(chunk.pcm.astype("<i2").tobytes() for chunk in stream)


def ws_context(url, cid, text, seed, frames, results, cancel_after_bytes=None):
    """One WS session with one live context: config, the text in 5-character deltas, flush; collects its PCM."""
    pcm = bytearray()
    with ws_client.connect(url.replace("http://", "ws://") + WS_PATH) as conn:
        conn.send(json.dumps({"type": "config", "context_id": cid, "voice": "ryan", "seed": seed,
                              "max_new_tokens": frames}))
        for i in range(0, len(text), 5):
            conn.send(json.dumps({"type": "text", "context_id": cid, "text": text[i:i + 5]}))
        conn.send(json.dumps({"type": "flush", "context_id": cid}))
        while True:
            msg = conn.recv(timeout=120)
            if isinstance(msg, bytes):
                pcm += msg[1 + msg[0]:]
                if cancel_after_bytes is not None and len(pcm) >= cancel_after_bytes:
                    conn.send(json.dumps({"type": "cancel", "context_id": cid}))
                    cancel_after_bytes = None
                continue
            event = json.loads(msg)
            if event["type"] == "error":
                results[cid] = ("error", event["message"])
                return
            if event["type"] == "audio_done":
                results[cid] = (event["stop_reason"], bytes(pcm))
                return


def http_stream(url, key, text, seed, frames, results, delay=0.0):
    time.sleep(delay)
    with httpx.Client(timeout=120) as client:
        r = client.post(f"{url}/tts/stream", json={"text": text, "speaker": "ryan", "seed": seed,
                                                   "max_new_tokens": frames})
        results[key] = (r.status_code, r.content)


def test_mixed_concurrent_streams_each_get_their_solo_audio(synth):
    frames = 9
    expected_http = [solo_pcm(synth, t, 40 + i, frames + i) for i, t in enumerate(HTTP_TEXTS)]
    expected_ws = [solo_pcm(synth, t, 60 + i, frames, layout="interleaved") for i, t in enumerate(WS_TEXTS)]
    results: dict = {}
    with running_server(synth, settings=ServerSettings(max_active=16, max_queue=16)) as (url, _app):
        threads = [threading.Thread(target=http_stream, args=(url, f"h{i}", t, 40 + i, frames + i, results),
                                    kwargs={"delay": 0.2 * i}) for i, t in enumerate(HTTP_TEXTS)]
        threads += [threading.Thread(target=ws_context, args=(url, f"w{i}", t, 60 + i, frames, results))
                    for i, t in enumerate(WS_TEXTS)]
        # A long context cancelled after its first chunks, beside the others.
        threads.append(threading.Thread(target=ws_context, args=(url, "cancelled", "This one is cut off early.",
                                                                 99, 200, results), kwargs={"cancel_after_bytes": 1}))
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
    for i in range(len(HTTP_TEXTS)):
        assert results[f"h{i}"] == (200, expected_http[i]), f"HTTP stream {i}"
    for i in range(len(WS_TEXTS)):
        assert results[f"w{i}"][0] in ("length_guard", "max_new_tokens", "eos")
        assert results[f"w{i}"][1] == expected_ws[i], f"WS context {i}"
    assert results["cancelled"][0] == "cancelled"


def test_saturated_engine_answers_503_with_retry_after(synth):
    settings = ServerSettings(max_active=1, max_queue=0)
    with running_server(synth, settings=settings) as (url, _app):
        with httpx.Client(timeout=60) as client:
            with client.stream("POST", f"{url}/tts/stream",
                               json={"text": "Hold the only slot.", "speaker": "ryan", "max_new_tokens": 300}) as held:
                next(held.iter_raw())  # the one slot is taken and streaming
                r = client.post(f"{url}/tts/stream", json={"text": "Me too.", "speaker": "ryan", "max_new_tokens": 3})
                assert r.status_code == 503 and "Retry-After" in r.headers
        # Once the slot is free again, requests go through.
        deadline = time.time() + 30
        while time.time() < deadline:
            r = httpx.post(f"{url}/tts/stream", json={"text": "Now.", "speaker": "ryan", "max_new_tokens": 3})
            if r.status_code == 200:
                break
            time.sleep(0.2)
        assert r.status_code == 200 and len(r.content) == 3 * 1920 * 2
