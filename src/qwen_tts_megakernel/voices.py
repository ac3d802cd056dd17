"""Cloned voices: made once from a reference clip, stored on disk, used by name like a built-in speaker.

    encoder = VoiceEncoder.from_checkpoint(synth.checkpoint)
    voice = encoder.clone(read_reference_audio(open("ref.wav", "rb").read()), ref_text="what the clip says")
    library_for(synth).add("alice", voice)
    synth.stream("Hi there.", voice="alice")          # every entry point resolves names with resolve_voice()

A voice holds the speaker embedding (x-vector) and, for the in-context layout, the reference clip's codes and
transcript; both are computed once, at upload, so using a stored voice costs what a built-in speaker costs.

On disk, one folder per voice: NAME/voice.safetensors (x_vector [H] float32, ref_codes [R, 16] int64) and
NAME/voice.json (transcript, layout, the speaker encoder's fingerprint, clip length, creation time). A voice is
written into a hidden temporary folder and renamed into place, and removed by renaming it away first, so readers
never see half a voice, two writers of one name cannot both win, and a crash leaves only hidden debris that the
next start clears.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .checkpoint import Checkpoint
from .codec_encoder import CodecEncoder
from .precision import fp32_precision
from .prompt import ClonedVoice, PromptError
from .speaker_encoder import SAMPLE_RATE, SpeakerEncoder

VOICE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")  # matched in full: "alice\n" is no name
VOICES_DIR_ENV = "QWEN_TTS_MK_VOICES_DIR"
FORMAT_VERSION = 1


class VoiceError(ValueError):
    """A reference clip or voice request that cannot be used; `field` names the input, `status` the HTTP code."""

    def __init__(self, field: str, message: str, status: int = 400):
        super().__init__(message)
        self.field, self.status = field, status


@dataclass(frozen=True)
class ReferenceLimits:
    """Bounds on reference clips (uploads and the CLI)."""

    max_bytes: int = 20 * 1024 * 1024
    min_seconds: float = 1.0
    max_seconds: float = 30.0
    min_sample_rate: int = 8000
    max_sample_rate: int = 192000
    max_channels: int = 8
    decode_block_frames: int = 16384  # decoded at a time (all channels), then mixed down to mono
    silence_rms: float = 1e-3  # below this RMS (full scale = 1) a clip counts as silent
    max_transcript_chars: int = 1000


# ---------------------------------------------------------------------------------------------------------------
# Reference audio in


def read_reference_audio(data: bytes, limits: ReferenceLimits = ReferenceLimits(), field: str = "audio") -> np.ndarray:
    """Decode a reference clip (wav, flac, ogg/vorbis, ogg/opus, mp3, ...: whatever libsndfile reads) and return it
    as mono float32 at 24 kHz. Raises VoiceError naming the problem: empty, too large, not audio, unsupported
    sample rate, too many channels, too short or too long, silent.

    Bounded before it allocates: the container's header (rate, channels, frames) is checked first, then the clip
    is decoded in blocks, each mixed down to mono at once, and decoding stops one block past `max_seconds` (a header
    may lie: MP3's frame count is an estimate). A file claiming hours costs one block, not hours of samples."""
    import soundfile as sf
    import soxr

    if not data:
        raise VoiceError(field, f"'{field}' is empty")
    if len(data) > limits.max_bytes:
        raise VoiceError(field, f"'{field}' is larger than {limits.max_bytes} bytes, the limit", 413)
    try:
        with sf.SoundFile(io.BytesIO(data)) as audio_file:
            rate = audio_file.samplerate
            _check_header(audio_file, limits, field)
            mono = _decode_mono(audio_file, int(limits.max_seconds * rate) + 1, limits, field)
    except VoiceError:
        raise
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        # libsndfile's message starts with the repr of the file object ("Error opening <_io.BytesIO object at
        # 0x...>: Format not recognised."): only its reason is for the client.
        reason = str(exc).splitlines()[0].rsplit(">:", 1)[-1].strip() if str(exc) else type(exc).__name__
        raise VoiceError(field, f"'{field}' is not a readable audio file (wav, flac, ogg/opus or mp3): {reason}",
                         415) from exc
    seconds = len(mono) / rate
    if seconds < limits.min_seconds:
        raise VoiceError(field, f"'{field}' is {seconds:.2f} s long; a reference needs at least "
                                f"{limits.min_seconds:g} s (3 to 10 s of clear speech works best)")
    if not np.isfinite(mono).all():
        raise VoiceError(field, f"'{field}' holds samples that are not finite numbers")
    if float(np.sqrt(np.mean(np.square(mono, dtype=np.float64)))) < limits.silence_rms:
        raise VoiceError(field, f"'{field}' is silent")
    if rate != SAMPLE_RATE:
        mono = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ")
    peak = float(np.abs(mono).max())
    if peak > 1.0:  # float files may exceed full scale; the encoders expect [-1, 1]
        mono = mono / peak
    return np.ascontiguousarray(mono, dtype=np.float32)


def _too_long(field: str, seconds: float, limits: ReferenceLimits) -> VoiceError:
    return VoiceError(field, f"'{field}' is {seconds:.1f} s long; the limit is {limits.max_seconds:g} s "
                             "(3 to 10 s of clear speech works best)")


def _check_header(audio_file, limits: ReferenceLimits, field: str) -> None:
    """Refuse from the header alone what is too long, too wide or at an unsupported rate."""
    rate, channels = audio_file.samplerate, audio_file.channels
    if not limits.min_sample_rate <= rate <= limits.max_sample_rate:
        raise VoiceError(field, f"'{field}' has sample rate {rate} Hz; supported: {limits.min_sample_rate}.."
                                f"{limits.max_sample_rate} Hz")
    if not 1 <= channels <= limits.max_channels:
        raise VoiceError(field, f"'{field}' has {channels} channels; the limit is {limits.max_channels}")
    if audio_file.frames > limits.max_seconds * rate + 1:
        raise _too_long(field, audio_file.frames / rate, limits)


def _decode_mono(audio_file, max_frames: int, limits: ReferenceLimits, field: str) -> np.ndarray:
    """At most `max_frames` frames, mixed down to mono block by block (VoiceError past them)."""
    mono = np.empty(max_frames, dtype=np.float32)
    filled = 0
    while True:
        block = audio_file.read(min(limits.decode_block_frames, max_frames - filled + 1), dtype="float32",
                                always_2d=True)
        if not len(block):
            return mono[:filled]
        if filled + len(block) > max_frames:
            raise _too_long(field, (filled + len(block)) / audio_file.samplerate, limits)
        mono[filled:filled + len(block)] = block.mean(axis=1)
        filled += len(block)


# ---------------------------------------------------------------------------------------------------------------
# Encoders


class VoiceEncoder:
    """The two encoders of a Base checkpoint: the speaker encoder (x-vector) and the speech tokenizer's encoder
    (reference codes for the in-context layout). Both take 24 kHz mono float samples."""

    def __init__(self, speaker_encoder: SpeakerEncoder, codec_encoder: CodecEncoder | None):
        self.speaker_encoder = speaker_encoder
        self.codec_encoder = codec_encoder

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, device=None,
                        dtype: torch.dtype = torch.float32) -> "VoiceEncoder":
        """Both encoders in `dtype` (fp32 by default: they run once per voice). The codec encoder is None when the
        speech tokenizer has no encoder tensors (then only x-vector-only voices can be made)."""
        config = checkpoint.config
        if config.model_type != "base" or config.speaker_encoder is None:
            raise PromptError(f"voice cloning needs a Base model; this one is {config.model_type}")
        speaker = SpeakerEncoder.from_state_dict(config.speaker_encoder, checkpoint.weights, device, dtype)
        codec = None
        if config.codec_encoder is not None and any(k.startswith("encoder.") for k in checkpoint.codec_weights):
            codec = CodecEncoder.from_state_dict(config.codec_encoder, checkpoint.codec_weights, device, dtype)
        return cls(speaker, codec)

    # Exact fp32 (precision.py): on a GPU the engine thread turns TF32 on for its codec pushes, process-wide.

    def speaker_embedding(self, audio: np.ndarray) -> torch.Tensor:
        """The x-vector [H] of a 24 kHz clip, float32 on the CPU."""
        with fp32_precision(tf32=False):
            return self.speaker_encoder.embed(audio).float().cpu()

    def reference_codes(self, audio: np.ndarray) -> np.ndarray:
        """Codes [ceil(N / 1920), 16] of a 24 kHz clip."""
        if self.codec_encoder is None:
            raise PromptError("this checkpoint's speech tokenizer has no encoder: only x-vector-only voices work")
        with fp32_precision(tf32=False):
            return self.codec_encoder.encode(audio)

    def clone(self, audio: np.ndarray, ref_text: str | None = None, name: str | None = None) -> ClonedVoice:
        """A voice from a 24 kHz clip: in-context when `ref_text` (the clip's transcript) is given, else
        x-vector only."""
        x_vector = self.speaker_embedding(audio)
        if ref_text is None or not ref_text.strip():
            return ClonedVoice(x_vector=x_vector, name=name)
        return ClonedVoice(x_vector=x_vector, ref_codes=self.reference_codes(audio), ref_text=ref_text.strip(),
                           name=name)


