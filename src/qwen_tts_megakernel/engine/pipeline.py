"""The two halves of an engine step that overlap on the GPU: the backend's step in flight, and the codec's lane.

    launched = StepInFlight.begin(backend, handles)   # frame t+1 queued (the megakernel: one launch)
    decoding = lane.decode(jobs)                      # frame t's chunks queued on the codec's own CUDA stream
    out = launched.finish()                           # waits for frame t+1's records only
    for job, pcm in decoding.wait(): ...              # waits for those chunks' copy only

A backend with begin_step/finish_step (the megakernel) returns from begin at once; any other backend steps inside
begin (the reference and graphed backends: the same codes, no overlap). The lane decodes through the codec's
push_pcm16 on CUDA (decode, int16 conversion and one device -> host copy, all queued on its stream, never a
device-wide synchronisation) and through its push plus jobs.float_to_pcm16 elsewhere (the same rounding, bit for
bit: tests/test_engine_pipeline.py): off CUDA every step is synchronous, so the CPU engine computes exactly what it
always did.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch

from ..backends.base import StepOutput
from .jobs import float_to_pcm16


class StepInFlight:
    """One backend step between its launch and its result; `wait_s` is how long finish() waited for it."""

    def __init__(self, backend, launched=None, output: StepOutput | None = None):
        self.backend, self.launched, self.output = backend, launched, output
        self.wait_s = 0.0

    @classmethod
    def begin(cls, backend, handles: list, split: bool = True) -> StepInFlight:
        """Launch the step (split: begin_step now, finish_step in finish(), when the backend has them)."""
        if split and hasattr(backend, "begin_step"):
            return cls(backend, launched=backend.begin_step(handles))
        return cls(backend, output=backend.step(handles))

    def finish(self) -> StepOutput:
        if self.output is None:
            t0 = time.perf_counter()
            self.output = self.backend.finish_step(self.launched)
            self.wait_s = time.perf_counter() - t0
        return self.output


class Decoding:
    """The chunks of one lane.decode(): per job its frames and, once waited for, its int16 PCM or its error."""

    def __init__(self, jobs: list, frames: list[np.ndarray], first_frames: list[int], pending,
                 errors: dict[int, Exception]):
        self.jobs, self.first_frames, self.pending, self.errors = jobs, first_frames, pending, errors
        self.num_frames = [len(f) for f in frames]
        self.wait_s = 0.0

    def wait(self) -> list[tuple[object, np.ndarray | Exception]]:
        """(job, its int16 PCM or the exception its push raised), in the order of decode()'s jobs."""
        t0 = time.perf_counter()
        results: list[np.ndarray | Exception | None] = [self.errors.get(i) for i in range(len(self.jobs))]
        for indices, pending in self.pending:
            for i, pcm in zip(indices, pending.wait() if hasattr(pending, "wait") else pending):
                results[i] = pcm
        self.wait_s = time.perf_counter() - t0
        return list(zip(self.jobs, results))


class CodecLane:
    """The engine's codec: its streams open, push and close on the codec's own CUDA stream (or synchronously off
    CUDA). decode() takes the jobs' pending frames; one batched push, retried job by job if it raises, so that one
    job's bad push fails only that job."""

    def __init__(self, codec, overlap: bool = True):
        self.codec = codec
        device = getattr(codec, "device", torch.device("cpu"))
        self.overlapped = overlap and device.type == "cuda" and hasattr(codec, "push_pcm16")
        self.cuda_stream = torch.cuda.Stream(device) if self.overlapped else None
        if self.cuda_stream is not None:  # after whatever made the codec's weights and state (warm-up included)
            self.cuda_stream.wait_stream(torch.cuda.current_stream(device))

    def _on_stream(self):
        return torch.cuda.stream(self.cuda_stream) if self.cuda_stream is not None else contextlib.nullcontext()

    def open(self, prime_codes=None):
        with self._on_stream():
            return self.codec.open(prime_codes)

    def close(self, handle) -> None:
        self.codec.close(handle)

    def _push(self, handles: list, frames: list[np.ndarray]):
        if self.overlapped:
            return self.codec.push_pcm16(handles, frames)
        return [float_to_pcm16(pcm) for pcm in self.codec.push(handles, frames)]

    def decode(self, jobs: list) -> Decoding:
        """Queue the chunks of `jobs` (their pending frames, which leave the jobs)."""
        frames = [np.stack(job.pending) for job in jobs]
        first_frames = [job.frames - len(job.pending) for job in jobs]
        for job in jobs:
            job.pending = []
        handles = [job.codec_handle for job in jobs]
        errors: dict[int, Exception] = {}
        with self._on_stream():
            try:
                pending = [(list(range(len(jobs))), self._push(handles, frames))]
            except Exception:  # noqa: BLE001 - retry one by one: only the job whose push fails fails
                pending = []
                for i in range(len(jobs)):
                    try:
                        pending.append(([i], self._push([handles[i]], [frames[i]])))
                    except Exception as exc:  # noqa: BLE001
                        errors[i] = exc
        return Decoding(jobs, frames, first_frames, pending, errors)
