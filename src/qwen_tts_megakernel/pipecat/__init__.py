"""Pipecat (pipecat-ai 1.14) text-to-speech services for a ``qwen-tts-mk serve`` server.

    pip install "qwen-tts-megakernel[pipecat]"

    from qwen_tts_megakernel.pipecat import QwenHttpTTSService, QwenTTSService

``QwenTTSService`` (WebSocket, streamed text, context ids, cancel on interruption) is the one to use in a voice
agent; ``QwenHttpTTSService`` (one chunked HTTP request per sentence) is the simple alternative. Both take
``settings=<Service>.Settings(voice=..., language=..., seed=..., max_new_tokens=...)``. See docs/pipecat.md.
"""

try:
    import pipecat  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError('qwen_tts_megakernel.pipecat needs Pipecat: pip install "qwen-tts-megakernel[pipecat]"') from e

from ._common import SERVER_SAMPLE_RATE, QwenTTSSettings, qwen_language
from .http import QwenHttpTTSService
from .websocket import QwenTTSService

__all__ = ["QwenHttpTTSService", "QwenTTSService", "QwenTTSSettings", "SERVER_SAMPLE_RATE", "qwen_language"]
