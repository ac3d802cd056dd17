"""When a streamed-text context may speak: the policy for text that arrives slower than speech.

In the interleaved layout the talker reads one text token per 80 ms frame, 12.5 tokens per second of audio, so
frame k cannot be generated before token k has arrived. An LLM writing 5 tokens/s runs dry after every word: left
alone, the audio stutters (a word, a pause, a word). The policy trades a little time to first audio for fewer,
shorter pauses:

  * Measure the text's arrival rate r (tokens per second since the context's first text).
  * A context starts speaking, or resumes after running dry, once the text buffered ahead of the talker would
    last `lead_seconds` of audio at that rate: need = lead_seconds * (12.5 - r) tokens (none when r >= 12.5,
    i.e. when text comes faster than the talker reads it: then it speaks at the first word).
  * It never waits longer than `max_wait_seconds` for that (a start or a resume), and a flushed context (all its
    text known) always goes ahead.
  * While speaking it goes on as long as it has a token to read.

`TextPacing(lead_seconds=0, max_wait_seconds=0)` turns the policy off (speak whenever a token is there).
`python -m qwen_tts_megakernel.tools.slow_text` measures the trade-off (docs/pipecat.md has the table).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

READ_TOKENS_PER_SECOND = 12.5  # the talker reads one text token per 80 ms frame


@dataclass(frozen=True)
class TextPacing:
    lead_seconds: float = 2.0  # buffer enough text for this much uninterrupted audio at the measured rate
    max_wait_seconds: float = 1.0  # the longest a start or a resume waits for that buffer

    def __post_init__(self):
        for name in ("lead_seconds", "max_wait_seconds"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"TextPacing.{name} must be a number >= 0, got {value!r}")


class TextPacer:
    """The policy's state for one context: `on_text` when text arrives, `on_tokens` when it is committed (tokenized),
    `may_speak` before each frame."""

    def __init__(self, pacing: TextPacing = TextPacing(), clock: Callable[[], float] = time.monotonic):
        self.pacing = pacing
        self.clock = clock
        self._first_text: float | None = None
        self._tokens = 0
        self._speaking = False
        self._waiting_since: float | None = None

    def on_text(self) -> None:
        """Text arrived (the rate counts from the first)."""
        if self._first_text is None:
            self._first_text = self.clock()

    def on_tokens(self, total_tokens: int) -> None:
        """The context now has `total_tokens` committed text tokens."""
        self.on_text()
        self._tokens = total_tokens

    def rate(self) -> float:
        """Measured arrival rate in tokens per second (infinite until time has passed)."""
        if self._first_text is None:
            return 0.0
        elapsed = self.clock() - self._first_text
        return math.inf if elapsed <= 0 else self._tokens / elapsed

    def tokens_needed(self) -> int:
        shortfall = READ_TOKENS_PER_SECOND - self.rate()
        return 0 if shortfall <= 0 else math.ceil(self.pacing.lead_seconds * shortfall)

    def may_speak(self, tokens_ahead: int, flushed: bool) -> bool:
        """Whether the next frame may be generated, with `tokens_ahead` committed tokens not read yet."""
        if flushed:
            self._speaking = True
            return True
        now = self.clock()
        if tokens_ahead <= 0:  # dry: the next frame has no token to read
            if self._speaking:
                self._speaking, self._waiting_since = False, now  # a resume waits from here
            return False
        if self._speaking:
            return True
        if self._waiting_since is None:  # the start waits from the context's first text
            self._waiting_since = self._first_text if self._first_text is not None else now
        if tokens_ahead >= max(1, self.tokens_needed()) or now - self._waiting_since >= self.pacing.max_wait_seconds:
            self._speaking = True
            self._waiting_since = None
        return self._speaking
