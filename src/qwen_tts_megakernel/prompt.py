"""The official prefill layouts (qwen3-tts-model.md section 2), as rows of ids.

The talker is fed embedding rows, each the sum of a text-track term T(id) = text_projection(text_embedding(id))
and a codec-track term C(id) = codec_embedding(id); either may be absent. This module decides which ids go in
which row; the model turns rows into vectors. Layout (CustomVoice "ryan", English):

    instruct rows   T(<|im_start|>user\\n{instruct}<|im_end|>\\n)          (voice design; 1.7B custom voice)
    role rows       T(<|im_start|>) T(assistant) T(\\n)
    codec tag rows  P+C(think) P+C(think_bos) P+C(english) P+C(think_eos) P+C(ryan) B+C(codec_pad)
    text body       "prefill":     T(tok_i)+C(codec_pad) for every token, E+C(codec_pad), P+C(codec_bos)
                    "interleaved": T(tok_0)+C(codec_bos); later tokens, then E, ride one per decode step
    decode step k   F(frame_k) + trailing_text[k]  (P once the trailing text is used up)

with P, B, E the tts_pad, tts_bos and tts_eos text ids. Language "auto" uses the tags (nothink, think_bos,
think_eos); a dialect speaker asked for Chinese or auto gets its dialect's language id.

User text and instructions are escaped: the template's special tokens (<|im_start|>, <|im_end|>, <tts_pad>, ...)
written in them are tokenized as plain characters, so user input can never add or close a template turn. For any
text without such strings the ids equal the official processor's.

Base models clone a voice (section 2a): the speaker row's codec term is the reference clip's x-vector instead of
C(speaker). With reference codes and transcript (in-context, "ICL"), the text body is replaced by

    text  = T(ref tokens) T(target tokens) E                        (Lt rows)
    codec = C(codec_bos) F(ref frame 0) .. F(ref frame R-1)          (R+1 rows)
    "prefill":     text_i + C(codec_pad) for every text row, then codec_j + P for every codec row
    "interleaved": text_j + codec_j for j < R+1 (P once the text is used up); text rows beyond R+1 ride the
                   decode steps

and the model continues speaking after the reference frames (the codec decoder continues from them too). Rows
whose codec term is not a table row (the x-vector, reference frames) are carried by the Prompt next to the ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .languages import model_language, unknown_language_message
from .config import ModelConfig
from .tokenizer import TextTokenizer

TEXT_LAYOUTS = ("prefill", "interleaved")


class PromptError(ValueError):
    """A request the model cannot express: unknown voice or language, empty text, unsupported option."""


@dataclass(frozen=True)
class ClonedVoice:
    """A reference voice for a Base model, computed once from a reference clip (see voices.py)."""

    x_vector: torch.Tensor  # [H] speaker embedding, the codec term of the speaker row
    ref_codes: np.ndarray | None = None  # [R, 16] int64 codes of the reference clip: the in-context layout
    ref_text: str | None = None  # the reference clip's transcript (in-context layout only)
    name: str | None = None

    @property
    def in_context(self) -> bool:
        return self.ref_codes is not None


@dataclass
class Prompt:
    """Prefill rows and the text track of the decode steps, as ids (None = no term on that track), plus the rows
    whose codec term is a vector: the x-vector (row `speaker_row`) and F(reference frame i) (row `ref_row + i`)."""

    text_ids: list[int | None] = field(default_factory=list)
    codec_ids: list[int | None] = field(default_factory=list)
    trailing_text_ids: list[int] = field(default_factory=list)
    num_text_tokens: int = 0
    speaker_embedding: torch.Tensor | None = None  # [H]
    speaker_row: int | None = None
    ref_codes: np.ndarray | None = None  # [R, 16]: the codec decoder continues from these frames
    ref_row: int | None = None

    def add(self, text_id: int | None, codec_id: int | None) -> None:
        self.text_ids.append(text_id)
        self.codec_ids.append(codec_id)

    def __len__(self) -> int:
        return len(self.text_ids)


def assistant_ids(tokenizer: TextTokenizer, text: str) -> list[int]:
    """The ids of "<|im_start|>assistant\n{text}<|im_end|>\n<|im_start|>assistant\n", the text escaped. The
    special tokens split the template into parts that are tokenized apart, so encoding the parts one by one gives
    the ids of the whole string."""
    return (tokenizer.encode("<|im_start|>") + tokenizer.encode_user(f"assistant\n{text}")
            + tokenizer.encode("<|im_end|>\n<|im_start|>assistant\n"))


def instruct_ids(tokenizer: TextTokenizer, instruct: str) -> list[int]:
    """The ids of "<|im_start|>user\n{instruct}<|im_end|>\n", the instruction escaped."""
    return (tokenizer.encode("<|im_start|>") + tokenizer.encode_user(f"user\n{instruct}")
            + tokenizer.encode("<|im_end|>\n"))


def ref_text(text: str) -> str:
    return f"<|im_start|>assistant\n{text}<|im_end|>\n"


def resolve_voice(config: ModelConfig, voice: str | ClonedVoice | None) -> str | ClonedVoice | None:
    """The speaker name to use, lower case (a ClonedVoice for Base models); None for models without speakers.
    Names of stored voices are resolved to a ClonedVoice before this (voices.resolve_voice)."""
    if isinstance(voice, ClonedVoice):
        if config.model_type != "base":
            raise PromptError(f"a cloned voice needs a Base model; this one is {config.model_type}")
        width = config.talker.hidden_size
        if tuple(voice.x_vector.shape) != (width,):
            raise PromptError(f"voice {voice.name or ''!r} has a speaker embedding of shape "
                              f"{list(voice.x_vector.shape)}; this model needs [{width}] (made with another model?)")
        if voice.in_context and (not voice.ref_text or voice.ref_codes.ndim != 2 or len(voice.ref_codes) == 0
                                 or voice.ref_codes.shape[1] != config.talker.num_code_groups):
            raise PromptError(f"voice {voice.name or ''!r}: the in-context layout needs a transcript and reference "
                              f"codes [R, {config.talker.num_code_groups}]")
        return voice
    if config.model_type == "custom_voice":
        if voice is None or voice == "":
            return "ryan" if "ryan" in config.speakers else next(iter(config.speakers), None)
        name = voice.lower()
        if name not in config.speakers:
            raise PromptError(f"unknown voice {voice!r}; this model has: {', '.join(sorted(config.speakers))}")
        return name
    if voice:
        if config.model_type == "voice_design":
            raise PromptError(f"voice {voice!r} given, but a voice design model has no named voices: describe the "
                              "voice with instruct instead")
        raise PromptError(f"unknown voice {voice!r}: a Base model speaks in cloned voices; add one with "
                          "`qwen-tts-mk voices add` or POST /v1/audio/voices")
    if config.model_type == "base":
        raise PromptError("a Base model needs a voice (voice cloning): the name of a stored voice (add one with "
                          "`qwen-tts-mk voices add` or POST /v1/audio/voices)")
    return None


def resolve_language(config: ModelConfig, language: str | None) -> str:
    """The model's name of `language` ("en", "en-US", "English" -> "english"; languages.py)."""
    name = model_language(language, config.languages)
    if name is None:
        raise PromptError(unknown_language_message(language, config.languages))
    return name


