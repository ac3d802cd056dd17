"""Speech from text that is still arriving (an LLM's tokens): the "interleaved" layout, fed as text comes.

The interleaved layout (prompt.py) puts the first text token in the prefill and feeds one more text token per
decode step: frame k (k >= 1) reads text row k-1 = token k, then tts_eos, then tts_pad forever. So a frame can be
generated as soon as the token it reads exists. LiveUtterance keeps that invariant while text is appended:

  * Only *committed* text is tokenized: text up to the last whitespace that starts a new word (byte-level BPE
    attaches a leading space to the next word, so the tokens of a committed prefix never change later).
    flush() commits the rest.
  * ready() is False while the next frame's text token has not arrived and the text was not flushed: the engine
    then generates nothing for this utterance (other streams keep running). When text arrives slower than speech,
    the audio pauses (the listener hears a gap) and resumes when the next word is committed.
  * After flush the text track gets tts_eos and then tts_pad, exactly like the whole-text interleaved layout, so
    text given all at once and flushed produces the same codes as `Synthesizer.stream(text,
    text_layout="interleaved")` with the same seed (when the two tokenize the same way).

Backends whose streams cannot take appended text rows (no `append_text_rows`) fall back to waiting for flush and
then speaking the whole text, still in the interleaved layout. So do in-context cloned voices (prompt.py): their
prefill holds the first text rows next to the reference frames. Backends whose streams read a text row before the
frame that uses it (`reads_text_ahead`: the megakernel, whose launch k builds launch k+1's input) are told whether
more text follows: `open_stream(..., text_final=False)` and `stream.end_text()` once tts_eos was appended; until
then they never read past the rows they have (megakernel/backend.py, TextTrack), so the codes are the same.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from .engine import Synthesizer, check_max_new_tokens, frame_limit
from .prompt import ClonedVoice, PromptError, build_prompt
from .sampling import RandomStream
from .voices import resolve_voice

# A commit point: whitespace followed by a non-space character (the start of the next word).
_BOUNDARY = re.compile(r"\s(?=\S)")


def supports_text_append(backend) -> bool:
    """Whether the backend's streams take text rows after open (`stream.append_text_rows(rows)`)."""
    return getattr(backend, "name", None) == "reference" or bool(getattr(backend, "supports_text_append", False))


def reads_text_ahead(backend) -> bool:
    """Whether the backend's streams must be told the end of the text (`open_stream(text_final=...)`, `end_text()`)."""
    return bool(getattr(backend, "reads_text_ahead", False))


