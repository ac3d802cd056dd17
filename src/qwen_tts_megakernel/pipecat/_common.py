"""Pieces shared by the HTTP and WebSocket Pipecat services: settings, languages, the wire sample rate."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from pipecat.audio.resamplers.soxr_stream_resampler import SOXRStreamAudioResampler
from pipecat.services.settings import TTSSettings
from pipecat.utils.types import NOT_GIVEN, NotGiven, is_given
from pipecat.transcriptions.language import Language

from ..languages import ALIASES
from ..server.output_format import SAMPLE_RATES

# The model speaks 24 kHz mono PCM16 (the 12 Hz codec's rate). The services ask the server for the pipeline's
# output rate (`sample_rate` in the request: the server resamples, streaming, server/output_format.py); a rate the
# server does not offer is fetched at 24 kHz and resampled here (Pipecat's stream resampler, soxr).
SERVER_SAMPLE_RATE = 24000


def wire_rate(pipeline_rate: int) -> int:
    """The rate to ask the server for: the pipeline's when the server offers it, else the model's."""
    return pipeline_rate if pipeline_rate in SAMPLE_RATES else SERVER_SAMPLE_RATE


def qwen_language(language: Language | str | None) -> str | None:
    """Language.EN_GB, "en", "en-US" ... -> "english" (languages.py, the mapping the server applies too); model
    names ("english", "auto") pass through; a code the model lacks is passed on and the server names its
    languages in its error. An unknown Pipecat ``Language`` is None (the model decides)."""
    if language is None:
        return None
    code = str(language.value if isinstance(language, Language) else language)
    base = code.replace("_", "-").split("-")[0].lower()
    mapped = ALIASES.get(base)
    if mapped is not None:
        return mapped
    return None if isinstance(language, Language) else code.lower()


@dataclass
class QwenTTSSettings(TTSSettings):
    """Runtime-updatable settings of the Qwen3-TTS services (send a ``TTSUpdateSettingsFrame`` to change them).

    Parameters:
        model: informational (the server serves one model); reported as the metrics' model name.
        voice: speaker name of a CustomVoice checkpoint ("ryan", "vivian", ...; GET /v1/audio/voices lists them).
        language: Pipecat ``Language`` or a model language name ("english", ...); None or "auto" lets the
            model decide.
        instructions: voice/style description (VoiceDesign checkpoints, 1.7B CustomVoice).
        seed: sampling seed; a fixed seed makes the audio reproducible. None: a fresh seed per request.
        max_new_tokens: frame limit per utterance (80 ms per frame). None: the server's default.
        temperature, top_k, top_p, repetition_penalty: the talker's sampling; None: the model's defaults
            (0.9, 50, 1.0, 1.05).
        speed: speaking rate 0.25-4.0, pitch kept (the server's time stretch). None: 1.0.
    """

    instructions: str | None | NotGiven = field(default_factory=lambda: NOT_GIVEN)
    seed: int | None | NotGiven = field(default_factory=lambda: NOT_GIVEN)
    max_new_tokens: int | None | NotGiven = field(default_factory=lambda: NOT_GIVEN)
    temperature: float | None | NotGiven = field(default_factory=lambda: NOT_GIVEN)
    top_k: int | None | NotGiven = field(default_factory=lambda: NOT_GIVEN)
    top_p: float | None | NotGiven = field(default_factory=lambda: NOT_GIVEN)
    repetition_penalty: float | None | NotGiven = field(default_factory=lambda: NOT_GIVEN)
    speed: float | None | NotGiven = field(default_factory=lambda: NOT_GIVEN)


# Settings sent as they are when set (the server validates them and names a bad one in its error).
REQUEST_FIELDS = ("instructions", "seed", "max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty",
                  "speed")


def default_settings(settings_cls, settings: TTSSettings | None, voice: str | None):
    """Store-mode settings with every field given, then the caller's delta applied (Pipecat's pattern)."""
    s = settings_cls(model=None, voice=voice, language=None, **{name: None for name in REQUEST_FIELDS})
    if settings is not None:
        s.apply_update(settings)
    return s


def given(value):
    """A settings value, or None when it is NOT_GIVEN."""
    return value if is_given(value) else None


def request_fields(settings: QwenTTSSettings) -> dict:
    """The set (non-None) instruction, seed, length and sampling settings, as the server's request fields."""
    values = {name: given(getattr(settings, name)) for name in REQUEST_FIELDS}
    return {name: value for name, value in values.items() if value is not None}


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def error_detail(status: int, body: str) -> str:
    """The server's error answer as one line: {"detail": ...} (FastAPI) or {"error": {"message": ...}} (OpenAI)."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    detail = body
    if isinstance(data, dict):
        if "detail" in data:
            detail = data["detail"]
        elif isinstance(data.get("error"), dict) and "message" in data["error"]:
            detail = data["error"]["message"]
        elif "error" in data:
            detail = data["error"]
    if not isinstance(detail, str):
        detail = json.dumps(detail)
    return f"Qwen TTS server error {status}: {detail.strip()[:500]}"


class ReportsErrorsOnce:
    """Mixin for the services: a context that a server error ended is reported by that error alone.

    Pipecat reports every audio context that ends without audio as an error of its own ("completed with no
    audio"); for a context whose server error was already pushed upstream that would be a second ErrorFrame for
    one failure. Contexts marked with `error_reported(context_id)` skip that report (and do not count towards
    Pipecat's consecutive-silent-contexts limit: their failure was reported as what it was)."""

    def error_reported(self, context_id: str | None) -> None:
        if context_id:
            self.__dict__.setdefault("_errors_reported", set()).add(context_id)

    async def _record_context_audio_outcome(self, context_id: str, received_audio: bool):
        reported = self.__dict__.get("_errors_reported", set())
        if context_id in reported:
            reported.discard(context_id)
            return
        await super()._record_context_audio_outcome(context_id, received_audio)


class PCMStream:
    """One utterance's PCM16 bytes as they arrive: whole samples only (a network chunk may split one), resampled
    from the server's rate to the pipeline's with a resampler of its own (soxr, never cleared mid-utterance), and
    its tail flushed at the end, so no audio is lost or mixed between utterances."""

    def __init__(self, in_rate: int, out_rate: int):
        self.in_rate, self.out_rate = in_rate, out_rate
        self._leftover = b""
        self._resampler = SOXRStreamAudioResampler(clear_after_secs=None) if in_rate != out_rate else None

    async def push(self, data: bytes) -> bytes:
        data = self._leftover + data
        aligned = len(data) & ~1
        data, self._leftover = data[:aligned], data[aligned:]
        if not data or self._resampler is None:
            return data
        return await self._resampler.resample(data, self.in_rate, self.out_rate)

    async def finish(self) -> bytes:
        """The rest: the resampler's tail (and a dangling odd byte, padded)."""
        tail = b""
        if self._leftover:
            tail = await self.push(b"\x00")
        if self._resampler is not None:
            tail += await self._resampler.flush()
        return tail
