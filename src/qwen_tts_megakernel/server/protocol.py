"""Request validation and the server's limits: every field is checked here, before the response starts, and every
failure names the field.

Bodies are validated by hand (not by pydantic models) so that the messages say exactly which field is wrong and
why, in OpenAI's error shape: {"error": {"message", "type": "invalid_request_error", "param", "code"}}. Messages
quote at most a short prefix of the offending value (`shown`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass, field, fields, replace
from typing import Any

from ..engine import Request, Synthesizer
from ..languages import model_language, unknown_language_message
from ..live import _BOUNDARY as WORD_BOUNDARY  # the commit rule of streamed text: tokens are counted the same way
from ..prompt import PromptError
from ..sampling import SAMPLING_RANGES, SamplingError, check_sampling_option
from ..time_stretch import SPEED_MAX, SPEED_MIN, check_speed
from .audio_formats import RESPONSE_FORMATS, wav_header  # noqa: F401 - wav_header: re-exported
from ..voices import quoted as shown  # noqa: F401 - re-exported: the server's messages cut echoed values with it
from .output_format import ENCODINGS, SAMPLE_RATES, OutputFormat
from .voice_aliases import parse_aliases, voice_aliases

STREAM_FORMATS = ("audio", "sse")
# OpenAI's model names are accepted as aliases so that unmodified clients work; anything else is an error.
OPENAI_MODEL_ALIASES = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
# The sampling options a request may set (their bounds: sampling.SAMPLING_RANGES).
REQUEST_SAMPLING_OPTIONS = ("temperature", "top_k", "top_p", "repetition_penalty")


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
    """Limits and timeouts of one server (docs/server.md lists each with the error it gives). `serve` sets them
    from its options (`add_arguments`); environment overrides: QWEN_TTS_MK_MAX_ACTIVE, _MAX_QUEUE,
    _MAX_TEXT_CHARS, _MAX_NEW_TOKENS, _MAX_BUFFERED_CHUNKS, _VOICE_ALIASES (OpenAI voice name -> speaker overrides,
    "alloy=serena,echo=aiden"; voice_aliases.py)."""

    # Streams
    max_active: int = field(default_factory=lambda: _env_int("QWEN_TTS_MK_MAX_ACTIVE", 16))
    max_queue: int = field(default_factory=lambda: _env_int("QWEN_TTS_MK_MAX_QUEUE", 32))
    max_buffered_chunks: int = field(default_factory=lambda: _env_int("QWEN_TTS_MK_MAX_BUFFERED_CHUNKS", 64))
    queue_timeout_s: float = 30.0  # waiting for a stream slot: HTTP 503 (before the 200), WS error event
    consumer_stall_s: float = 10.0  # a consumer that takes no chunk this long: stream cancelled (the engine's)
    retry_after_s: int = 1
    # Text and frames
    max_text_chars: int = field(default_factory=lambda: _env_int("QWEN_TTS_MK_MAX_TEXT_CHARS", 4096))
    max_text_tokens: int = 1024
    max_new_tokens_limit: int = field(default_factory=lambda: _env_int("QWEN_TTS_MK_MAX_NEW_TOKENS", 4096))
    # Request headers, bodies and messages
    header_timeout_s: float = 10.0  # a connection whose request headers take longer is closed
    max_header_bytes: int = 32 * 1024  # the request line and headers: 431
    max_body_bytes: int = 256 * 1024  # 413, counted as the body arrives (voice uploads: the clip's cap + 64 KiB)
    body_timeout_s: float = 10.0  # the whole body must arrive in this time, on every route: 408
    upload_timeout_s: float = 60.0  # the same for a voice upload (POST /v1/audio/voices): 408
    max_json_depth: int = 16  # 400
    max_json_number_chars: int = 32  # the longest number literal: 400
    max_ws_message_bytes: int = 256 * 1024  # larger WS messages close the socket (1009)
    # WebSocket contexts
    max_ws_contexts: int = 8  # open contexts per socket
    max_client_streams: int = 8  # contexts of one client (all its sockets) holding or waiting for a stream slot
    ws_idle_flush_s: float = 20.0  # an unflushed context without a new complete word this long is flushed
    ws_idle_close_s: float = 60.0  # a socket without an open context this long is closed (1000)
    shutdown_grace_s: float = 10.0  # on SIGTERM, contexts may finish this long; then error + audio_done
    # Connections (uvicorn)
    keep_alive_s: int = 5  # an idle keep-alive connection is closed after this
    max_connections: int = 1000  # concurrent connections; beyond: 503
    # Browsers and exposure
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS  # Host header names accepted ("*": any)
    allowed_origins: tuple[str, ...] = ()  # browser origins accepted besides loopback ones ("*": any)
    cors_origins: tuple[str, ...] = ()  # origins that get CORS headers (none: no CORS)
    # OpenAI clients
    voice_aliases: str = field(default_factory=lambda: os.environ.get("QWEN_TTS_MK_VOICE_ALIASES", ""))
    # The demo page at / (web_page.py; `serve --no-web-page` turns it off)
    web_page: bool = True

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not value > 0:
                if f.name == "max_queue" and value == 0:
                    continue
                raise ValueError(f"server setting {f.name} must be positive, got {value!r}")
        for name in ("allowed_hosts", "allowed_origins", "cors_origins"):
            setattr(self, name, tuple(str(v).strip().lower() for v in getattr(self, name) if str(v).strip()))

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """`serve` options for every setting (--max-active, --ws-idle-flush-s, --allowed-hosts a,b, ...)."""
        group = parser.add_argument_group("limits and timeouts (docs/server.md)")
        defaults = ServerSettings()
        for f in fields(ServerSettings):
            option = "--" + f.name.replace("_", "-")
            default = getattr(defaults, f.name)
            if isinstance(default, bool):
                group.add_argument(option, default=None, action=argparse.BooleanOptionalAction,
                                   help=f"default: {'on' if default else 'off'}")
            elif f.name.endswith(("hosts", "origins")):
                group.add_argument(option, default=None, metavar="A,B", type=lambda v: tuple(v.split(",")),
                                   help=f"default: {','.join(default) or 'none'}")
            else:
                group.add_argument(option, default=None, type=type(default), metavar="N", help=f"default: {default}")

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides) -> "ServerSettings":
        given = {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}
        return cls(**{**overrides, **given})


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
    output: OutputFormat = OutputFormat()  # speed, sample rate, encoding (output_format.py)
    ignored: tuple[str, ...] = ()  # fields accepted and ignored (OpenAI route: instructions on models without them)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_unicode(value: str, name: str) -> str:
    """`value` if it is valid Unicode (no lone UTF-16 surrogate, which JSON's \\ud800 escapes can carry)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadRequest(name, f"'{name}' is not valid Unicode: a lone UTF-16 surrogate (half a character) at "
                               f"character {exc.start}") from None
    return value


