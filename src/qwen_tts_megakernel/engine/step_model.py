"""What an engine step costs at a batch size: the model real-time admission asks before it adds a stream.

The engine records the wall time of every step with its batch size; admission asks `verdict(batch, budget_s)`
before a stream joins: FITS (admit), HOLD (the running streams would fall behind real time) or PROBE (nothing
firm is known: admit one stream and measure). The model is built so that it cannot lock a batch size out:

  * each batch size keeps its last `window` samples with their times (a step's cost follows the exact number
    of streams; powers-of-two buckets made a batch of 17 pay for one of 31);
  * the first sample at a batch size (the first after it had no fresh samples) is discarded: it pays for lazy
    kernel loading, a graph capture or the new stream's prefill landing in that step;
  * a size's estimate is the median of its fresh samples, once it has `min_samples` of them: a GC pause or a
    prefill that lands in a step is far above the median and does not move it;
  * samples age: one older than `max_age_s` no longer counts. A size without a fresh estimate is interpolated
    from fresh neighbours (linearly between the two around it; any size above one that is too slow is too slow,
    any below one that fits fits; above the largest fresh size, that size's time scaled linearly may admit);
    without fresh neighbours its stale estimate may still admit, never refuse: a stale refusal becomes a PROBE;
  * predictions are monotone in the batch size (a running maximum over the sizes' medians);
  * a PROBE is answered at most once per `probe_interval_s` per size: while the probed stream is being measured
    that size holds.

The clock is injected (`clock`, monotonic seconds) so that tests age samples with a fake clock.
"""

from __future__ import annotations

import collections
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

FITS, HOLD, PROBE = "fits", "hold", "probe"


@dataclass
class _Samples:
    samples: collections.deque = field(default_factory=collections.deque)  # (time, seconds), oldest first
    first_at: float | None = None  # when the discarded first sample came (None: the next sample is a first)
    last_at: float | None = None  # when its latest sample (kept or discarded) came


class StepModel:
    """Step wall time by batch size, with aging, outlier-robust medians and probing (see the module docstring)."""

    def __init__(self, *, window: int = 9, min_samples: int = 3, max_age_s: float = 20.0,
                 probe_interval_s: float = 0.5, clock: Callable[[], float] = time.monotonic):
        if window < min_samples or min_samples < 1:
            raise ValueError(f"need 1 <= min_samples <= window, got min_samples={min_samples}, window={window}")
        self.window, self.min_samples, self.max_age_s = window, min_samples, max_age_s
        self.probe_interval_s = probe_interval_s
        self.clock = clock
        self._sizes: dict[int, _Samples] = {}
        self._lock = threading.Lock()  # the engine thread records and asks; logs and probes read the table

    def record(self, batch: int, seconds: float) -> None:
        """One step of `batch` streams took `seconds` (wall time, codec included)."""
        now = self.clock()
        with self._lock:
            b = self._sizes.setdefault(int(batch), _Samples())
            self._expire(b, now)
            b.last_at = now
            if b.first_at is None:
                b.first_at = now  # this size's first sample: discarded
                return
            b.samples.append((now, float(seconds)))
            while len(b.samples) > self.window:
                b.samples.popleft()

    def _expire(self, b: _Samples, now: float) -> None:
        while b.samples and now - b.samples[0][0] > self.max_age_s:
            b.samples.popleft()
        if not b.samples and b.first_at is not None and now - b.first_at > self.max_age_s:
            b.first_at = None  # nothing fresh is left: the next sample is a first again

    def _estimates(self, now: float) -> tuple[dict[int, float], dict[int, float]]:
        """(fresh, stale): each batch size's median of fresh samples (fresh, made monotone), and the median of all
        samples still in the window of sizes without a fresh estimate (stale)."""
        fresh, stale = {}, {}
        for k, b in self._sizes.items():
            recent = [s for t, s in b.samples if now - t <= self.max_age_s]
            if len(recent) >= self.min_samples:
                fresh[k] = statistics.median(recent)
            elif len(b.samples) >= self.min_samples:
                stale[k] = statistics.median(s for _, s in b.samples)
        top = 0.0
        for k in sorted(fresh):
            top = fresh[k] = max(top, fresh[k])
        return fresh, stale

    def predict(self, batch: int) -> float | None:
        """The expected step time at `batch` streams from fresh measurements (the size's own, interpolated between
        fresh neighbours, or bounded by them), else its stale estimate; None when nothing is known."""
        with self._lock:
            return self._predict(int(batch), self.clock())[0]

    def _predict(self, b: int, now: float, estimates=None) -> tuple[float | None, str]:
        """(seconds, how): how = "measured", "interpolated", "at least" (a smaller size's fresh time),
        "at most" (a larger size's fresh time), "stale" or "unknown"."""
        fresh, stale = estimates or self._estimates(now)
        if b in fresh:
            return fresh[b], "measured"
        lower = max((k for k in fresh if k < b), default=None)
        upper = min((k for k in fresh if k > b), default=None)
        if lower is not None and upper is not None:
            lo, hi = fresh[lower], fresh[upper]
            return lo + (hi - lo) * (b - lower) / (upper - lower), "interpolated"
        if b in stale:
            return stale[b], "stale"
        if lower is not None:
            return fresh[lower], "at least"
        if upper is not None:
            return fresh[upper], "at most"
        return None, "unknown"

    def verdict(self, batch: int, budget_s: float) -> str:
        """FITS when a step of `batch` streams is expected within `budget_s`, HOLD when it is known not to be (or a
        probe at its size is being measured), PROBE when only a measurement can tell."""
        with self._lock:
            now = self.clock()
            b = int(batch)
            fresh, stale = estimates = self._estimates(now)
            lower = max((k for k in fresh if k < b), default=None)
            upper = min((k for k in fresh if k > b), default=None)
            seconds, how = self._predict(b, now, estimates)
            if how in ("measured", "interpolated"):
                return FITS if seconds <= budget_s else HOLD
            if lower is not None and fresh[lower] > budget_s:
                return HOLD  # a smaller batch is already too slow
            if upper is not None and fresh[upper] <= budget_s:
                return FITS  # a larger batch fits
            if lower is not None and upper is None and fresh[lower] * b / lower <= budget_s:
                return FITS  # even growing linearly with the batch (steps grow slower than that), it fits
            if b in stale and stale[b] <= budget_s:
                return FITS  # an old measurement may admit, never refuse
            last = self._sizes[b].last_at if b in self._sizes else None
            if last is not None and now - last <= self.probe_interval_s:
                return HOLD  # a stream at this size is being measured
            return PROBE

    def table(self) -> dict[int, dict]:
        """Per batch size seen: the predicted step (ms), the samples kept, the latest sample's age (s) and how the
        prediction is made now (for logs)."""
        now = self.clock()
        out = {}
        with self._lock:
            estimates = self._estimates(now)
            for k in sorted(self._sizes):
                b = self._sizes[k]
                seconds, how = self._predict(k, now, estimates)
                out[k] = {"predicted_ms": None if seconds is None else round(1000 * seconds, 2), "how": how,
                          "samples": len(b.samples),
                          "age_s": None if b.last_at is None else round(now - b.last_at, 1)}
        return out

    def measured(self) -> dict[int, float]:
        """Batch sizes with a fresh estimate -> seconds (monotone in the size)."""
        with self._lock:
            return self._estimates(self.clock())[0]
