"""Word timings of a streamed-text context: an *estimate* of when each word is spoken, in seconds of its audio.

The model gives no alignment, so the times are estimated from what the engine knows about the interleaved
(streamed-text) layout, where frame k reads text token k (live.py):

  * A word cannot be spoken before the talker has read its first token: word i, whose first token is token t_i,
    starts no earlier than frame t_i, i.e. t_i * 80 ms. That is a hard lower bound.
  * The talker reads 12.5 tokens per second of audio but speaks only about 4 to 5 (QwenLM/Qwen3-TTS#239 measured
    it; qwen3-tts-model.md section 2), so speech lags reading more and more along an utterance. The estimate is
    therefore start_i = max(t_i * 80 ms, t_i / R), with R = `tokens_per_second` (4.5 by default), and a word ends
    where the next one starts.
  * When the context ends naturally (eos) and the last estimated end is past the real end of the audio, the words
    not sent yet are spread over what is left in proportion to their tokens; the last word ends with the audio. A
    context cut short (cancelled, max_new_tokens) sends no more words: they were not spoken.

A word goes out as soon as the audio that reaches its estimated start has been sent, which is what a client
needs to know what was heard before a barge-in (Pipecat's add_word_timestamps). Words are runs of non-space
characters; a word counts as complete once whitespace follows it or the context is flushed. Text without spaces
(Chinese, Japanese) is one word per run.

Token positions follow the live layout's tokenization: the first word's tokens include any leading whitespace,
and every later word is tokenized together with the whitespace before it (Qwen2's pre-tokenizer never merges
across that boundary, so the counts equal those of the whole text).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

FRAME_SECONDS = 0.08  # 12.5 frames per second: the talker reads one text token per frame
SPEAKING_TOKENS_PER_SECOND = 4.5

_WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class WordTime:
    word: str
    start: float  # seconds from the start of the context's audio
    end: float


class WordTimeline:
    """Words of one context as text arrives; `due(audio_seconds)` returns the words whose audio has gone out."""

    def __init__(self, encode: Callable[[str], list[int]], *, tokens_per_second: float = SPEAKING_TOKENS_PER_SECOND):
        if not tokens_per_second > 0:
            raise ValueError(f"tokens_per_second must be > 0, got {tokens_per_second}")
        self._encode = encode
        self._seconds_per_token = max(FRAME_SECONDS, 1.0 / tokens_per_second)
        self._text = ""
        self._scanned = 0  # characters of _text already split into complete words
        self._flushed = False
        self._words: list[str] = []
        self._first_token: list[int] = []  # token index of each complete word's first token
        self._tokens = 0  # tokens of the complete words
        self._sent = 0  # words already returned

    def add_text(self, delta: str) -> None:
        self._text += delta
        self._split()

    def flush(self) -> None:
        self._flushed = True
        self._split()

    def _split(self) -> None:
        for m in _WORD.finditer(self._text, self._scanned):
            if m.end() == len(self._text) and not self._flushed:
                break  # the word may go on in the next delta
            piece = self._text[self._scanned if self._words else 0:m.end()]
            self._first_token.append(self._tokens)
            self._tokens += len(self._encode(piece))
            self._words.append(m.group())
            self._scanned = m.end()

    def _start(self, i: int) -> float:
        return (self._first_token[i] if i < len(self._words) else self._tokens) * self._seconds_per_token

    def due(self, audio_seconds: float) -> list[WordTime]:
        """The words not returned yet whose estimated start is before `audio_seconds` of audio sent."""
        out = []
        while self._sent < len(self._words) and self._start(self._sent) < audio_seconds:
            i = self._sent
            out.append(WordTime(self._words[i], round(self._start(i), 3), round(self._start(i + 1), 3)))
            self._sent += 1
        return out

    def finish(self, audio_seconds: float, spoken_to_end: bool) -> list[WordTime]:
        """The context's audio ended at `audio_seconds`. If it ended naturally, the remaining words, fitted into the
        audio that is left; otherwise none."""
        if not spoken_to_end:
            self._sent = len(self._words)
            return []
        self.flush()
        rest = range(self._sent, len(self._words))
        if not rest:
            return []
        a = min(self._start(rest[0]), audio_seconds)
        estimated_end = self._start(len(self._words))
        scale = (audio_seconds - a) / (estimated_end - a) if estimated_end > audio_seconds else 1.0

        def fit(t: float) -> float:
            return round(a + (t - a) * scale, 3)

        out = [WordTime(self._words[i], fit(self._start(i)), fit(self._start(i + 1))) for i in rest]
        out[-1] = WordTime(out[-1].word, out[-1].start, round(audio_seconds, 3))
        self._sent = len(self._words)
        return out


def timestamps_message(context_id: str, words: list[WordTime]) -> dict:
    """The WebSocket event for a batch of words (Cartesia's shape, flattened)."""
    return {"type": "timestamps", "context_id": context_id, "words": [w.word for w in words],
            "start": [w.start for w in words], "end": [w.end for w in words]}
