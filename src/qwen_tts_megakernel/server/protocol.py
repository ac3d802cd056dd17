"""Request validation: every field is checked here, and every failure names the field.

Bodies are validated by hand (not by pydantic models) so that the messages say exactly which field is wrong and
why, in OpenAI's error shape: {"error": {"message", "type": "invalid_request_error", "param", "code"}}.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, field
from typing import Any

from ..engine import Request, Synthesizer

RESPONSE_FORMATS = ("pcm", "wav")
STREAM_FORMATS = ("audio", "sse")
# OpenAI's model names are accepted as aliases so that unmodified clients work; anything else is an error.
OPENAI_MODEL_ALIASES = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")


class BadRequest(ValueError):
    def __init__(self, param: str | None, message: str, status: int = 400):
        super().__init__(message)
        self.param = param
        self.message = message
        self.status = status

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": "invalid_request_error", "param": self.param,
                          "code": None}}


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


@dataclass
class ServerSettings:
    """Limits of one server. Environment overrides: QWEN_TTS_MK_MAX_ACTIVE, _MAX_QUEUE, _MAX_TEXT_CHARS,
    _MAX_NEW_TOKENS (the largest max_new_tokens a request may ask for), _MAX_BUFFERED_CHUNKS."""

    max_active: int = field(default_factory=lambda: _env_int("QWEN_TTS_MK_MAX_ACTIVE", 16))
    max_queue: int = field(default_factory=lambda: _env_int("QWEN_TTS_MK_MAX_QUEUE", 32))
    max_text_chars: int = field(default_factory=lambda: _env_int("QWEN_TTS_MK_MAX_TEXT_CHARS", 4096))
    max_new_tokens_limit: int = field(default_factory=lambda: _env_int("QWEN_TTS_MK_MAX_NEW_TOKENS", 4096))
    max_buffered_chunks: int = field(default_factory=lambda: _env_int("QWEN_TTS_MK_MAX_BUFFERED_CHUNKS", 64))
    retry_after_s: int = 1


@dataclass
class SpeechParams:
    """A validated request: what the engine needs."""

    text: str
    voice: str | None
    language: str
    instruct: str | None
    seed: int | None
    max_new_tokens: int | None
    sampling: dict = field(default_factory=dict)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


class Validator:
    def __init__(self, synth: Synthesizer, settings: ServerSettings, model_names: list[str]):
        self.synth = synth
        self.settings = settings
        self.model_names = model_names

    # Fields --------------------------------------------------------------------------------------------------------

    def text(self, body: dict, name: str, *, required: bool = True, allow_empty: bool = False) -> str:
        value = body.get(name)
        if value is None:
            if required:
                raise BadRequest(name, f"'{name}' is required: the text to speak")
            return ""
        if not isinstance(value, str):
            raise BadRequest(name, f"'{name}' must be a string, got {type(value).__name__}")
        if not allow_empty and not value.strip():
            raise BadRequest(name, f"'{name}' is empty or only whitespace")
        if len(value) > self.settings.max_text_chars:
            raise BadRequest(name, f"'{name}' is {len(value)} characters; the limit is "
                                   f"{self.settings.max_text_chars}")
        return value

    def voice(self, body: dict, name: str) -> str | None:
        value = body.get(name)
        if isinstance(value, dict) and name == "voice":  # OpenAI's custom voice object {"id": ...}
            value = value.get("id")
        if value is None or value == "":
            if self.synth.config.model_type == "base":
                raise BadRequest(name, f"this Base model needs '{name}': the name of a stored cloned voice "
                                       "(POST /v1/audio/voices)")
            return None
        if not isinstance(value, str):
            raise BadRequest(name, f"'{name}' must be a string, got {type(value).__name__}")
        if self.synth.config.model_type == "base":  # stored cloned voices, by the name resolution all entry points use
            from ..prompt import PromptError
            from ..voices import resolve_voice

            try:
                resolve_voice(self.synth, value)
            except PromptError as exc:
                raise BadRequest(name, str(exc)) from exc
            return value.lower()
        voices = self.synth.voices
        if not voices:
            raise BadRequest(name, f"'{name}' {value!r} given, but this {self.synth.config.model_type} model has "
                                   "no named voices; describe the voice with 'instructions'")
        if value.lower() not in voices:
            raise BadRequest(name, f"unknown {name} {value!r}; this model has: {', '.join(sorted(voices))}")
        return value.lower()

    def language(self, body: dict, name: str = "language") -> str:
        value = body.get(name)
        if value is None or value == "":
            return "auto"
        if not isinstance(value, str):
            raise BadRequest(name, f"'{name}' must be a string, got {type(value).__name__}")
        if value.lower() not in self.synth.languages:
            raise BadRequest(name, f"unknown language {value!r}; this model has: {', '.join(self.synth.languages)}")
        return value.lower()

    def instructions(self, body: dict, name: str = "instructions") -> str | None:
        value = body.get(name)
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise BadRequest(name, f"'{name}' must be a string, got {type(value).__name__}")
        if len(value) > self.settings.max_text_chars:
            raise BadRequest(name, f"'{name}' is {len(value)} characters; the limit is "
                                   f"{self.settings.max_text_chars}")
        cfg = self.synth.config
        if not cfg.supports_instruct:
            raise BadRequest(name, f"this model ({cfg.model_type}, {cfg.model_size}) does not take '{name}'")
        return value

    def max_new_tokens(self, body: dict, name: str = "max_new_tokens") -> int | None:
        value = body.get(name)
        if value is None:
            return None
        limit = self.settings.max_new_tokens_limit
        if not _is_int(value):
            raise BadRequest(name, f"'{name}' must be an integer number of 80 ms frames, got {value!r}")
        if value < 1 or value > limit:
            raise BadRequest(name, f"'{name}' must be between 1 and {limit} (80 ms frames), got {value}")
        return value

    def seed(self, body: dict, name: str = "seed") -> int | None:
        value = body.get(name)
        if value is None:
            return None
        if not _is_int(value) or value < 0 or value >= 2 ** 63:
            raise BadRequest(name, f"'{name}' must be an integer in [0, 2^63), got {value!r}")
        return value

    def sampling(self, body: dict) -> dict:
        out = {}
        checks = {
            "temperature": (lambda v: _is_number(v) and 0 < v <= 10, "a number in (0, 10]"),
            "top_k": (lambda v: _is_int(v) and 0 <= v <= 100000, "an integer >= 0 (0 = off)"),
            "top_p": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
            "repetition_penalty": (lambda v: _is_number(v) and 0 < v <= 10, "a number in (0, 10]"),
        }
        for name, (ok, what) in checks.items():
            value = body.get(name)
            if value is None:
                continue
            if not ok(value):
                raise BadRequest(name, f"'{name}' must be {what}, got {value!r}")
            out[name] = value
        return out

    def choice(self, body: dict, name: str, choices: tuple[str, ...], default: str) -> str:
        value = body.get(name)
        if value is None:
            return default
        if not isinstance(value, str) or value not in choices:
            raise BadRequest(name, f"unsupported {name} {value!r}; supported: {', '.join(choices)}")
        return value

    def model(self, body: dict, name: str = "model") -> None:
        value = body.get(name)
        if value is None:
            return
        if not isinstance(value, str):
            raise BadRequest(name, f"'{name}' must be a string, got {type(value).__name__}")
        if value not in self.model_names and value not in OPENAI_MODEL_ALIASES:
            raise BadRequest(name, f"unknown model {value!r}; this server has {self.model_names[0]!r} (also "
                                   f"accepted: {', '.join(self.model_names[1:] + list(OPENAI_MODEL_ALIASES))})",
                             status=404)

    def speed(self, body: dict, name: str = "speed") -> None:
        value = body.get(name)
        if value is None:
            return
        if not _is_number(value):
            raise BadRequest(name, f"'{name}' must be a number, got {value!r}")
        if value != 1.0:
            raise BadRequest(name, f"'{name}' {value} is not supported: only 1.0")

    # Bodies --------------------------------------------------------------------------------------------------------

    @staticmethod
    def require_object(body: Any) -> dict:
        if not isinstance(body, dict):
            raise BadRequest(None, f"the request body must be a JSON object, got {type(body).__name__}")
        return body

    def tts_stream(self, body: Any) -> SpeechParams:
        body = self.require_object(body)
        text = self.text(body, "text")
        voice = self.voice(body, "speaker") if "speaker" in body else self.voice(body, "voice")
        return SpeechParams(text=text, voice=voice, language=self.language(body),
                            instruct=self.instructions(body, "instructions") if "instructions" in body
                            else self.instructions(body, "instruct"),
                            seed=self.seed(body), max_new_tokens=self.max_new_tokens(body),
                            sampling=self.sampling(body))

    def openai_speech(self, body: Any) -> tuple[SpeechParams, str, str]:
        body = self.require_object(body)
        self.model(body)
        text = self.text(body, "input")
        if "voice" not in body:
            raise BadRequest("voice", f"'voice' is required; this model has: {', '.join(sorted(self.synth.voices))}"
                             if self.synth.voices else "'voice' is required (use \"\" for models without voices)")
        voice = self.voice(body, "voice")
        response_format = self.choice(body, "response_format", RESPONSE_FORMATS, "wav")
        stream_format = self.choice(body, "stream_format", STREAM_FORMATS, "audio")
        self.speed(body)
        params = SpeechParams(text=text, voice=voice, language=self.language(body),
                              instruct=self.instructions(body), seed=self.seed(body),
                              max_new_tokens=self.max_new_tokens(body), sampling=self.sampling(body))
        return params, response_format, stream_format

    def ws_config(self, msg: dict) -> SpeechParams:
        """A WebSocket context's settings (text arrives later)."""
        return SpeechParams(text="", voice=self.voice(msg, "voice"), language=self.language(msg),
                            instruct=self.instructions(msg), seed=self.seed(msg),
                            max_new_tokens=self.max_new_tokens(msg), sampling=self.sampling(msg))

    def prepare(self, params: SpeechParams, text_field: str) -> Request:
        """The engine request for a whole-text job, built here so that prompt problems are a 400, not a failed
        stream; the worker generates from it without building the prompt again."""
        from ..prompt import PromptError

        try:
            return self.synth.prepare(params.text, voice=params.voice, language=params.language,
                                      instruct=params.instruct, max_new_tokens=params.max_new_tokens,
                                      **params.sampling)
        except PromptError as exc:
            raise BadRequest(text_field, str(exc)) from exc


def wav_header(sample_rate: int, num_samples: int | None = None) -> bytes:
    """A 44-byte PCM16 mono WAV header. Streamed WAV (length unknown) uses 0xFFFFFFFF sizes, as OpenAI does."""
    if num_samples is None:
        data_size = riff_size = 0xFFFFFFFF
    else:
        data_size = 2 * num_samples
        riff_size = 36 + data_size
    return (b"RIFF" + struct.pack("<I", riff_size) + b"WAVEfmt " +
            struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, 2 * sample_rate, 2, 16) +
            b"data" + struct.pack("<I", data_size))
