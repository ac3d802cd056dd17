"""The backend contract: what the engine asks of every talker + code-predictor backend.

A backend turns prompts into code frames for many streams at once. The engine (engine/scheduler.py) is its only
caller; it never asks which backend it holds. Three backends implement this contract:

    reference   backends/reference.py   plain PyTorch, batched, runs on CPU: the spec
    graphed     backends/graphed.py     the reference math with static shapes, one CUDA graph per batch bucket
    megakernel  megakernel/backend.py   one CUDA launch per frame for every active stream

Frame semantics (the same for every backend, and for one stream alone or beside others):
  frame 0's talker input is the last prefill row (rows 0..L-2 only fill the KV cache); frame k >= 1's input is
  F(codes of frame k-1) + text_rows[k-1], or + pad_row once the text track is used up (F = the sum of the 16
  codebook embeddings). Codebook 0 of frame k is sampled with draw 0 of `rng.frame(k)`, codebooks 1..15 with draws
  1..15. A frame whose codebook 0 is codec EOS ends the stream; its other 15 codes are meaningless.

Batch invariance: the codes a stream gets never depend on which other streams share a step, nor on their positions.

Live text: a stream opened with `text_final=False` receives more text rows through `append_text()` and is told
`end_text()` when none will follow. The engine only steps such a stream while the row its next frame reads exists
(frame k needs rows up to k-1; a backend that reads a row earlier, like the megakernel, handles that inside).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np
import torch

from ..sampling import RandomStream, SamplingParams


@dataclass
class StreamSpec:
    """Everything a backend needs to open one stream."""

    prefill: torch.Tensor  # [L, H] talker input rows of the prompt; row L-1 is frame 0's input
    text_rows: torch.Tensor  # [T, H] the text track: frame k >= 1 adds text_rows[k-1] (pad_row past the end)
    pad_row: torch.Tensor  # [H] the text row of tts_pad
    params: SamplingParams
    rng: RandomStream
    max_frames: int  # frames this stream may generate; the backend needs L + max_frames positions of KV cache
    text_final: bool = True  # False: more rows follow through append_text(), then end_text()


@dataclass
class StepOutput:
    """One frame for each stream of a step."""

    codes: np.ndarray  # [B, 16] int64; row i belongs to streams[i]; codes[i, 0] == codec EOS: stream i is done
    failed: dict[int, str] = field(default_factory=dict)  # i -> reason: stream i failed this step; close it


class BackendError(RuntimeError):
    """The backend as a whole is unusable (a CUDA error, a kernel timeout): every open stream is lost."""


class Backend(Protocol):
    """A batched frame generator. All methods are called from the engine's one scheduler thread."""

    max_streams: int  # streams open at once (KV-cache slots)
    max_seq_len: int  # positions per stream: prefill rows + frames

    def open(self, specs: Sequence[StreamSpec]) -> list[object]:
        """Prefill the given streams (batched where the backend can) and return one handle per spec. Raises
        ValueError naming the problem when a spec does not fit (too many streams, prompt + frames > max_seq_len)."""
        ...

    def step(self, streams: Sequence[object]) -> StepOutput:
        """Generate the next frame of every given stream (each at its own position). Raises BackendError only when
        the backend itself broke; a failure that concerns one stream goes into StepOutput.failed."""
        ...

    def append_text(self, stream: object, rows: torch.Tensor) -> None:
        """Extend a live stream's text track by rows [n, H]."""
        ...

    def end_text(self, stream: object) -> None:
        """No more text rows will follow for this stream."""
        ...

    def close(self, stream: object) -> None:
        """Free the stream's state (its KV-cache slot). Safe to call twice."""
        ...
