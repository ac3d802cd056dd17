"""The engine: text in, codes and streamed PCM out, over a pluggable frame backend.

A backend owns the talker and code predictor math. The engine builds the prompt, hands the backend the prefill
rows and the text track, pulls one frame (16 codes) at a time, decodes audio as soon as a chunk's frames exist,
and ends every stream with a stop reason:

    eos             the talker sampled codec EOS (the EOS frame is not audio)
    max_new_tokens  the caller's frame limit
    length_guard    the limit proportional to the text length (a runaway generation guard)
    cancelled       the consumer closed the stream or set its cancel event

Backend protocol (the reference backend below; the CUDA megakernel in megakernel/backend.py):
    stream = backend.open_stream(prefill [L,H], text_rows [T,H], pad_row [H], params, rng)
    codes = stream.next_frame()   # np.int64 [16]; codes[0] == EOS ends the stream
    stream.close()                # frees the stream's GPU state; safe to call twice
Frame k (k = 0, 1, ...): the talker runs on the last prefill row (k = 0) or on F(frame k-1) + text row k-1
(tts_pad past the end), samples codebook 0 with draw 0 of RandomStream.frame(k), then the code predictor fills
codebooks 1..15 with draws 1..15.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field, fields, replace
from typing import Iterator

import numpy as np
import torch

from .checkpoint import Checkpoint, load_checkpoint
from .codec import CodecDecoder, StreamingCodecDecoder, use_codec_graphs
from .config import ModelConfig
from .model import KVCache, Talker
from .prompt import Prompt, build_prompt
from .sampling import RandomStream, SamplingParams, TalkerRules, sample_code_predictor, sample_talker
from .voices import resolve_voice

BACKENDS = ("reference", "megakernel")
STOP_REASONS = ("eos", "max_new_tokens", "length_guard", "cancelled")
DEFAULT_CHUNK_SCHEDULE = (1, 2, 4, 8)
# "random:0.6b" / "random:1.7b": full-size random weights (real shapes) for GPU benchmarks and validation.
RANDOM_MODEL_PREFIX = "random:"
# Runaway guard: about one second of speech per text token plus three seconds, far above any real speaking rate.
GUARD_FRAMES_PER_TOKEN = 12
GUARD_BASE_FRAMES = 38


def length_guard(num_text_tokens: int) -> int:
    return GUARD_BASE_FRAMES + GUARD_FRAMES_PER_TOKEN * num_text_tokens


def frame_limit(max_new_tokens: int, num_text_tokens: int) -> tuple[int, str]:
    """How many frames a stream may generate, and the stop reason when it reaches that many."""
    guard = length_guard(num_text_tokens)
    return (max_new_tokens, "max_new_tokens") if max_new_tokens <= guard else (guard, "length_guard")


def check_max_new_tokens(value: int | None, default: int) -> int:
    """The caller's frame limit (`default` when None), which must be a positive integer."""
    if value is None:
        return default
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------------------------
# Reference backend: plain PyTorch, any device