def build_prompt(config: ModelConfig, tokenizer: TextTokenizer, text: str, *, voice: str | ClonedVoice | None = None,
                 language: str | None = "auto", instruct: str | None = None,
                 text_layout: str = "prefill") -> Prompt:
    """The prefill rows and trailing text track for one utterance, following the official layout."""
    if text_layout not in TEXT_LAYOUTS:
        raise PromptError(f"text_layout must be one of {TEXT_LAYOUTS}, got {text_layout!r}")
    if not isinstance(text, str) or not text.strip():
        raise PromptError("text is empty")
    speaker = resolve_voice(config, voice)
    lang = resolve_language(config, language)
    if instruct and not config.supports_instruct:
        raise PromptError(f"this model ({config.model_type}, {config.size_label}) does not take instruct")

    ids = config.ids
    wrapped = assistant_ids(tokenizer, text)
    role_ids, text_tokens = wrapped[:3], wrapped[3:-5]
    if not text_tokens:
        raise PromptError("text is empty after tokenization")

    prompt = Prompt(num_text_tokens=len(text_tokens))
    if instruct:
        for token in instruct_ids(tokenizer, instruct):
            prompt.add(token, None)
    for token in role_ids:
        prompt.add(token, None)

    cloned = speaker if isinstance(speaker, ClonedVoice) else None
    language_id = None if lang == "auto" else config.language_ids[lang]
    if speaker is not None and cloned is None and lang in ("chinese", "auto") and speaker in config.speaker_dialects:
        language_id = config.language_ids[config.speaker_dialects[speaker]]
    if language_id is None:
        codec = [ids.codec_nothink, ids.codec_think_bos, ids.codec_think_eos]
    else:
        codec = [ids.codec_think, ids.codec_think_bos, language_id, ids.codec_think_eos]
    if cloned is not None:
        prompt.speaker_embedding, prompt.speaker_row = cloned.x_vector, len(prompt) + len(codec)
        codec.append(None)
    elif speaker is not None:
        codec.append(config.speakers[speaker])
    codec += [ids.codec_pad, ids.codec_bos]
    # Every codec row but the final bos, paired with tts_pad, except the last of them with tts_bos.
    for i, codec_id in enumerate(codec[:-1]):
        prompt.add(ids.tts_bos if i == len(codec) - 2 else ids.tts_pad, codec_id)

    if cloned is not None and cloned.in_context:
        _add_in_context_body(prompt, config, tokenizer.encode(ref_text(cloned.ref_text))[3:-2], text_tokens,
                             cloned.ref_codes, text_layout)
    elif text_layout == "prefill":
        for token in text_tokens:
            prompt.add(token, ids.codec_pad)
        prompt.add(ids.tts_eos, ids.codec_pad)
        prompt.add(ids.tts_pad, ids.codec_bos)
    else:
        prompt.add(text_tokens[0], ids.codec_bos)
        prompt.trailing_text_ids = list(text_tokens[1:]) + [ids.tts_eos]
    return prompt


def _add_in_context_body(prompt: Prompt, config: ModelConfig, ref_tokens: list[int], text_tokens: list[int],
                         ref_codes: np.ndarray, text_layout: str) -> None:
    """The in-context (ICL) text body: reference transcript and target text against codec_bos and the reference
    frames (module docstring)."""
    ids = config.ids
    text = list(ref_tokens) + list(text_tokens) + [ids.tts_eos]
    num_codec = len(ref_codes) + 1  # codec_bos, then one row per reference frame
    prompt.ref_codes = np.asarray(ref_codes, dtype=np.int64)
    if text_layout == "prefill":
        for token in text:
            prompt.add(token, ids.codec_pad)
        prompt.add(ids.tts_pad, ids.codec_bos)
        prompt.ref_row = len(prompt)
        for _ in range(len(ref_codes)):
            prompt.add(ids.tts_pad, None)
        return
    prompt.add(text[0], ids.codec_bos)
    prompt.ref_row = len(prompt)
    for j in range(1, num_codec):
        prompt.add(text[j] if j < len(text) else ids.tts_pad, None)
    prompt.trailing_text_ids = text[num_codec:]
