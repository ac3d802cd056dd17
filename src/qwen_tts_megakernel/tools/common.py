"""What every benchmark shares: the median/p95 summary, the GPU's file-name slug and the checkout's commit."""

from __future__ import annotations

import os
import statistics
import subprocess


def summary(values: list[float]) -> dict:
    """Median, p95 (nearest rank) and count of a list of measurements."""
    ordered = sorted(values)
    return {"median": statistics.median(ordered), "p95": ordered[max(0, round(0.95 * len(ordered)) - 1)],
            "runs": len(ordered)}


def gpu_slug(name: str) -> str:
    """A device name as a file-name part: "NVIDIA H200" -> "nvidia-h200"."""
    return "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-").replace("--", "-")


def git_commit() -> str | None:
    """The checkout's commit (QWEN_TTS_MK_COMMIT where the tree travelled without its .git)."""
    if os.environ.get("QWEN_TTS_MK_COMMIT"):
        return os.environ["QWEN_TTS_MK_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except OSError:
        return None