# ---------------------------------------------------------------------------------------------------------------
# JSON with limits


def parse_json(raw: bytes | str, settings: ServerSettings) -> Any:
    """json.loads with the server's limits: nesting depth, number length, no NaN/Infinity (400 naming the limit)."""
    limit = settings.max_json_number_chars

    def number(kind):
        def parse(text: str):
            if len(text) > limit:
                raise BadRequest(None, f"a JSON number has {len(text)} characters; the limit is {limit}")
            value = kind(text)
            if not math.isfinite(value):
                raise BadRequest(None, f"the JSON number {shown(text)} is out of range")
            return value
        return parse

    def constant(name: str):
        raise BadRequest(None, f"{name} is not a JSON number")

    try:
        value = json.loads(raw, parse_int=number(int), parse_float=number(float), parse_constant=constant)
    except RecursionError:
        raise BadRequest(None, f"the JSON nests deeper than {settings.max_json_depth} levels") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(None, f"the body is not valid JSON: {shown(str(exc), 120)}") from None
    if _json_depth(value) > settings.max_json_depth:
        raise BadRequest(None, f"the JSON nests deeper than {settings.max_json_depth} levels")
    return value


def _json_depth(value: Any) -> int:
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            todo.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


# ---------------------------------------------------------------------------------------------------------------
# Streamed text (WebSocket contexts)


