"""The backend contract over a backend that steps one stream per call (open_stream / next_frame): the megakernel
until its batched launch lands. `step` runs the given streams one after another."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..sampling import SamplingError
from .base import BackendError, StepOutput, StreamSpec


class PerStreamBackend:
    def __init__(self, inner):
        self.inner = inner
        self.max_streams = inner.n_slots
        self.max_seq_len = inner.max_seq

    def open(self, specs: Sequence[StreamSpec]) -> list:
        handles = []
        try:
            for spec in specs:
                extra = {} if spec.text_final else {"text_final": False}
                handles.append(self.inner.open_stream(spec.prefill, spec.text_rows, spec.pad_row, spec.params,
                                                      spec.rng, max_frames=spec.max_frames, **extra))
        except Exception:
            for h in handles:
                h.close()
            raise
        return handles

    def step(self, streams: Sequence) -> StepOutput:
        codes = np.zeros((len(streams), 16), dtype=np.int64)
        failed: dict[int, str] = {}
        for i, stream in enumerate(streams):
            try:
                codes[i] = stream.next_frame()
            except SamplingError as exc:
                failed[i] = str(exc)
            except RuntimeError as exc:  # MegakernelError: the instance is unusable afterwards
                raise BackendError(str(exc)) from exc
        return StepOutput(codes=codes, failed=failed)

    def append_text(self, stream, rows) -> None:
        stream.append_text_rows(rows)

    def end_text(self, stream) -> None:
        stream.end_text()

    def close(self, stream) -> None:
        stream.close()
