"""TTFB of our two Pipecat services as Pipecat's own metrics report it (TTFBMetricsData), against a running server.

    measure_ttfb("http://127.0.0.1:8001", runs=5, max_new_tokens=25)

Each run is one `TTSSpeakFrame` through Pipecat's `run_test` pipeline with metrics enabled; the value is the first
TTFB metric the service emitted (text handed to the service -> first audio frame out of it).
"""

from __future__ import annotations

import asyncio

from pipecat.frames.frames import MetricsFrame, TTSAudioRawFrame, TTSSpeakFrame
from pipecat.metrics.metrics import TTFBMetricsData
from pipecat.pipeline.worker import PipelineParams
from pipecat.tests.utils import SleepFrame, run_test

from .common import summary
from ..pipecat.http import QwenHttpTTSService
from ..pipecat.websocket import QwenTTSService

DEFAULT_TEXT = "Hello there, this is a latency check of the speech service."


async def _one_run(service, text: str) -> tuple[float | None, int]:
    down, _ = await run_test(service, frames_to_send=[TTSSpeakFrame(text), SleepFrame(sleep=0.3)],
                             pipeline_params=PipelineParams(enable_metrics=True))
    values = [d.value for f in down if isinstance(f, MetricsFrame) for d in f.data
              if isinstance(d, TTFBMetricsData) and d.processor == service.name and d.value > 0]
    audio_bytes = sum(len(f.audio) for f in down if isinstance(f, TTSAudioRawFrame))
    return (values[0] if values else None), audio_bytes


def measure_ttfb(base_url: str, *, runs: int = 5, max_new_tokens: int = 25, voice: str | None = None,
                 language: str = "english", text: str = DEFAULT_TEXT) -> dict:
    """Median and p95 TTFB (ms) per service over `runs` utterances (after one warm-up each)."""
    results = {}
    for name, cls in (("http", QwenHttpTTSService), ("websocket", QwenTTSService)):
        def make():
            settings = cls.Settings(voice=voice, language=language, seed=1, max_new_tokens=max_new_tokens)
            return cls(base_url=base_url, settings=settings)

        asyncio.run(_one_run(make(), text))  # warm-up
        samples = [asyncio.run(_one_run(make(), text)) for _ in range(runs)]
        results[name] = service_summary(cls.__name__, samples)
    return results


def service_summary(service: str, samples: list[tuple[float | None, int]]) -> dict:
    """One service's figures from its runs' (TTFB seconds or None, audio bytes)."""
    values = [1000 * v for v, _ in samples if v is not None]
    ttfb = summary(values) if values else {}
    return {"service": service, "runs": len(samples), "with_metric": ttfb.get("runs", 0),
            "ttfb_ms_median": ttfb.get("median"), "ttfb_ms_p95": ttfb.get("p95"),
            "audio_bytes": [b for _, b in samples]}
