"""Start-up warm-up of the backend at every batch bucket, so that no first step at a new batch size is slow.

For each batch size in `warm_batches(max_streams)` (1, 2, 4, ... and max_streams itself) the warm-up opens that
many throw-away streams in one batched open (the prefill and its graphs), steps them a few times (the decode launch
or graph at that size) and closes them. Every step's wall time goes to `record` (the engine's step model), so that
real-time admission has a measured step time at every bucket from the first request on. The codec's graphs are
warmed by StreamingCodec.warm_up() (codec/streaming.py).
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

from ..backends.base import Backend, StreamSpec

STEPS_PER_BATCH = 4  # the step model discards a bucket's first sample and trusts the median of three


def warm_batches(max_streams: int) -> list[int]:
    """The powers of two up to max_streams, and max_streams itself."""
    sizes = [1 << i for i in range(max(1, max_streams).bit_length()) if 1 << i <= max_streams]
    return sorted(set(sizes) | {max(1, max_streams)})


def warm_up(backend: Backend, make_spec: Callable[[int], StreamSpec], batches: Sequence[int], eos_id: int, *,
            record: Callable[[int, float], None] | None = None, steps: int = STEPS_PER_BATCH,
            clock: Callable[[], float] = time.perf_counter) -> dict:
    """Open, step `steps` times and close `n` streams for each n in `batches`; `make_spec(i)` builds the i-th
    stream's spec (it must allow `steps` frames). A stream that samples EOS leaves the later steps (those are
    recorded at their smaller size). Returns {"batches", "seconds", "step_ms": {n: its last full-size step}}."""
    start = clock()
    step_ms = {}
    for n in batches:
        handles = backend.open([make_spec(i) for i in range(n)])
        try:
            live = list(handles)
            for _ in range(steps):
                if not live:
                    break
                t0 = clock()
                out = backend.step(live)
                seconds = clock() - t0
                if record is not None:
                    record(len(live), seconds)
                if len(live) == n:
                    step_ms[n] = round(1000 * seconds, 2)
                live = [h for i, h in enumerate(live) if i not in out.failed and out.codes[i, 0] != eos_id]
        finally:
            for handle in handles:
                backend.close(handle)
    return {"batches": list(batches), "seconds": clock() - start, "step_ms": step_ms}
