"""The voices API: list built-in speakers and stored cloned voices, upload a reference clip to clone a voice
(Base models), delete a stored voice.

    GET    /v1/audio/voices               built-in speakers, stored voices (with their metadata), languages
    POST   /v1/audio/voices               multipart: audio (file), name, transcript (optional: in-context cloning),
                                          consent ("true": the speaker agreed to be cloned; required)
    DELETE /v1/audio/voices/{name}

The speaker embedding and the reference codes are computed once, here; a stored voice is then used by name in
every endpoint. Bad uploads get a 4xx whose "param" names the field: 400 (bad name, missing consent, too short or
long, silent, unsupported sample rate, too many channels, a prompt that leaves the backend no positions), 409 (name
taken), 413 (too large), 415 (not audio), 500 (out of memory), 507 (the voice store's disk is full).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..engine import Synthesizer
from ..prompt import PromptError
from .errors import resource_refusal
from ..voices import ReferenceLimits, VoiceEncoder, VoiceError, check_voice_name, library_for, read_reference_audio

TRUE_VALUES = ("true", "1", "yes", "on")
VOICES_PATH = "/v1/audio/voices"
MULTIPART_OVERHEAD_BYTES = 64 * 1024  # the form's other fields and boundaries, on top of the clip's cap


def body_caps(limits: ReferenceLimits = ReferenceLimits()) -> dict[str, int]:
    """The request-body cap of the upload route (server/limits.py counts bodies as they arrive)."""
    return {VOICES_PATH: limits.max_bytes + MULTIPART_OVERHEAD_BYTES}


def body_deadlines(settings) -> dict[str, float]:
    """The upload route's body deadline: upload_timeout_s, not body_timeout_s (a clip is megabytes)."""
    return {VOICES_PATH: settings.upload_timeout_s}


def voices_router(synth: Synthesizer, *, model_name: str, authorized: Callable[..., bool],
                  unauthorized: Callable[[], JSONResponse], error: Callable[..., JSONResponse],
                  voice_aliases: dict[str, str] | None = None, limits: ReferenceLimits = ReferenceLimits()) -> APIRouter:
    """The router; `authorized(headers)`, `unauthorized()` and `error(status, message, param)` are the app's;
    `voice_aliases` (OpenAI voice name -> speaker) is listed with the voices."""
    router = APIRouter()
    cfg = synth.config
    can_clone = cfg.model_type == "base"
    cloner = cloner_for(synth, limits)

    def stored() -> list[dict]:
        """Stored voices this model can use (made with its speaker encoder)."""
        if not can_clone:
            return []
        library = library_for(synth)
        return [m for m in library.list() if m.get("speaker_encoder") == library.fingerprint]

    @router.get(VOICES_PATH)
    async def list_voices(request: Request):
        if not authorized(request.headers):
            return unauthorized()
        stored_voices = stored()
        return {"model": model_name, "model_type": cfg.model_type, "model_size": cfg.model_size,
                "voices": sorted(cfg.speakers) + [v["name"] for v in stored_voices],
                "builtin_voices": sorted(cfg.speakers), "stored_voices": stored_voices,
                "voice_aliases": dict(voice_aliases or {}),
                "supports_cloning": can_clone, "languages": synth.languages,
                "supports_instructions": bool(cfg.supports_instruct), "sample_rate": synth.sample_rate}

    @router.post(VOICES_PATH)
    async def add_voice(request: Request):
        if not authorized(request.headers):
            return unauthorized()
        if not can_clone:
            return error(400, f"this model ({cfg.model_type}) cannot clone voices: serve a Base model", "audio")
        declared = int(request.headers.get("content-length") or 0)
        if declared > limits.max_bytes + MULTIPART_OVERHEAD_BYTES:
            return error(413, f"the upload is {declared} bytes; the limit is {limits.max_bytes}", "audio")
        try:
            form = await request.form(max_files=1, max_fields=8)
        except Exception as exc:  # not multipart, or malformed
            return error(400, f"send multipart/form-data with fields audio, name, consent and optional transcript "
                              f"({type(exc).__name__})", None)
        try:
            name = check_voice_name(form.get("name"))
            consent = form.get("consent")
            if not isinstance(consent, str) or consent.strip().lower() not in TRUE_VALUES:
                raise VoiceError("consent", "'consent' must be true: confirm that the speaker agreed to have their "
                                            "voice cloned")
            transcript = form.get("transcript")
            if transcript is not None and not isinstance(transcript, str):
                raise VoiceError("transcript", "'transcript' must be text")
            if transcript is not None and len(transcript) > limits.max_transcript_chars:
                raise VoiceError("transcript", f"'transcript' is {len(transcript)} characters; the limit is "
                                               f"{limits.max_transcript_chars}")
            upload = form.get("audio")
            if upload is None or isinstance(upload, str):
                raise VoiceError("audio", "'audio' must be an uploaded file (wav, flac, ogg/opus or mp3)")
            if name in library_for(synth):
                raise VoiceError("name", f"a voice named {name!r} already exists", 409)
            data = await upload.read(limits.max_bytes + 1)
            meta = await cloner.add(name, data, transcript)
        except VoiceError as exc:
            return error(exc.status, str(exc), exc.field)
        except PromptError as exc:
            return error(400, str(exc), "transcript")
        except (MemoryError, OSError) as exc:
            refusal = resource_refusal(exc)
            if refusal is None:
                raise
            return error(*refusal, "audio", kind="resources")
        finally:
            await form.close()
        return JSONResponse(meta, status_code=201)

    @router.delete("/v1/audio/voices/{name}")
    async def delete_voice(name: str, request: Request):
        if not authorized(request.headers):
            return unauthorized()
        try:
            if not can_clone:
                raise VoiceError("name", f"no stored voice named {name!r}: this model has no stored voices", 404)
            library_for(synth).remove(name)
        except VoiceError as exc:
            return error(exc.status, str(exc), exc.field)
        return {"name": name.lower(), "deleted": True}

    return router


