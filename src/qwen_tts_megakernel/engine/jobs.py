"""Streams as the engine's scheduler sees them: a request, where its frames' text comes from, where its events go.

A Job is created by a caller (Synthesizer.stream, the server), handed to Engine.submit(), and from then on touched
only by the scheduler thread, except for the three calls a consumer makes from its own thread: `taken()` (an event
was consumed: backpressure), `cancel()`, and for live text `source.add_text()` / `source.request_flush()`.

Events go to the job's `emit` callable, in order, on the engine's event thread (engine/delivery.py; it must not
block):
    ("frame", np.int64 [16])   one frame's codes (jobs created with frames=True)
    ("chunk", AudioChunk)      PCM16 audio (jobs created with audio=True)
    ("done", JobInfo)          the stream ended; stop_reason says why
    ("error", message)         the stream failed; a ("done", ...) with stop_reason "error" follows

Stop reasons: eos (the talker sampled codec EOS; that frame is not audio), max_new_tokens (the caller's frame
limit), length_guard (the limit proportional to the text length), cancelled (the consumer cancelled), error.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..config import ModelConfig
from ..model import PromptEmbedder
from ..prompt import Prompt
from ..sampling import RandomStream, SamplingParams
from ..backends.base import StreamSpec

STOP_REASONS = ("eos", "max_new_tokens", "length_guard", "cancelled", "error")
DEFAULT_CHUNK_SCHEDULE = (1, 2, 4, 8)
# Runaway guard: about one second of speech per text token plus three seconds, far above any real speaking rate.
GUARD_FRAMES_PER_TOKEN = 12
GUARD_BASE_FRAMES = 38


def length_guard(num_text_tokens: int) -> int:
    return GUARD_BASE_FRAMES + GUARD_FRAMES_PER_TOKEN * num_text_tokens


def frame_limit(max_new_tokens: int, num_text_tokens: int) -> tuple[int, str]:
    """How many frames a stream may generate, and the stop reason when it reaches that many."""
    guard = length_guard(num_text_tokens)
    return (max_new_tokens, "max_new_tokens") if max_new_tokens <= guard else (guard, "length_guard")


def check_max_new_tokens(value: int | None, default: int) -> int:
    """The caller's frame limit (`default` when None), which must be a positive integer."""
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {str(value)[:40]!r}")
    return value


@dataclass
class Request:
    """A validated request: its prompt rows, sampling parameters and frame limit (see Synthesizer.prepare)."""

    prompt: Prompt
    params: SamplingParams
    limit: int  # frames: min(max_new_tokens, length guard)
    limit_reason: str  # the stop reason when `limit` frames were generated


@dataclass
class AudioChunk:
    pcm: np.ndarray  # int16 mono
    sample_rate: int
    first_frame: int
    num_frames: int
    time_s: float  # seconds since the request started, when this chunk was ready

    @property
    def duration_s(self) -> float:
        return len(self.pcm) / self.sample_rate


@dataclass
class JobInfo:
    """What a stream reports when it ends."""

    stop_reason: str
    frames: int
    audio_seconds: float
    time_to_first_audio_ms: float | None
    elapsed_ms: float
    seed: int
    num_text_tokens: int
    first_chunk_ms: dict[str, float] = field(default_factory=dict)  # Job.first_chunk_stages_ms() at the end


