"""Speech from text that is still arriving (an LLM's tokens): the "interleaved" layout, fed as text comes.

The interleaved layout (prompt.py) puts the first text token in the prefill and feeds one more text token per
decode step: frame k (k >= 1) reads text row k-1 = token k, then tts_eos, then tts_pad forever. So a frame can be
generated as soon as the token it reads exists. LiveUtterance is the engine's frame source for such a stream
(engine/jobs.py has the other one, PromptSource) and keeps that invariant while text is appended:

  * Only *committed* text is tokenized: text up to the last whitespace that starts a new word (byte-level BPE
    attaches a leading space to the next word, so the tokens of a committed prefix never change later).
    flush() commits the rest.
  * can_step(k) is False while frame k's text token has not arrived and the text was not flushed: the engine then
    steps the other streams and not this one. When text arrives slower than speech, the audio pauses (the listener
    hears a gap); pacing.py decides when it starts and resumes (it buffers a little text first, adapting to the
    measured arrival rate, so that the pauses are fewer).
  * After flush the text track gets tts_eos and then tts_pad, exactly like the whole-text interleaved layout, so
    text given all at once and flushed produces the same codes as `Synthesizer.stream(text,
    text_layout="interleaved")` with the same seed (when the two tokenize the same way).

Text arrives on the consumer's thread (add_text, request_flush: an inbox under a lock); everything else runs on the
engine's scheduler thread, which drains the inbox in prepare().
"""

from __future__ import annotations

import re
import threading

import torch

from .backends.base import StreamSpec
from .config import ModelConfig
from .engine import Synthesizer, check_max_new_tokens, frame_limit
from .engine.jobs import prompt_rows
from .model import PromptEmbedder
from .pacing import TextPacer, TextPacing
from .prompt import PromptError, build_prompt
from .sampling import RandomStream

# A commit point: whitespace followed by a non-space character (the start of the next word).
_BOUNDARY = re.compile(r"\s(?=\S)")


class LiveUtterance:
    """One utterance whose text arrives in pieces: the engine's frame source for a live-text job."""

    def __init__(self, synth: Synthesizer, *, voice: str | None = None, language: str | None = "auto",
                 instruct: str | None = None, seed: int = 0, max_new_tokens: int | None = None,
                 do_sample: bool = True, pacing: TextPacing = TextPacing(), **sampling):
        self.config, self.tokenizer = synth.config, synth.tokenizer
        self.voice, self.language, self.instruct = voice, language, instruct
        # Validate voice, language and instruct now, with a placeholder text.
        synth.prompt("a", voice=voice, language=language, instruct=instruct, text_layout="interleaved")
        self.params = synth.sampling_params(do_sample=do_sample, **sampling)
        self.max_new_tokens = check_max_new_tokens(max_new_tokens, synth.config.generation.max_new_tokens)
        self.seed = seed
        self.rng = RandomStream(seed)
        self.text = ""  # everything received
        self._committed_chars = 0
        self.tokens: list[int] = []
        self.flushed = False
        self.pacer = TextPacer(pacing)  # when to start and resume speaking while text is still arriving
        self._inbox: list[str] = []
        self._flush_requested = False
        self._lock = threading.Lock()
        self._tokens_fed = 0  # tokens 1.. handed to the backend as text rows
        self._eos_fed = False
        self._end_told = False

    # Consumer thread -------------------------------------------------------------------------------------------

    def add_text(self, text: str) -> None:
        with self._lock:
            self._inbox.append(text)

    def request_flush(self) -> None:
        with self._lock:
            self._flush_requested = True

    # Scheduler thread: text ------------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Take the text that arrived (tokenizing committed words); PromptError for text after flush."""
        with self._lock:
            inbox, self._inbox = self._inbox, []
            flush = self._flush_requested
        if inbox:
            self.append("".join(inbox))
        if flush:
            self.flush()

    def append(self, text: str) -> None:
        if not text:
            return
        if self.flushed:
            raise PromptError("text after flush")
        self.pacer.on_text()
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
            self.tokens.extend(self.tokenizer.encode_user(piece))
            self.pacer.on_tokens(len(self.tokens))
        else:  # leading whitespace before any word: keep it with the first word
            self._committed_chars -= len(piece)

    # Scheduler thread: the frame-source interface (engine/jobs.py) ---------------------------------------------

    @property
    def num_text_tokens(self) -> int:
        return len(self.tokens)

    @property
    def empty(self) -> bool:
        """Flushed without any speakable text."""
        return self.flushed and not self.tokens

    def ready_to_open(self) -> bool:
        return bool(self.tokens)

    def spec(self, embedder: PromptEmbedder, config: ModelConfig) -> StreamSpec:
        # The interleaved prefill depends on the text only through its last row, T(token 0) + C(codec_bos).
        prompt = build_prompt(config, self.tokenizer, "a", voice=self.voice, language=self.language,
                              instruct=self.instruct, text_layout="interleaved")
        prompt.text_ids[-1] = self.tokens[0]
        prompt.trailing_text_ids = self._take_trailing_ids()
        prefill, text_rows, pad_row = prompt_rows(embedder, config, prompt)
        self._end_told = self._eos_fed
        return StreamSpec(prefill=prefill, text_rows=text_rows, pad_row=pad_row, params=self.params, rng=self.rng,
                          max_frames=self.max_new_tokens, text_final=self._eos_fed)

    def limit(self) -> tuple[int, str]:
        # The length guard is known once the whole text is.
        if self.flushed:
            return frame_limit(self.max_new_tokens, len(self.tokens))
        return self.max_new_tokens, "max_new_tokens"

    def can_step(self, frames: int) -> bool:
        """Frame k reads token k (k >= 1), or tts_eos / tts_pad once the text is flushed; the pacing policy decides
        when a stream that ran dry goes on."""
        return self.pacer.may_speak(len(self.tokens) - frames, self.flushed)

    @torch.inference_mode()
    def text_update(self, embedder: PromptEmbedder) -> tuple[torch.Tensor | None, bool]:
        """New text rows for the backend, and whether the backend may now be told that the text ended."""
        ids = self._take_trailing_ids()
        rows = embedder.text_rows(ids) if ids else None
        end = self._eos_fed and not self._end_told
        self._end_told = self._end_told or end
        return rows, end

    def _take_trailing_ids(self) -> list[int]:
        """Trailing text ids (tokens 1.., then tts_eos after flush) not yet handed to the backend."""
        ids = list(self.tokens[1 + self._tokens_fed:])
        self._tokens_fed += len(ids)
        if self.flushed and not self._eos_fed:
            ids.append(self.config.ids.tts_eos)
            self._eos_fed = True
        return ids
