"""Server pieces without a running server: streamed text input (live.py), the serve/bench commands."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest

from qwen_tts_megakernel.engine import Synthesizer
from qwen_tts_megakernel.live import LiveUtterance
from qwen_tts_megakernel.synthetic import write_tiny_model

TEXT = "Hello there, how are you doing today? I am fine."


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_extras")
    write_tiny_model(path, "0.6b", "custom_voice", seed=0)
    return path


@pytest.fixture(scope="module")
def synth(tiny_dir):
    return Synthesizer.from_pretrained(str(tiny_dir), device="cpu")


class LiveRun:
    """A live-text utterance on the synthesizer's engine: text goes in with add(), frames come out."""

    def __init__(self, synth, u: LiveUtterance):
        self.u = u
        self.events = synth.submit(u, audio=False, frames=True)
        self.frames: list[np.ndarray] = []
        self.stop_reason = None

    def add(self, text: str, flush: bool = False) -> None:
        self.u.add_text(text)
        if flush:
            self.u.request_flush()
        self.events.job.wake()

    def take(self, timeout: float) -> bool:
        """Take events for up to `timeout` seconds; True once the utterance is done."""
        deadline = time.monotonic() + timeout
        while self.stop_reason is None and time.monotonic() < deadline:
            try:
                kind, payload = self.events.queue.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if kind == "frame":
                self.frames.append(payload)
                self.events.job.taken()
            elif kind == "done":
                self.stop_reason = payload.stop_reason
            elif kind == "error":
                raise AssertionError(payload)
        return self.stop_reason is not None


@pytest.mark.parametrize("split", ["whole", "words", "chars"])
def test_live_text_equals_whole_text_interleaved(synth, split):
    pieces = {"whole": [TEXT], "words": [w + " " for w in TEXT.split(" ")][:-1] + [TEXT.split(" ")[-1]],
              "chars": list(TEXT)}[split]
    assert "".join(pieces) == TEXT
    expected = synth.generate_codes(TEXT, seed=7, max_new_tokens=30, text_layout="interleaved")
    run = LiveRun(synth, LiveUtterance(synth, seed=7, max_new_tokens=30))
    for piece in pieces:
        run.add(piece)
        run.take(0.01)
    run.add("", flush=True)
    assert run.take(120)
    assert run.stop_reason == "max_new_tokens"
    assert np.array_equal(np.stack(run.frames), expected.codes)


def test_live_waits_for_text(synth):
    u = LiveUtterance(synth, seed=1, max_new_tokens=12)
    run = LiveRun(synth, u)
    run.add("Hel")
    run.take(0.5)
    assert run.frames == []  # no committed word yet: nothing to speak
    run.add("lo wor")  # "Hello" is committed (the space starts the next word)
    deadline = time.monotonic() + 60
    while not u.tokens or len(run.frames) < len(u.tokens):
        assert time.monotonic() < deadline
        run.take(0.1)
    run.take(0.5)
    assert len(run.frames) == len(u.tokens)  # one frame per committed token, then it waits
    run.add("ld.", flush=True)
    assert run.take(120)
    expected = synth.generate_codes("Hello world.", seed=1, max_new_tokens=12, text_layout="interleaved")
    assert run.stop_reason == expected.stop_reason == "max_new_tokens"
    assert np.array_equal(np.stack(run.frames), expected.codes)


def test_live_rejects_bad_settings(synth):
    from qwen_tts_megakernel.prompt import PromptError

    with pytest.raises(PromptError):
        LiveUtterance(synth, voice="nobody")
    with pytest.raises(PromptError):
        LiveUtterance(synth, language="klingon")
    with pytest.raises(ValueError):
        LiveUtterance(synth, max_new_tokens=0)
    u = LiveUtterance(synth)
    u.append("   ")
    u.flush()
    assert u.empty and not u.ready_to_open()
    run = LiveRun(synth, LiveUtterance(synth))
    run.add("   ", flush=True)
    with pytest.raises(AssertionError, match="empty"):
        run.take(30)


def test_serve_without_a_model_says_how_to_get_one(tmp_path):
    missing = tmp_path / "no-such-model"
    r = subprocess.run([sys.executable, "-m", "qwen_tts_megakernel.cli", "serve", "--model", str(missing)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "tiny-model" in r.stderr and "Traceback" not in r.stderr


def test_bench_server_smoke(tiny_dir, tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("websockets")
    from qwen_tts_megakernel.tools.server_bench import run_bench_server

    args = SimpleNamespace(model=str(tiny_dir), backend="reference", device="cpu", output_dir=str(tmp_path),
                           concurrency=(1, 2), requests_per_client=1, max_new_tokens=4)
    assert run_bench_server(args) == 0
    reports = list(tmp_path.glob("server_reference_*.json"))
    assert len(reports) == 1 and len(list(tmp_path.glob("server_reference_*.md"))) == 1
    report = json.loads(reports[0].read_text())
    assert [(r["protocol"], r["clients"]) for r in report["results"]] == [("http", 1), ("http", 2), ("ws", 1),
                                                                          ("ws", 2)]
    for r in report["results"]:
        assert r["ok"] == r["requests"] and r["ttfc_ms_median"] > 0 and r["rtf_median"] > 0
