"""The voice-agent example end to end, headless: text turns -> stub OpenAI-compatible LLM -> our TTS server -> WAV.

No microphone, STT model or network: the LLM is a local streaming chat-completions stub, the TTS server runs the
tiny checkpoint on the CPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
import wave
from pathlib import Path

import pytest

pytest.importorskip("pipecat")

from qwen_tts_megakernel.testing.stub_llm import StubLLMServer  # noqa: E402
from qwen_tts_megakernel.testing.server import TTSServerProcess  # noqa: E402
from qwen_tts_megakernel.synthetic import write_tiny_model  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "voice_agent.py"
FRAMES = 15  # per bot turn: 1.2 s of speech


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = write_tiny_model(tmp_path_factory.mktemp("tiny"), "0.6b", "custom_voice", seed=0)
    with TTSServerProcess(model) as srv:
        yield srv


def replies(messages):
    user = [m["content"] for m in messages if m.get("role") == "user"]
    return f"Reply number {len(user)}. You said {user[-1]}"


@pytest.mark.parametrize("tts", ["ws", "http"])
def test_headless_agent_speaks_each_turn_into_a_wav(server, tmp_path, tts):
    out, report_path = tmp_path / "bot.wav", tmp_path / "report.json"
    turns = ["Hello there.", "What can you do?"]
    with StubLLMServer(reply=replies) as llm:
        cmd = [sys.executable, str(EXAMPLE), "--mode", "headless", "--tts", tts, "--tts-url", server.base_url,
               "--llm-base-url", llm.base_url, "--llm-model", "stub-llm", "--llm-api-key", "none",
               "--voice", "ryan", "--language", "english", "--seed", "3", "--max-new-tokens", str(FRAMES),
               "--output-wav", str(out), "--report-json", str(report_path), "--turn-timeout", "60"]
        for t in turns:
            cmd += ["--say", t]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        requests = list(llm.requests)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # The LLM saw each user turn, with the earlier ones in its context.
    assert len(requests) == 2 and all(r.get("stream") for r in requests)
    last_user = [m["content"] for m in requests[1]["messages"] if m["role"] == "user"]
    assert last_user == turns
    assert any(m["role"] == "assistant" and "Reply number 1" in m["content"] for m in requests[1]["messages"])
    # The bot's speech is in the WAV: one utterance per turn (SENTENCE mode over HTTP speaks each sentence).
    with wave.open(str(out), "rb") as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 24000)
        seconds = w.getnframes() / w.getframerate()
    assert seconds >= 2 * FRAMES * 0.08
    report = json.loads(report_path.read_text())
    assert report["error"] is None
    assert len(report["user_stopped_to_bot_started_s"]) == 2
    assert all(0 < v < 30 for v in report["user_stopped_to_bot_started_s"])
    ttfb = report["ttfb_s"]
    tts_name = "QwenTTSService" if tts == "ws" else "QwenHttpTTSService"
    assert any(k.startswith("OpenAILLMService") and v for k, v in ttfb.items()), ttfb
    assert any(k.startswith(tts_name) and all(x > 0 for x in v) for k, v in ttfb.items()), ttfb
    assert "user stopped speaking -> bot started speaking" in proc.stdout
    assert [m.startswith("Reply number") for m in report["assistant_messages"]] == [True, True]