class StreamedText:
    """The text of one WebSocket context as its deltas arrive, checked before it reaches the engine.

    * Half a character: JavaScript's JSON.stringify writes a lone UTF-16 surrogate when a string is cut inside an
      emoji (an LLM token boundary). A delta that ends in a high surrogate keeps it back and joins it with the
      next delta's low surrogate. A surrogate that cannot be paired (a low one without a high one before it, a
      high one followed by anything else, a high one still held at flush) is an error for that context: the delta
      (or the held half) is dropped, the context goes on.
    * Limits: characters, and tokens counted with the same commit rule as the engine (live.py), so that text
      over either limit is refused delta by delta, never after speech started.
    """

    def __init__(self, tokenizer, max_chars: int, max_tokens: int):
        self.tokenizer = tokenizer
        self.max_chars, self.max_tokens = max_chars, max_tokens
        self.chars = 0
        self.committed_tokens = 0  # tokens of the text up to the last word boundary
        self.tail = ""  # the text after it (the word being written)
        self.tail_tokens = 0  # its tokens (an upper bound while the word grows)
        self.held = ""  # a high surrogate waiting for its low half

    def add(self, delta: str) -> str:
        """The text to pass on (surrogate pairs joined), or BadRequest("text") when the delta is refused."""
        text, held = self.held + delta, ""
        self.held = ""
        if text and "\ud800" <= text[-1] <= "\udbff":
            text, held = text[:-1], text[-1]
        try:
            text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le")
        except UnicodeDecodeError:
            raise BadRequest("text", "the text delta has half a character (a lone UTF-16 surrogate that the "
                                     "next delta does not complete); the delta was dropped") from None
        if self.chars + len(text) + len(held) > self.max_chars:
            raise BadRequest("text", f"the context's text would exceed {self.max_chars} characters; the delta "
                                     "was dropped")
        encode = self.tokenizer.encode_user
        tail = self.tail + text
        last = None
        for last in WORD_BOUNDARY.finditer(tail):
            pass
        if last is not None and last.start() > 0:  # a word was completed: count it, start a new tail
            committed = self.committed_tokens + len(encode(tail[:last.start()]))
            rest = tail[last.start():]
            rest_tokens = len(encode(rest))
        else:  # the word goes on: the pieces' counts summed (in practice at least the whole's), exact near the limit
            committed, rest = self.committed_tokens, tail
            rest_tokens = self.tail_tokens + len(encode(text))
            if committed + rest_tokens > self.max_tokens:
                rest_tokens = len(encode(rest))
        if committed + rest_tokens > self.max_tokens:
            raise BadRequest("text", f"the context's text would exceed {self.max_tokens} tokens; the delta was "
                                     "dropped")
        self.chars += len(text)
        self.committed_tokens, self.tail, self.tail_tokens, self.held = committed, rest, rest_tokens, held
        return text

    def finish(self) -> None:
        """At flush: BadRequest("text") if half a character is still held back (it is dropped)."""
        if self.held:
            self.held = ""
            raise BadRequest("text", "the text ended in half a character (a lone UTF-16 high surrogate); it was "
                                     "dropped")


# ---------------------------------------------------------------------------------------------------------------
# Request validation