def float_to_pcm16(audio: np.ndarray) -> np.ndarray:
    return (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype(np.int16)


def prompt_rows(embedder: PromptEmbedder, config: ModelConfig, prompt: Prompt
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A prompt's talker rows: prefill [L, H], trailing text rows [T, H] and the tts_pad row [H]."""
    prefill = embedder.embed_prompt(prompt)
    text_rows = embedder.text_rows(prompt.trailing_text_ids) if prompt.trailing_text_ids else prefill[:0]
    return prefill, text_rows, embedder.text_rows([config.ids.tts_pad])[0]


class PromptSource:
    """Frames of a request whose whole text is known: one prompt, a fixed frame limit, nothing to wait for."""

    def __init__(self, request: Request, seed: int, random_table: np.ndarray | None = None):
        self.request = request
        self.seed = seed
        self.rng = RandomStream(seed, random_table)

    @property
    def num_text_tokens(self) -> int:
        return self.request.prompt.num_text_tokens

    @property
    def prime_codes(self) -> np.ndarray | None:
        """An in-context cloned voice's reference frames: the codec continues from them."""
        return self.request.prompt.ref_codes

    def prepare(self) -> None:
        pass

    @property
    def empty(self) -> bool:
        return False

    def ready_to_open(self) -> bool:
        return True

    def spec(self, embedder: PromptEmbedder, config: ModelConfig) -> StreamSpec:
        prefill, text_rows, pad_row = prompt_rows(embedder, config, self.request.prompt)
        return StreamSpec(prefill=prefill, text_rows=text_rows, pad_row=pad_row, params=self.request.params,
                          rng=self.rng, max_frames=self.request.limit)

    def limit(self) -> tuple[int, str]:
        return self.request.limit, self.request.limit_reason

    def can_step(self, frames: int) -> bool:
        return True

    def text_update(self, embedder: PromptEmbedder) -> tuple[torch.Tensor | None, bool]:
        return None, False


class Job:
    """One stream: its frame source, chunk schedule, consumer and progress."""

    def __init__(self, source, emit: Callable[[tuple], None], *, label: str = "api",
                 chunk_schedule: tuple[int, ...] = DEFAULT_CHUNK_SCHEDULE, audio: bool = True,
                 frames: bool = False, max_buffered: int = 64):
        if not chunk_schedule or any(int(n) < 1 for n in chunk_schedule):
            raise ValueError(f"chunk_schedule must be a non-empty list of positive frame counts, got {chunk_schedule}")
        self.source = source
        self.emit = emit
        self.label = label
        self.schedule = tuple(int(n) for n in chunk_schedule)
        self.audio, self.want_frames = audio, frames
        self.max_buffered = max_buffered
        self.cancel_event = threading.Event()
        self.created = time.perf_counter()
        self._lock = threading.Lock()
        self._outstanding = 0  # events emitted and not yet taken by the consumer (backpressure)
        self.last_taken = self.created
        self.wake: Callable[[], None] = lambda: None  # set by the engine on submit
        # How send() hands an event to `emit`: at once, or (set by the engine on submit) through its courier thread.
        self.post: Callable[[Callable[[tuple], None], tuple], None] = lambda emit, event: emit(event)
        # Scheduler-thread state.
        self.handle = None  # the backend's stream
        self.codec_handle = None
        self.started: float | None = None
        self.first_audio: float | None = None
        self.frames = 0
        self.max_frames = 0  # what the backend's KV cache holds for this stream (set at open)
        self.samples = 0
        self.chunks_sent = 0
        self.pending: list[np.ndarray] = []
        self.marks: dict[str, float] = {}  # when the first chunk passed each stage (first_chunk_stages_ms)
        self.end_reason: str | None = None  # set when generation ended; the job finishes after its last chunk
        self.finished = False

    @property
    def endpoint(self) -> str:  # the label under which the server's metrics count this stream
        return self.label

    # Consumer side -------------------------------------------------------------------------------------------

    def taken(self) -> None:
        """The consumer took one event off its queue."""
        with self._lock:
            self._outstanding -= 1
            self.last_taken = time.perf_counter()
        self.wake()

    def cancel(self) -> None:
        self.cancel_event.set()
        self.wake()

    # Scheduler side ------------------------------------------------------------------------------------------

    @property
    def outstanding(self) -> int:
        with self._lock:
            return self._outstanding

    def send(self, event: tuple, counted: bool = True) -> None:
        if counted:
            with self._lock:
                self._outstanding += 1
        self.post(self.emit, event)

    def chunk_due(self) -> bool:
        """Whether the pending frames make a chunk now (or are the last ones)."""
        if not self.pending:
            return False
        if self.end_reason is not None:
            return True
        return len(self.pending) >= self.schedule[min(self.chunks_sent, len(self.schedule) - 1)]

    FIRST_CHUNK_STAGES = (("queued", "open_start"), ("prefill", "opened"), ("first_step", "first_frame"),
                          ("codec", "first_pcm"), ("send", "first_sent"))

    def first_chunk_stages_ms(self) -> dict[str, float]:
        """Where the time to the first chunk went, stage by stage (ms): queued (waiting for a slot or a step
        boundary), prefill (backend.open, this job's batch), first_step (frame 0), codec (its decode, the int16
        conversion and the copy to the host), send (until the event thread handed it to the consumer). Stages
        not reached yet are missing."""
        out, last = {}, self.created
        for name, mark in self.FIRST_CHUNK_STAGES:
            if mark not in self.marks:
                break
            out[name] = 1000 * (self.marks[mark] - last)
            last = self.marks[mark]
        return out

    def info(self, stop_reason: str, sample_rate: int) -> JobInfo:
        now = time.perf_counter()
        return JobInfo(stop_reason=stop_reason, frames=self.frames, audio_seconds=self.samples / sample_rate,
                       time_to_first_audio_ms=None if self.first_audio is None
                       else 1000 * (self.first_audio - self.created),
                       elapsed_ms=1000 * (now - self.created), seed=self.source.seed,
                       num_text_tokens=self.source.num_text_tokens, first_chunk_ms=self.first_chunk_stages_ms())
