"""Pipecat services against a server started with --api-key; plus the services' small pure helpers."""

from __future__ import annotations

import pytest

pytest.importorskip("pipecat")

from pipecat.frames.frames import ErrorFrame, TTSAudioRawFrame, TTSSpeakFrame  # noqa: E402
from pipecat.tests.utils import SleepFrame, run_test  # noqa: E402
from pipecat.transcriptions.language import Language  # noqa: E402

from qwen_tts_megakernel.pipecat import QwenHttpTTSService, QwenTTSService, qwen_language  # noqa: E402
from qwen_tts_megakernel.testing.server import TTSServerProcess, prometheus_sum  # noqa: E402
from qwen_tts_megakernel.pipecat.websocket import parse_audio_message, websocket_url  # noqa: E402
from qwen_tts_megakernel.synthetic import write_tiny_model  # noqa: E402

KEY = "sekrit"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = write_tiny_model(tmp_path_factory.mktemp("tiny"), "0.6b", "custom_voice", seed=0)
    with TTSServerProcess(model, extra_args=["--api-key", KEY]) as srv:
        yield srv


def _settings(cls):
    return cls.Settings(voice="ryan", language=Language.EN, seed=1, max_new_tokens=6)


@pytest.mark.asyncio
@pytest.mark.parametrize("cls", [QwenHttpTTSService, QwenTTSService])
async def test_api_key_is_sent(server, cls):
    tts = cls(base_url=server.base_url, api_key=KEY, settings=_settings(cls))
    down, up = await run_test(tts, frames_to_send=[TTSSpeakFrame("Hello."), SleepFrame(sleep=0.2)])
    assert not [f for f in up if isinstance(f, ErrorFrame)]
    assert sum(len(f.audio) for f in down if isinstance(f, TTSAudioRawFrame)) == 6 * 1920 * 2


@pytest.mark.asyncio
@pytest.mark.parametrize("cls", [QwenHttpTTSService, QwenTTSService])
async def test_wrong_api_key_is_an_error_upstream(server, cls):
    tts = cls(base_url=server.base_url, api_key="wrong", settings=_settings(cls))
    if cls is QwenTTSService:
        tts._reconnect_on_error = False
    down, up = await run_test(tts, frames_to_send=[TTSSpeakFrame("Hello."), SleepFrame(sleep=0.2)])
    assert [f for f in up if isinstance(f, ErrorFrame)]
    assert not [f for f in down if isinstance(f, TTSAudioRawFrame)]
    text = server.metrics_text({"Authorization": f"Bearer {KEY}"})
    assert prometheus_sum(text, "qwen_tts_errors_total", kind="unauthorized") >= 1


def test_helpers():
    assert websocket_url("http://h:1") == "ws://h:1/v1/audio/speech/stream"
    assert websocket_url("https://h/") == "wss://h/v1/audio/speech/stream"
    assert websocket_url("ws://h:1/custom") == "ws://h:1/custom"
    assert parse_audio_message(bytes([2]) + b"c1" + b"\x01\x02") == ("c1", b"\x01\x02")
    with pytest.raises(ValueError):
        parse_audio_message(bytes([5]) + b"c1")
    assert qwen_language(Language.EN_US) == "english" and qwen_language(Language.ZH) == "chinese"
    assert qwen_language("english") == "english" and qwen_language("auto") == "auto"
    assert qwen_language(Language.NL) is None  # not a model language: the server names the ones it has
    s = QwenTTSService(settings=QwenTTSService.Settings(voice="vivian", language=Language.FR, temperature=0.7))
    # Before the pipeline starts its rate is unknown: the model's 24 kHz is asked for.
    assert s._config_message("c") == {"type": "config", "context_id": "c", "voice": "vivian", "language": "french",
                                      "sample_rate": 24000, "temperature": 0.7}
    h = QwenHttpTTSService(settings=QwenHttpTTSService.Settings(voice="ryan", seed=5))
    assert h._request_body("Hi") == {"text": "Hi", "language": "auto", "speaker": "ryan", "sample_rate": 24000,
                                     "seed": 5}


def test_error_detail():
    from qwen_tts_megakernel.pipecat._common import error_detail

    assert error_detail(400, '{"detail": "unknown voice"}') == "Qwen TTS server error 400: unknown voice"
    assert error_detail(401, '{"error": {"message": "wrong key", "type": "x"}}') == "Qwen TTS server error 401: wrong key"
    assert error_detail(503, "busy") == "Qwen TTS server error 503: busy"
