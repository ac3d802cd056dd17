"""examples/voice_agent.py without a TTS server or an LLM: one line naming what is unreachable, exit 2, no figures."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytest.importorskip("pipecat")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "voice_agent.py"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HealthOnly(BaseHTTPRequestHandler):
    """A TTS server that is up (its /health answers) and nothing more."""

    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


def run_agent(tmp_path, *args):
    cmd = [sys.executable, str(EXAMPLE), "--mode", "headless", "--say", "Hello there.",
           "--output-wav", str(tmp_path / "bot.wav"), "--turn-timeout", "20", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def assert_one_line_no_figures(proc, expected):
    lines = [line for line in proc.stderr.splitlines() if line.startswith("voice_agent:")]
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(lines) == 1 and expected in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "TTFB" not in proc.stdout + proc.stderr and " ms" not in proc.stdout


def test_unreachable_tts_server(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}"
    proc = run_agent(tmp_path, "--llm", "stub", "--tts-url", url)
    assert_one_line_no_figures(proc, f"the TTS server at {url} is unreachable")


def test_unreachable_llm_endpoint(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), HealthOnly)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    llm = f"http://127.0.0.1:{closed_port()}/v1"
    try:
        proc = run_agent(tmp_path, "--tts-url", f"http://127.0.0.1:{server.server_address[1]}",
                         "--llm-base-url", llm)
    finally:
        server.shutdown()
    assert_one_line_no_figures(proc, f"the LLM endpoint {llm} is unreachable")