class ReferenceStream:
    """One utterance on the reference backend. Keeps the talker KV cache and the codebook-0 history."""

    def __init__(self, talker: Talker, prefill: torch.Tensor, text_rows: torch.Tensor, pad_row: torch.Tensor,
                 params: SamplingParams, rng: RandomStream, capacity: int):
        self.talker, self.params, self.rng = talker, params, rng
        cfg = talker.config
        self.rules = TalkerRules(vocab_size=cfg.talker.vocab_size, eos_id=cfg.ids.codec_eos)
        self.prefill, self.text_rows, self.pad_row = prefill, text_rows, pad_row
        self.cache: KVCache | None = talker.new_cache(capacity)
        self.frame_index = 0
        self.past_g0: list[int] = []
        self.last_codes: list[int] | None = None
        self.last_logits: torch.Tensor | None = None  # fp32 codec logits of the latest talker step
        self.last_hidden: torch.Tensor | None = None  # post-norm hidden of the latest talker step

    def talker_input(self) -> torch.Tensor:
        """Rows for this frame's talker pass: the whole prefill first, then F(previous frame) + text track."""
        if self.frame_index == 0:
            return self.prefill
        k = self.frame_index - 1
        text = self.text_rows[k] if k < len(self.text_rows) else self.pad_row
        return (self.talker.frame_embedding(self.last_codes) + text).unsqueeze(0)

    @torch.inference_mode()
    def next_frame(self) -> np.ndarray:
        if self.cache is None:
            raise RuntimeError("stream is closed")
        talker = self.talker
        hidden, logits = talker.forward_rows(self.talker_input(), self.cache)
        self.last_hidden, self.last_logits = hidden, logits
        u = self.rng.frame(self.frame_index)
        past = torch.tensor(self.past_g0, dtype=torch.long)
        g0 = sample_talker(logits.cpu(), past, self.frame_index, self.params, self.rules, float(u[0]))
        codes = np.zeros(talker.config.talker.num_code_groups, dtype=np.int64)
        codes[0] = g0
        if g0 == self.rules.eos_id:
            return codes
        cp = talker.code_predictor
        cp_cache = cp.new_cache(hidden.device, hidden.dtype)
        rows = torch.stack([hidden, talker.model.codec_embedding.weight[g0]])
        for j in range(1, len(codes)):
            logits_j = cp.logits(rows, cp_cache, head=j - 1)
            codes[j] = sample_code_predictor(logits_j.cpu(), self.params, float(u[j]))
            if j + 1 < len(codes):
                rows = cp.input_row(j + 1, int(codes[j]))
        self.past_g0.append(g0)
        self.last_codes = codes.tolist()
        self.frame_index += 1
        return codes

    def append_text_rows(self, rows: torch.Tensor) -> None:
        """Extend the text track while the stream runs (streamed text input, see live.py). Rows [n, H]."""
        rows = rows.to(device=self.pad_row.device, dtype=self.pad_row.dtype).reshape(-1, self.pad_row.shape[-1])
        self.text_rows = torch.cat([self.text_rows, rows]) if len(self.text_rows) else rows

    def close(self) -> None:
        self.cache = None


class ReferenceBackend:
    """The spec: plain PyTorch talker and code predictor (CPU or CUDA, fp32 or bf16)."""

    name = "reference"

    def __init__(self, talker: Talker, max_seq_len: int = 8192):
        self.talker = talker
        self.max_seq_len = max_seq_len

    def open_stream(self, prefill: torch.Tensor, text_rows: torch.Tensor, pad_row: torch.Tensor,
                    params: SamplingParams, rng: RandomStream, max_frames: int | None = None) -> ReferenceStream:
        frames = max_frames if max_frames is not None else self.max_seq_len
        capacity = min(self.max_seq_len, len(prefill) + frames + 1)
        return ReferenceStream(self.talker, prefill, text_rows, pad_row, params, rng, capacity)


# ---------------------------------------------------------------------------------------------------------------
# Results and chunks


@dataclass
class GenerationResult:
    codes: np.ndarray  # [T, 16] int64, the EOS frame excluded
    stop_reason: str
    seed: int
    num_text_tokens: int
    elapsed_s: float
    prime_codes: np.ndarray | None = None  # in-context cloned voice: the reference frames the audio continues


@dataclass
class Request:
    """A validated request: its prompt rows, sampling parameters and frame limit (see Synthesizer.prepare)."""

    prompt: Prompt
    params: SamplingParams
    limit: int  # frames: min(max_new_tokens, length guard)
    limit_reason: str  # the stop reason when `limit` frames were generated


@dataclass
class AudioChunk:
    pcm: np.ndarray  # int16 mono
    sample_rate: int
    first_frame: int
    num_frames: int
    time_s: float  # seconds since the request started, when this chunk was ready

    @property
    def duration_s(self) -> float:
        return len(self.pcm) / self.sample_rate


