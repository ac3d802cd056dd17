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
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import ModelConfig
from .tokenizer import TextTokenizer

TEXT_LAYOUTS = ("prefill", "interleaved")


class PromptError(ValueError):
    """A request the model cannot express: unknown voice or language, empty text, unsupported option."""


@dataclass
class Prompt:
    """Prefill rows and the text track of the decode steps, as ids (None = no term on that track)."""

    text_ids: list[int | None] = field(default_factory=list)
    codec_ids: list[int | None] = field(default_factory=list)
    trailing_text_ids: list[int] = field(default_factory=list)
    num_text_tokens: int = 0

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


def resolve_voice(config: ModelConfig, voice: str | None) -> str | None:
    """The speaker name to use, lower case; None for models without named speakers."""
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
        raise PromptError("voice cloning (Base models) is not implemented yet")
    if config.model_type == "base":
        raise PromptError("Base models need a reference voice (voice cloning), which is not implemented yet")
    return None


def resolve_language(config: ModelConfig, language: str | None) -> str:
    name = (language or "auto").lower()
    if name not in config.languages:
        raise PromptError(f"unknown language {language!r}; this model has: {', '.join(config.languages)}")
    return name


def build_prompt(config: ModelConfig, tokenizer: TextTokenizer, text: str, *, voice: str | None = None,
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
        raise PromptError(f"this model ({config.model_type}, {config.model_size}) does not take instruct")

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

    language_id = None if lang == "auto" else config.language_ids[lang]
    if speaker is not None and lang in ("chinese", "auto") and speaker in config.speaker_dialects:
        language_id = config.language_ids[config.speaker_dialects[speaker]]
    if language_id is None:
        codec = [ids.codec_nothink, ids.codec_think_bos, ids.codec_think_eos]
    else:
        codec = [ids.codec_think, ids.codec_think_bos, language_id, ids.codec_think_eos]
    if speaker is not None:
        codec.append(config.speakers[speaker])
    codec += [ids.codec_pad, ids.codec_bos]
    # Every codec row but the final bos, paired with tts_pad, except the last of them with tts_bos.
    for i, codec_id in enumerate(codec[:-1]):
        prompt.add(ids.tts_bos if i == len(codec) - 2 else ids.tts_pad, codec_id)

    if text_layout == "prefill":
        for token in text_tokens:
            prompt.add(token, ids.codec_pad)
        prompt.add(ids.tts_eos, ids.codec_pad)
        prompt.add(ids.tts_pad, ids.codec_bos)
    else:
        prompt.add(text_tokens[0], ids.codec_bos)
        prompt.trailing_text_ids = list(text_tokens[1:]) + [ids.tts_eos]
    return prompt
