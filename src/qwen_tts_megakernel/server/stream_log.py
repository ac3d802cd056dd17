"""The server's log lines about requests: one per stream when it ends, one per refused request.

    stream 12 openai_speech: frames=25 audio_s=2.00 stop=eos first_audio_ms=41.3 elapsed_ms=380.2
    stream 13 ws ctx='c1': frames=0 audio_s=0.00 stop=cancelled first_audio_ms=- elapsed_ms=12.0
    refused 400 param=speed: 'speed' must be a number between 0.25 and 4.0, got 9
"""

from __future__ import annotations

import logging

log = logging.getLogger("qwen_tts_megakernel.server")


def log_stream(job, info=None, *, reason: str | None = None, context_id: str | None = None) -> None:
    """The line for a stream that ended: `info` is its JobInfo (None when it failed before its "done")."""
    where = job.endpoint + (f" ctx={context_id!r:.60}" if context_id is not None else "")
    if info is None:
        log.info("stream %d %s: stop=%s", job.id, where, reason or "error")
        return
    first = "-" if info.time_to_first_audio_ms is None else f"{info.time_to_first_audio_ms:.1f}"
    log.info("stream %d %s: frames=%d audio_s=%.2f stop=%s first_audio_ms=%s elapsed_ms=%.1f", job.id, where,
             info.frames, info.audio_seconds, reason or info.stop_reason, first, info.elapsed_ms)


def log_refusal(status: int, param: str | None, message: str) -> None:
    log.info("refused %d param=%s: %.200s", status, param or "-", message)