class LiveUtterance:
    """One utterance whose text arrives in pieces. Drive it with ready() / next_frame() from one thread."""

    def __init__(self, synth: Synthesizer, *, voice: str | None = None, language: str | None = "auto",
                 instruct: str | None = None, seed: int = 0, max_new_tokens: int | None = None,
                 do_sample: bool = True, **sampling):
        self.synth = synth
        self.voice, self.language, self.instruct = resolve_voice(synth, voice), language, instruct
        # Validate voice, language and instruct now, with a placeholder text.
        synth.prompt("a", voice=self.voice, language=language, instruct=instruct, text_layout="interleaved")
        # An in-context cloned voice: the codec continues from its reference frames; speech waits for flush.
        self.prime_codes = self.voice.ref_codes if isinstance(self.voice, ClonedVoice) else None
        self.params = synth.sampling_params(do_sample=do_sample, **sampling)
        self.max_new_tokens = check_max_new_tokens(max_new_tokens, synth.config.generation.max_new_tokens)
        self.seed = seed
        self.rng = RandomStream(seed)
        self.text = ""  # everything received
        self._committed_chars = 0
        self.tokens: list[int] = []
        self.flushed = False
        self.stream = None
        self._tokens_fed = 0  # tokens 1.. handed to the backend stream as text rows
        self._eos_fed = False
        self._appendable = supports_text_append(synth.backend)
        self._tell_text_end = self._appendable and reads_text_ahead(synth.backend)
        self._text_ended = False  # the stream was told that no more text rows follow
        self.frames = 0
        self.stop_reason: str | None = None

    # Text input ------------------------------------------------------------------------------------------------

    def append(self, text: str) -> None:
        if not text:
            return
        if self.flushed:
            raise PromptError("text after flush")
        self.text += text
        last = None
        for m in _BOUNDARY.finditer(self.text, self._committed_chars):
            last = m
        if last is not None and last.start() > self._committed_chars:
            self._commit(last.start())

    def flush(self) -> None:
        if self.flushed:
            return
        if len(self.text) > self._committed_chars:
            self._commit(len(self.text))
        self.flushed = True

    def _commit(self, end: int) -> None:
        piece = self.text[self._committed_chars:end]
        self._committed_chars = end
        if piece.strip() or self.tokens:
            self.tokens.extend(self.synth.tokenizer.encode(piece))
        else:  # leading whitespace before any word: keep it with the first word
            self._committed_chars -= len(piece)

    # Generation ------------------------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.stop_reason is not None

    @property
    def empty(self) -> bool:
        """Flushed without any speakable text."""
        return self.flushed and not self.tokens

    def ready(self) -> bool:
        """Whether next_frame() can run now without waiting for text."""
        if self.done or self.empty:
            return False
        if self.stream is None:
            return bool(self.tokens) and (self.flushed or (self._appendable and self.prime_codes is None))
        return self.flushed or len(self.tokens) > self.frames

    @torch.inference_mode()
    def _open(self) -> None:
        synth = self.synth
        if self.prime_codes is not None:  # in-context voice, whole text known (ready() waited for flush)
            prompt = build_prompt(synth.config, synth.tokenizer, self.text, voice=self.voice, language=self.language,
                                  instruct=self.instruct, text_layout="interleaved")
            self._tokens_fed, self._eos_fed = len(self.tokens), True
            trailing = prompt.trailing_text_ids
        else:
            # The interleaved prefill depends on the text only through its last row, T(token 0) + C(codec_bos).
            prompt = build_prompt(synth.config, synth.tokenizer, "a", voice=self.voice, language=self.language,
                                  instruct=self.instruct, text_layout="interleaved")
            prompt.text_ids[-1] = self.tokens[0]
            trailing = self._take_trailing_ids()
        talker = synth.talker
        prefill = talker.embed_prompt(prompt)
        pad_row = talker.text_rows([synth.config.ids.tts_pad])[0]
        text_rows = talker.text_rows(trailing) if trailing else prefill[:0]
        extra = {}
        if self._tell_text_end:
            extra["text_final"] = self._text_ended = self._eos_fed
        self.stream = synth.backend.open_stream(prefill, text_rows, pad_row, self.params, self.rng,
                                                max_frames=self.max_new_tokens, **extra)

    def _take_trailing_ids(self) -> list[int]:
        """Trailing text ids (tokens 1.., then tts_eos after flush) not yet handed to the backend."""
        ids = list(self.tokens[1 + self._tokens_fed:])
        self._tokens_fed += len(ids)
        if self.flushed and not self._eos_fed:
            ids.append(self.synth.config.ids.tts_eos)
            self._eos_fed = True
        return ids

    @torch.inference_mode()
    def _feed(self) -> None:
        ids = self._take_trailing_ids()
        if ids:
            self.stream.append_text_rows(self.synth.talker.text_rows(ids))
        if self._tell_text_end and self._eos_fed and not self._text_ended:
            self.stream.end_text()
            self._text_ended = True

    def next_frame(self) -> np.ndarray | None:
        """Generate one frame: its 16 codes, or None when the utterance ended (see stop_reason)."""
        if self.done:
            return None
        # The length guard is known once the whole text is.
        limit, reason = (frame_limit(self.max_new_tokens, len(self.tokens)) if self.flushed
                         else (self.max_new_tokens, "max_new_tokens"))
        if self.frames >= limit:
            self.stop_reason = reason
            self.close()
            return None
        if self.stream is None:
            self._open()
        elif self._appendable:
            self._feed()
        codes = self.stream.next_frame()
        if codes[0] == self.synth.config.ids.codec_eos:
            self.stop_reason = "eos"
            self.close()
            return None
        self.frames += 1
        return codes

    def cancel(self) -> None:
        if not self.done:
            self.stop_reason = "cancelled"
        self.close()

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