def speaker_encoder_fingerprint(checkpoint: Checkpoint) -> str:
    """Which speaker encoder made a voice: a short hash of its output layer (voices are tied to it)."""
    weight = checkpoint.weights.get("speaker_encoder.fc.weight")
    if weight is None:
        raise PromptError(f"voice cloning needs a Base model; this one is {checkpoint.config.model_type}")
    digest = hashlib.sha256(weight.detach().float().flatten()[:65536].cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# The library


def default_voice_dir() -> Path:
    """$QWEN_TTS_MK_VOICES_DIR, else the user's cache: $XDG_CACHE_HOME or ~/.cache, /qwen-tts-megakernel/voices."""
    if os.environ.get(VOICES_DIR_ENV):
        return Path(os.environ[VOICES_DIR_ENV]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "qwen-tts-megakernel" / "voices"


def check_voice_name(name: object, field: str = "name") -> str:
    """A safe voice name (lower-cased): 1-64 of a-z, 0-9, '_' and '-', starting with a letter or digit."""
    if not isinstance(name, str):  # e.g. a file uploaded in the name field: say what it is, not its repr
        got = "nothing" if name is None else "a file" if hasattr(name, "filename") else type(name).__name__
        raise VoiceError(field, f"'{field}' must be text, got {got}")
    if not VOICE_NAME.fullmatch(name.lower()):
        raise VoiceError(field, f"'{field}' must be 1-64 characters of a-z, 0-9, '_' or '-', starting with a "
                                f"letter or digit; got {quoted(name)}")
    return name.lower()


def quoted(value: object, limit: int = 40) -> str:
    """repr(value), cut to `limit` characters: messages never echo a whole (possibly huge) input."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


class VoiceLibrary:
    """Stored voices in one folder, safe for concurrent use by several processes (module docstring)."""

    def __init__(self, directory: str | Path | None, fingerprint: str):
        """`directory`: None for default_voice_dir(). `fingerprint`: the speaker encoder voices must come from."""
        self.dir = Path(directory).expanduser() if directory else default_voice_dir()
        self.fingerprint = fingerprint
        self._cache: dict[str, tuple[int, ClonedVoice]] = {}  # name -> (folder inode, voice)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._clear_debris()

    def _clear_debris(self, older_than_s: float = 3600.0) -> None:
        """Remove what crashed writers and removers left: trash at once, temporaries after an hour."""
        now = time.time()
        for entry in self.dir.glob(".*-*"):
            try:
                if entry.name.startswith(".trash-") or now - entry.stat().st_mtime > older_than_s:
                    shutil.rmtree(entry, ignore_errors=True)
            except FileNotFoundError:
                pass

    def names(self) -> list[str]:
        return sorted(p.name for p in self.dir.iterdir() if VOICE_NAME.fullmatch(p.name) and p.is_dir())

    def __contains__(self, name: str) -> bool:
        return (isinstance(name, str) and bool(VOICE_NAME.fullmatch(name.lower()))
                and (self.dir / name.lower()).is_dir())

    def add(self, name: str, voice: ClonedVoice, *, duration_s: float | None = None) -> dict:
        """Store `voice` as `name` (VoiceError 409 if the name is taken). Returns its metadata."""
        name = check_voice_name(name)
        meta = {"name": name, "format": FORMAT_VERSION, "speaker_encoder": self.fingerprint,
                "layout": "in_context" if voice.in_context else "x_vector_only", "ref_text": voice.ref_text,
                "reference_frames": None if voice.ref_codes is None else int(len(voice.ref_codes)),
                "duration_s": duration_s, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        tensors = {"x_vector": voice.x_vector.detach().float().cpu().contiguous()}
        if voice.ref_codes is not None:
            tensors["ref_codes"] = torch.from_numpy(np.ascontiguousarray(voice.ref_codes, dtype=np.int64))
        if (self.dir / name).exists():
            raise VoiceError("name", f"a voice named {name!r} already exists", 409)
        tmp = self.dir / f".tmp-{name}-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            save_file(tensors, str(tmp / "voice.safetensors"))
            (tmp / "voice.json").write_text(json.dumps(meta, indent=2), "utf-8")
            try:
                os.rename(tmp, self.dir / name)  # atomic; fails if another writer got there first
            except OSError as exc:
                raise VoiceError("name", f"a voice named {name!r} already exists", 409) from exc
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return meta

    def remove(self, name: str) -> None:
        """Delete a stored voice (VoiceError 404 if there is none)."""
        name = check_voice_name(name)
        trash = self.dir / f".trash-{name}-{uuid.uuid4().hex}"
        try:
            os.rename(self.dir / name, trash)  # atomic: readers see the whole voice or none
        except FileNotFoundError as exc:
            raise VoiceError("name", f"no stored voice named {name!r}", 404) from exc
        self._cache.pop(name, None)
        shutil.rmtree(trash, ignore_errors=True)

    def metadata(self, name: str) -> dict | None:
        try:
            return json.loads((self.dir / name.lower() / "voice.json").read_text("utf-8"))
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
            return None

    def list(self) -> list[dict]:
        """Metadata of every stored voice, by name."""
        return [m for m in (self.metadata(n) for n in self.names()) if m is not None]

    def get(self, name: str) -> ClonedVoice | None:
        """The stored voice `name`, or None. Cached in memory while its folder stays the same."""
        name = name.lower()
        if not VOICE_NAME.fullmatch(name):
            return None
        folder = self.dir / name
        try:
            inode = folder.stat().st_ino
        except FileNotFoundError:
            self._cache.pop(name, None)
            return None
        cached = self._cache.get(name)
        if cached is not None and cached[0] == inode:
            return cached[1]
        meta = self.metadata(name)
        try:
            tensors = load_file(str(folder / "voice.safetensors"))
        except (FileNotFoundError, OSError):
            return None  # removed while we read it
        if meta is None:
            return None
        if meta.get("speaker_encoder") != self.fingerprint:
            raise PromptError(f"voice {name!r} was made with another model's speaker encoder; add it again with "
                              "this model")
        ref_codes = tensors.get("ref_codes")
        voice = ClonedVoice(x_vector=tensors["x_vector"], name=name, ref_text=meta.get("ref_text"),
                            ref_codes=None if ref_codes is None else ref_codes.numpy())
        self._cache[name] = (inode, voice)
        return voice


# ---------------------------------------------------------------------------------------------------------------
# Name resolution: the one function every entry point (Python API, CLI, HTTP, OpenAI endpoint, WebSocket) uses


def library_for(synth) -> VoiceLibrary:
    """The synthesizer's voice library (opened on first use in default_voice_dir() unless one was set)."""
    if getattr(synth, "voice_library", None) is None:
        synth.voice_library = VoiceLibrary(default_voice_dir(), speaker_encoder_fingerprint(synth.checkpoint))
    return synth.voice_library


def resolve_voice(synth, voice: str | ClonedVoice | None) -> str | ClonedVoice | None:
    """What `voice` means for `synth`'s model: a ClonedVoice (given, or a stored voice's name on a Base model) or
    the name unchanged (a built-in speaker, checked when the prompt is built)."""
    if voice is None or isinstance(voice, ClonedVoice) or synth.config.model_type != "base":
        return voice
    if not isinstance(voice, str) or voice == "":
        return None
    stored = library_for(synth).get(voice)
    if stored is None:
        names = library_for(synth).names()
        raise PromptError(f"unknown voice {quoted(voice)}; stored voices: {', '.join(names) if names else '(none)'}. "
                          "Add one with `qwen-tts-mk voices add` or POST /v1/audio/voices")
    return stored


def voice_names(synth) -> list[str]:
    """Every name `voice` accepts: built-in speakers, then stored voices (Base models)."""
    names = list(synth.config.speakers)
    if synth.config.model_type == "base":
        names += library_for(synth).names()
    return names