def float_to_pcm16(audio: np.ndarray) -> np.ndarray:
    return (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype(np.int16)


@dataclass
class SpeechStream:
    """An iterator of AudioChunk for one utterance. After iteration: stop_reason, codes, timings."""

    _chunks: Iterator[AudioChunk]
    seed: int
    stop_reason: str | None = None
    codes: list[np.ndarray] = field(default_factory=list)
    first_chunk_s: float | None = None

    def __iter__(self) -> "SpeechStream":
        return self

    def __next__(self) -> AudioChunk:
        chunk = next(self._chunks)
        if self.first_chunk_s is None:
            self.first_chunk_s = chunk.time_s
        return chunk

    def close(self) -> None:
        """Stop generating (stop reason "cancelled" if it had not ended) and free the stream's state."""
        self._chunks.close()


# ---------------------------------------------------------------------------------------------------------------
# Synthesizer: the public API


class Synthesizer:
    """Text to 24 kHz speech with a Qwen3-TTS (12 Hz) checkpoint.

        synth = Synthesizer.from_pretrained("Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice")
        for chunk in synth.stream("Hello there.", voice="ryan", language="english"):
            play(chunk.pcm)
    """

    def __init__(self, checkpoint: Checkpoint, backend, codec: CodecDecoder, talker: Talker):
        self.checkpoint = checkpoint
        self.config: ModelConfig = checkpoint.config
        self.tokenizer = checkpoint.tokenizer
        self.backend = backend
        self.codec = codec
        self.talker = talker  # embeds prompt rows for every backend
        self.voice_library = None  # stored cloned voices (voices.py), opened on first use by a Base model
        self.sample_rate = codec.sample_rate
        self.samples_per_frame = codec.samples_per_frame

    @classmethod
    def from_pretrained(cls, model: str, *, backend: str = "reference", device: str | torch.device | None = None,
                        dtype: torch.dtype | str | None = None, max_streams: int = 4) -> "Synthesizer":
        """`model`: a local folder, a Hugging Face id, or "random:0.6b" / "random:1.7b" (random real-size weights).
        `max_streams`: streams open at once (the megakernel reserves a KV-cache slot for each)."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        if isinstance(dtype, str):
            dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                     "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        if str(model).startswith(RANDOM_MODEL_PREFIX):
            from .synthetic import random_checkpoint

            checkpoint = random_checkpoint(str(model)[len(RANDOM_MODEL_PREFIX):], device=device)
        else:
            checkpoint = load_checkpoint(model)
        return cls.from_checkpoint(checkpoint, backend=backend, device=device, dtype=dtype, max_streams=max_streams)

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, *, backend: str = "reference",
                        device: torch.device = torch.device("cpu"),
                        dtype: torch.dtype = torch.float32, max_streams: int = 4) -> "Synthesizer":
        """From an already loaded checkpoint (e.g. synthetic.random_checkpoint() for benchmarks)."""
        talker = Talker.from_state_dict(checkpoint.config, checkpoint.weights, device=device, dtype=dtype)
        codec = CodecDecoder.from_state_dict(checkpoint.config.codec, checkpoint.codec_weights, device=device,
                                             dtype=torch.float32)
        if use_codec_graphs(codec):
            codec.streaming_graphs().warm_up()  # capture now, so that the first request does not pay for it
        if backend == "reference":
            engine_backend = ReferenceBackend(talker)
        else:
            if device.type != "cuda":
                raise ValueError("the megakernel backend needs a CUDA device")
            from .megakernel.backend import MegakernelBackend

            engine_backend = MegakernelBackend(checkpoint.config, checkpoint.weights, device=device,
                                               slots=max_streams)
        return cls(checkpoint, engine_backend, codec, talker)

    # Properties users ask for ----------------------------------------------------------------------------------

    @property
    def voices(self) -> list[str]:
        return list(self.config.speakers)

    @property
    def languages(self) -> list[str]:
        return self.config.languages

    # Generation ------------------------------------------------------------------------------------------------

    def sampling_params(self, do_sample: bool = True, **sampling) -> SamplingParams:
        """The checkpoint's sampling defaults with the caller's overrides (None keeps the default). do_sample=False
        makes both the talker and the code predictor greedy."""
        defaults = self.config.generation.sampling
        unknown = set(sampling) - {f.name for f in fields(SamplingParams)}
        if unknown:
            raise TypeError(f"unknown sampling option(s): {', '.join(sorted(unknown))}")
        chosen = {"do_sample": do_sample, "subtalker_dosample": do_sample and defaults.subtalker_dosample}
        chosen.update({k: v for k, v in sampling.items() if v is not None})
        return replace(defaults, **chosen)

    def prompt(self, text: str, *, voice: str | None = None, language: str | None = "auto",
               instruct: str | None = None, text_layout: str = "prefill") -> Prompt:
        return build_prompt(self.config, self.tokenizer, text, voice=resolve_voice(self, voice), language=language,
                            instruct=instruct, text_layout=text_layout)

    @torch.inference_mode()
    def _open(self, prompt: Prompt, params: SamplingParams, rng: RandomStream, max_frames: int):
        talker = self.talker
        prefill = talker.embed_prompt(prompt)
        ids = self.config.ids
        text_rows = talker.text_rows(prompt.trailing_text_ids) if prompt.trailing_text_ids else prefill[:0]
        pad_row = talker.text_rows([ids.tts_pad])[0]
        return self.backend.open_stream(prefill, text_rows, pad_row, params, rng, max_frames=max_frames)

    def prepare(self, text: str, *, voice: str | None = None, language: str | None = "auto",
                instruct: str | None = None, do_sample: bool = True, max_new_tokens: int | None = None,
                text_layout: str = "prefill", **sampling) -> Request:
        """Validate a request and build its prompt (PromptError, ValueError or TypeError name the problem)."""
        prompt = self.prompt(text, voice=voice, language=language, instruct=instruct, text_layout=text_layout)
        max_new_tokens = check_max_new_tokens(max_new_tokens, self.config.generation.max_new_tokens)
        limit, reason = frame_limit(max_new_tokens, prompt.num_text_tokens)
        return Request(prompt=prompt, params=self.sampling_params(do_sample=do_sample, **sampling), limit=limit,
                       limit_reason=reason)

    def frames(self, request: Request, *, seed: int, cancel: threading.Event | None = None,
               random_table: np.ndarray | None = None, report: dict | None = None) -> Iterator[np.ndarray]:
        """Generator of one request's code frames (np.int64 [16] each), one backend step per next(). When it ends
        (or is closed) `report` holds "stop_reason" and "num_text_tokens"; the backend stream is freed."""
        report = {} if report is None else report
        report["num_text_tokens"] = request.prompt.num_text_tokens
        report["stop_reason"] = "cancelled"
        stream = self._open(request.prompt, request.params, RandomStream(seed, random_table), request.limit)
        try:
            for _ in range(request.limit):
                if cancel is not None and cancel.is_set():
                    return
                codes = stream.next_frame()
                if codes[0] == self.config.ids.codec_eos:
                    report["stop_reason"] = "eos"
                    return
                yield codes
            report["stop_reason"] = request.limit_reason
        finally:
            stream.close()

    def generate_codes(self, text: str, *, voice: str | None = None, language: str | None = "auto",
                       instruct: str | None = None, seed: int | None = None, do_sample: bool = True,
                       max_new_tokens: int | None = None, text_layout: str = "prefill",
                       random_table: np.ndarray | None = None, **sampling) -> GenerationResult:
        """All codes of one utterance, [T, 16], and why generation stopped."""
        seed = pick_seed(seed)
        request = self.prepare(text, voice=voice, language=language, instruct=instruct, do_sample=do_sample,
                               max_new_tokens=max_new_tokens, text_layout=text_layout, **sampling)
        report: dict = {}
        start = time.perf_counter()
        frames = list(self.frames(request, seed=seed, random_table=random_table, report=report))
        codes = np.stack(frames) if frames else np.zeros((0, self.config.talker.num_code_groups), dtype=np.int64)
        return GenerationResult(codes=codes, stop_reason=report["stop_reason"], seed=seed,
                                num_text_tokens=report["num_text_tokens"], elapsed_s=time.perf_counter() - start,
                                prime_codes=request.prompt.ref_codes)

    def stream(self, text: str, *, voice: str | None = None, language: str | None = "auto",
               instruct: str | None = None, seed: int | None = None, do_sample: bool = True,
               max_new_tokens: int | None = None, text_layout: str = "prefill",
               chunk_schedule: tuple[int, ...] = DEFAULT_CHUNK_SCHEDULE, cancel: threading.Event | None = None,
               **sampling) -> SpeechStream:
        """Stream PCM16 chunks: the first holds one frame (80 ms), later ones follow `chunk_schedule` (its last
        value repeats). Each chunk is decoded as soon as its frames exist. Request errors raise here, before the
        first chunk."""
        if not chunk_schedule or any(int(n) < 1 for n in chunk_schedule):
            raise ValueError(f"chunk_schedule must be a non-empty list of positive frame counts, got {chunk_schedule}")
        seed = pick_seed(seed)
        request = self.prepare(text, voice=voice, language=language, instruct=instruct, do_sample=do_sample,
                               max_new_tokens=max_new_tokens, text_layout=text_layout, **sampling)
        report: dict = {}
        start = time.perf_counter()
        frames = self.frames(request, seed=seed, cancel=cancel, report=report)
        speech = SpeechStream(_chunks=iter(()), seed=seed)
        speech._chunks = self._chunks(frames, tuple(int(n) for n in chunk_schedule), start, speech, report,
                                      request.prompt.ref_codes)
        return speech

    def _chunks(self, frames, schedule, start, speech: SpeechStream, report: dict,
                prime_codes: np.ndarray | None = None) -> Iterator[AudioChunk]:
        decoder = StreamingCodecDecoder(self.codec)
        if prime_codes is not None:  # in-context voice: continue from the reference frames, emit only new audio
            decoder.push(torch.from_numpy(prime_codes).to(self.codec_device))
        pending: list[np.ndarray] = []
        emitted = 0
        chunks_sent = 0

        def flush() -> AudioChunk:
            nonlocal emitted, chunks_sent
            codes = torch.from_numpy(np.stack(pending)).to(self.codec_device)
            audio = decoder.push(codes).float().cpu().numpy()
            chunk = AudioChunk(pcm=float_to_pcm16(audio), sample_rate=self.sample_rate, first_frame=emitted,
                               num_frames=len(pending), time_s=time.perf_counter() - start)
            emitted += len(pending)
            chunks_sent += 1
            pending.clear()
            return chunk

        try:
            for codes in frames:
                speech.codes.append(codes)
                pending.append(codes)
                if len(pending) >= schedule[min(chunks_sent, len(schedule) - 1)]:
                    yield flush()
            if pending:
                yield flush()
        finally:
            frames.close()
            speech.stop_reason = report.get("stop_reason", "cancelled")

    @property
    def codec_device(self) -> torch.device:
        return next(self.codec.parameters()).device

    def synthesize(self, text: str, **kwargs) -> tuple[np.ndarray, int]:
        """The whole utterance as float32 in [-1, 1] and its sample rate (24000)."""
        result = self.generate_codes(text, **kwargs)
        return self.decode(result.codes, prime_codes=result.prime_codes), self.sample_rate

    def decode(self, codes: np.ndarray, prime_codes: np.ndarray | None = None) -> np.ndarray:
        """Whole-utterance codec decode of codes [T, 16] -> float32 samples [T * 1920]. With `prime_codes`
        [R, 16] (an in-context voice's reference frames) the decoder continues from them; their audio is cut."""
        if len(codes) == 0:
            return np.zeros(0, dtype=np.float32)
        skip = 0
        if prime_codes is not None:
            skip = len(prime_codes) * self.samples_per_frame
            codes = np.concatenate([prime_codes, codes])
        with torch.inference_mode():
            audio = self.codec.decode(torch.as_tensor(np.asarray(codes), device=self.codec_device))
        return audio[skip:].float().cpu().numpy()


def pick_seed(seed: int | None) -> int:
    """The caller's seed (a non-negative integer), or a fresh random one."""
    if seed is None:
        return int.from_bytes(os.urandom(8), "little") >> 1
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)
