"""Where an engine step's wall time goes: waiting on the GPU (the backend's frame, the codec's chunks) or host work
(everything else the scheduler thread does: bookkeeping, prefill and codec launches, handing events on).

The host share is the part of a step the GPU cannot hide: with the talker and the codec overlapped, a step takes
max(GPU, host), so the engine keeps real time at 64 streams only while the host share stays small (<= 1 ms).
Kept per batch bucket (1, 2, 4, ... streams stepped), as running sums, so any reader can take a snapshot.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass
class StepSplit:
    steps: int = 0
    wall_s: float = 0.0
    gpu_wait_s: float = 0.0
    prefill_s: float = 0.0

    @property
    def host_s(self) -> float:
        return self.wall_s - self.gpu_wait_s - self.prefill_s


class StepProfile:
    """Running totals of step wall time and GPU waits, by the bucket of the number of streams stepped."""

    def __init__(self):
        self._by_bucket: dict[int, StepSplit] = {}
        self._lock = threading.Lock()

    @staticmethod
    def bucket(batch: int) -> int:
        return 1 << max(0, (batch - 1).bit_length())

    def record(self, batch: int, wall_s: float, gpu_wait_s: float, prefill_s: float = 0.0) -> None:
        """One step of `batch` streams: its wall time, the part spent waiting on the GPU, and the part spent opening
        joining streams (the prefill: neither host overhead of the step nor a wait for its frame)."""
        with self._lock:
            split = self._by_bucket.setdefault(self.bucket(batch), StepSplit())
            split.steps += 1
            split.wall_s += wall_s
            split.gpu_wait_s += min(gpu_wait_s, wall_s)
            split.prefill_s += min(prefill_s, wall_s - min(gpu_wait_s, wall_s))

    def reset(self) -> None:
        with self._lock:
            self._by_bucket.clear()

    def totals(self) -> dict[str, dict]:
        """{bucket: {"steps", "wall_s", "gpu_wait_s", "prefill_s"}}: running sums, so a reader can take the
        difference of two snapshots (what one benchmark level did)."""
        with self._lock:
            return {str(b): {"steps": s.steps, "wall_s": s.wall_s, "gpu_wait_s": s.gpu_wait_s,
                             "prefill_s": s.prefill_s} for b, s in sorted(self._by_bucket.items())}

    @staticmethod
    def between(before: dict, after: dict) -> dict[str, dict]:
        """The summary (as summary()) of the steps between two totals() snapshots."""
        out = {}
        for b, a in after.items():
            z = before.get(b, {"steps": 0, "wall_s": 0.0, "gpu_wait_s": 0.0, "prefill_s": 0.0})
            steps = a["steps"] - z["steps"]
            if steps > 0:
                d = {k: (a[k] - z[k]) / steps for k in ("wall_s", "gpu_wait_s", "prefill_s")}
                out[b] = {"steps": steps, "step_ms": 1e3 * d["wall_s"], "gpu_wait_ms": 1e3 * d["gpu_wait_s"],
                          "prefill_ms": 1e3 * d["prefill_s"],
                          "host_ms": 1e3 * (d["wall_s"] - d["gpu_wait_s"] - d["prefill_s"])}
        return out

    def summary(self) -> dict[str, dict]:
        """{bucket: {"steps", "step_ms", "gpu_wait_ms", "prefill_ms", "host_ms"}} (means per step), smallest
        bucket first."""
        with self._lock:
            items = sorted(self._by_bucket.items())
            return {str(b): {"steps": s.steps, "step_ms": 1e3 * s.wall_s / s.steps,
                             "gpu_wait_ms": 1e3 * s.gpu_wait_s / s.steps, "prefill_ms": 1e3 * s.prefill_s / s.steps,
                             "host_ms": 1e3 * s.host_s / s.steps}
                    for b, s in items if s.steps}