class VoiceCloner:
    """Clones voices into one synthesizer's library, one at a time (every upload, HTTP or WebSocket, shares one
    VoiceEncoder, made on the first)."""

    def __init__(self, synth: Synthesizer, limits: ReferenceLimits):
        self.synth, self.limits = synth, limits
        self.encoder: list[VoiceEncoder] = []
        self.lock = threading.Lock()  # a thread lock: the synthesizer may serve apps on several event loops

    async def add(self, name: str, data: bytes, transcript: str | None) -> dict:
        """The stored voice's metadata; VoiceError or PromptError for a clip or transcript that cannot be used."""
        return await asyncio.to_thread(self._add, name, data, transcript)

    def _add(self, name: str, data: bytes, transcript: str | None) -> dict:
        with self.lock:
            voice, seconds = _clone(self.synth, self.encoder, data, transcript, name, self.limits)
            return library_for(self.synth).add(name, voice, duration_s=round(seconds, 3))


def cloner_for(synth: Synthesizer, limits: ReferenceLimits = ReferenceLimits()) -> VoiceCloner:
    """The synthesizer's one VoiceCloner (made on first use)."""
    if getattr(synth, "voice_cloner", None) is None:
        synth.voice_cloner = VoiceCloner(synth, limits)
    return synth.voice_cloner


def _clone(synth: Synthesizer, encoder: list[VoiceEncoder], data: bytes, transcript: str | None, name: str,
           limits: ReferenceLimits):
    audio = read_reference_audio(data, limits)
    if not encoder:
        encoder.append(VoiceEncoder.from_checkpoint(synth.checkpoint, device=synth.codec_device))
    voice = encoder[0].clone(audio, ref_text=transcript, name=name)
    if voice.in_context:  # the transcript must tokenize to something, and the prompt leave positions to speak with
        rows = len(synth.prompt("a", voice=voice, text_layout="interleaved"))
        positions = synth.backend.max_seq_len
        if rows + 1 >= positions:
            raise VoiceError("audio", f"the clip and its transcript make a prompt of {rows} rows; the backend has "
                                      f"{positions} positions, so nothing is left to speak with: use a shorter clip "
                                      "(3 to 10 s works best)")
    return voice, len(audio) / 24000