class Validator:
    def __init__(self, synth: Synthesizer, settings: ServerSettings, model_names: list[str]):
        self.synth = synth
        self.settings = settings
        self.model_names = model_names
        self.kv_positions = synth.backend.max_seq_len  # prompt rows + frames of one stream
        # Frames a request gets when it does not say: the checkpoint's default within the server's cap.
        self.default_max_new_tokens = min(synth.config.generation.max_new_tokens, settings.max_new_tokens_limit)
        # OpenAI voice names -> speakers (voice_aliases.py); a bad override is a ValueError at start-up.
        stored = None
        if synth.config.model_type == "base":  # aliases may point at the voices stored now
            from ..voices import voice_names

            stored = voice_names(synth)
        self.voice_aliases = voice_aliases(synth.voices, parse_aliases(settings.voice_aliases), stored=stored)

    # Fields --------------------------------------------------------------------------------------------------------

    def text(self, body: dict, name: str, *, required: bool = True, allow_empty: bool = False) -> str:
        value = body.get(name)
        if value is None:
            if required:
                raise BadRequest(name, f"'{name}' is required: the text to speak")
            return ""
        if not isinstance(value, str):
            raise BadRequest(name, f"'{name}' must be a string, got {type(value).__name__}")
        if len(value) > self.settings.max_text_chars:
            raise BadRequest(name, f"'{name}' is {len(value)} characters; the limit is "
                                   f"{self.settings.max_text_chars}")
        check_unicode(value, name)
        if not allow_empty and not value.strip():
            raise BadRequest(name, f"'{name}' is empty or only whitespace")
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

            value = self.voice_aliases.get(value.lower(), value)
            try:
                resolve_voice(self.synth, value)
            except PromptError as exc:
                raise BadRequest(name, str(exc)) from exc
            return value.lower()
        voices = self.synth.voices
        value = self.voice_aliases.get(value.lower(), value)
        if not voices:
            raise BadRequest(name, f"'{name}' {shown(value)} given, but this {self.synth.config.model_type} model "
                                   "has no named voices; describe the voice with 'instructions'")
        if value.lower() not in voices:
            raise BadRequest(name, f"unknown {name} {shown(value)}; this model has: {', '.join(sorted(voices))} "
                                   f"(and OpenAI's names: {', '.join(self.voice_aliases)})")
        return value.lower()

    def language(self, body: dict, name: str = "language") -> str:
        value = body.get(name)
        if value is None or value == "":
            return "auto"
        if not isinstance(value, str):
            raise BadRequest(name, f"'{name}' must be a string, got {type(value).__name__}")
        language = model_language(value, self.synth.languages)
        if language is None:
            raise BadRequest(name, unknown_language_message(value, self.synth.languages))
        return language

    def instructions(self, body: dict, name: str = "instructions", lenient: bool = False) -> str | None:
        """The instructions; on a model without instruction control a 400, or with `lenient` (the OpenAI route)
        None (the caller reports the field as ignored)."""
        value = body.get(name)
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise BadRequest(name, f"'{name}' must be a string, got {type(value).__name__}")
        if len(value) > self.settings.max_text_chars:
            raise BadRequest(name, f"'{name}' is {len(value)} characters; the limit is "
                                   f"{self.settings.max_text_chars}")
        check_unicode(value, name)
        cfg = self.synth.config
        if not cfg.supports_instruct:
            if lenient:
                return None
            raise BadRequest(name, f"this model ({cfg.model_type}, {cfg.size_label}) does not take '{name}'")
        return value

    def max_new_tokens(self, body: dict, name: str = "max_new_tokens") -> int | None:
        value = body.get(name)
        if value is None:
            return None
        limit = self.settings.max_new_tokens_limit
        if not _is_int(value):
            raise BadRequest(name, f"'{name}' must be an integer number of 80 ms frames, got {shown(value)}")
        if value < 1 or value > limit:
            raise BadRequest(name, f"'{name}' must be between 1 and {limit} (80 ms frames), got {value}")
        return value

    def seed(self, body: dict, name: str = "seed") -> int | None:
        value = body.get(name)
        if value is None:
            return None
        if not _is_int(value) or value < 0 or value >= 2 ** 63:
            raise BadRequest(name, f"'{name}' must be an integer in [0, 2^63), got {shown(value)}")
        return value

    def sampling(self, body: dict) -> dict:
        out = {}
        for name in REQUEST_SAMPLING_OPTIONS:
            value = body.get(name)
            if value is None:
                continue
            try:
                out[name] = check_sampling_option(name, value)
            except SamplingError as exc:
                raise BadRequest(name, f"'{name}' must be {SAMPLING_RANGES[name].describe()}, got "
                                       f"{shown(value)}") from exc
        return out

    def choice(self, body: dict, name: str, choices: tuple[str, ...], default: str) -> str:
        value = body.get(name)
        if value is None:
            return default
        if not isinstance(value, str) or value not in choices:
            raise BadRequest(name, f"unsupported {name} {shown(value)}; supported: {', '.join(choices)}")
        return value

    def model(self, body: dict, name: str = "model") -> None:
        value = body.get(name)
        if value is None:
            return
        if not isinstance(value, str):
            raise BadRequest(name, f"'{name}' must be a string, got {type(value).__name__}")
        if value not in self.model_names and value not in OPENAI_MODEL_ALIASES:
            raise BadRequest(name, f"unknown model {shown(value)}; this server has {self.model_names[0]!r} (also "
                                   f"accepted: {', '.join(self.model_names[1:] + list(OPENAI_MODEL_ALIASES))})",
                             status=404)

    def speed(self, body: dict, name: str = "speed") -> float:
        value = body.get(name)
        if value is None:
            return 1.0
        try:
            return check_speed(value)
        except ValueError:
            raise BadRequest(name, f"'{name}' must be a number between {SPEED_MIN} and {SPEED_MAX}, got "
                                   f"{shown(value)}") from None

    @staticmethod
    def streamed(body: dict, stream_format: str) -> bool:
        """`stream` (default true): false sends the whole file at the end, its true length in its header."""
        value = body.get("stream", True)
        if not isinstance(value, bool):
            raise BadRequest("stream", f"'stream' must be true or false, got {shown(value)}")
        if not value and stream_format == "sse":
            raise BadRequest("stream", "'stream': false cannot be combined with 'stream_format': 'sse'")
        return value

    def output_format(self, body: dict) -> OutputFormat:
        """speed, sample_rate and encoding of a stream (/tts/stream, WebSocket config)."""
        rate = body.get("sample_rate")
        if rate is not None and (not _is_int(rate) or rate not in SAMPLE_RATES):
            raise BadRequest("sample_rate", f"unsupported sample_rate {shown(rate)}; supported: "
                                            f"{', '.join(map(str, SAMPLE_RATES))}")
        encoding = self.choice(body, "encoding", ENCODINGS, "pcm_s16le")
        return OutputFormat(speed=self.speed(body), sample_rate=rate, encoding=encoding)

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
                            sampling=self.sampling(body), output=self.output_format(body))

    def openai_speech(self, body: Any) -> tuple[SpeechParams, str, str]:
        body = self.require_object(body)
        self.model(body)
        text = self.text(body, "input")
        if "voice" not in body:
            raise BadRequest("voice", f"'voice' is required; this model has: {', '.join(sorted(self.synth.voices))}"
                             if self.synth.voices else "'voice' is required (use \"\" for models without voices)")
        voice = self.voice(body, "voice")
        response_format = self.choice(body, "response_format", RESPONSE_FORMATS, "mp3")
        stream_format = self.choice(body, "stream_format", STREAM_FORMATS, "audio")
        instruct = self.instructions(body, lenient=True)
        ignored = ("instructions",) if instruct is None and body.get("instructions") else ()
        params = SpeechParams(text=text, voice=voice, language=self.language(body), instruct=instruct,
                              seed=self.seed(body), max_new_tokens=self.max_new_tokens(body),
                              sampling=self.sampling(body), output=OutputFormat(speed=self.speed(body)),
                              ignored=ignored)
        return params, response_format, stream_format

    def ws_config(self, msg: dict) -> SpeechParams:
        """A WebSocket context's settings (text arrives later), with its frame limit resolved: the prompt rows of
        the interleaved layout plus the frames must fit the backend's KV capacity."""
        params = SpeechParams(text="", voice=self.voice(msg, "voice"), language=self.language(msg),
                              instruct=self.instructions(msg), seed=self.seed(msg),
                              max_new_tokens=self.max_new_tokens(msg), sampling=self.sampling(msg),
                              output=self.output_format(msg))
        try:
            rows = len(self.synth.prompt("a", voice=params.voice, language=params.language,
                                         instruct=params.instruct, text_layout="interleaved"))
        except PromptError as exc:
            raise BadRequest(None, str(exc)) from exc
        frames = params.max_new_tokens or self.default_max_new_tokens
        params.max_new_tokens = self._frames_within_capacity(params.max_new_tokens, rows, frames, "instructions")
        return params

    def _frames_within_capacity(self, asked: int | None, rows: int, frames: int, rows_field: str) -> int:
        """The frame limit for a stream whose prompt has `rows` rows and which would generate `frames` frames
        (its limit): the caller's when it fits the KV capacity (else a 400 naming max_new_tokens), the default cut
        to what fits (a 400 naming `rows_field` when nothing does)."""
        room = self.kv_positions - rows - 1
        if room < 1:
            raise BadRequest(rows_field, f"the prompt takes {rows} of the backend's {self.kv_positions} positions: "
                                         "nothing is left to speak with; shorten it")
        if asked is not None:
            if frames > room:
                raise BadRequest("max_new_tokens", f"'max_new_tokens' {asked} does not fit: the prompt takes {rows} "
                                                   f"of the backend's {self.kv_positions} positions, so at most "
                                                   f"{room} frames remain")
            return asked
        return min(self.default_max_new_tokens, room)

    def prepare(self, params: SpeechParams, text_field: str) -> Request:
        """The engine request for a whole-text job, built here so that every problem (prompt, token limit, KV
        capacity) is a 400 before the response starts; the worker generates from it without building the prompt
        again."""
        try:
            request = self.synth.prepare(params.text, voice=params.voice, language=params.language,
                                         instruct=params.instruct,
                                         max_new_tokens=params.max_new_tokens or self.default_max_new_tokens,
                                         **params.sampling)
        except (PromptError, SamplingError) as exc:
            raise BadRequest(text_field, str(exc)) from exc
        tokens = request.prompt.num_text_tokens
        if tokens > self.settings.max_text_tokens:
            raise BadRequest(text_field, f"'{text_field}' is {tokens} tokens; the limit is "
                                         f"{self.settings.max_text_tokens}")
        rows = len(request.prompt)
        frames = self._frames_within_capacity(params.max_new_tokens, rows, request.limit, text_field)
        if params.max_new_tokens is None and frames < request.limit:
            request = replace(request, limit=frames, limit_reason="max_new_tokens")
        return request

