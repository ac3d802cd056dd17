"""The Python API: text in, codes and streamed PCM out, through the same engine the server uses.

    synth = Synthesizer.from_pretrained("Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice")
    for chunk in synth.stream("Hello there.", voice="ryan", language="english"):
        play(chunk.pcm)

A Synthesizer holds the checkpoint's configuration and tokenizer, a backend (reference, graphed or megakernel),
the codec decoder, the prompt embedder and one Engine (engine/scheduler.py), started on first use. Every call
(stream, frames, generate_codes, the server's requests) becomes a Job on that engine, so in-process and server
audio are the same bytes for the same seed, however many streams run beside it.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field, fields, replace
from typing import Iterator

import numpy as np
import torch

from ..backends.base import Backend, StreamSpec
from ..checkpoint import Checkpoint, load_checkpoint
from ..codec import CodecDecoder, StreamingCodec
from ..config import ModelConfig
from ..model import PromptEmbedder, Talker
from ..prompt import Prompt, build_prompt
from ..sampling import RandomStream, SamplingParams
from ..time_stretch import TimeStretch, check_speed
from ..voices import resolve_voice
from .jobs import DEFAULT_CHUNK_SCHEDULE, AudioChunk, Job, PromptSource, Request, check_max_new_tokens, frame_limit
from .scheduler import Engine, EngineSettings

log = logging.getLogger("qwen_tts_megakernel.engine")

BACKENDS = ("reference", "graphed", "megakernel")
# "random:0.6b" / "random:1.7b": full-size random weights (real shapes) for GPU benchmarks and validation.
RANDOM_MODEL_PREFIX = "random:"


class StreamError(RuntimeError):
    """A stream failed (the engine's message says why); other streams are not affected."""


@dataclass
class GenerationResult:
    codes: np.ndarray  # [T, 16] int64, the EOS frame excluded
    stop_reason: str
    seed: int
    num_text_tokens: int
    elapsed_s: float
    prime_codes: np.ndarray | None = None  # in-context cloned voice: the reference frames the audio continues


class JobEvents:
    """The consumer side of one job for a synchronous caller: a queue the engine fills, read with next()."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.queue: queue.Queue = queue.Queue()
        self.job: Job | None = None

    def emit(self, event: tuple) -> None:
        self.queue.put(event)

    def next(self) -> tuple:
        while True:
            try:
                event = self.queue.get(timeout=1.0)
            except queue.Empty:
                ok, why = self.engine.health()
                if not ok:
                    raise StreamError(why) from None
                continue
            if event[0] in ("chunk", "frame") and self.job is not None:
                counted = event[0] == "chunk" or not self.job.audio
                if counted:
                    self.job.taken()
            return event


@dataclass
class SpeechStream:
    """An iterator of AudioChunk for one utterance. After iteration: stop_reason, codes, timings."""

    _events: JobEvents
    seed: int
    stop_reason: str | None = None
    codes: list[np.ndarray] = field(default_factory=list)
    first_chunk_s: float | None = None
    stretch: TimeStretch | None = None  # speed other than 1.0 (time_stretch.py)

    def __iter__(self) -> "SpeechStream":
        return self

    def __next__(self) -> AudioChunk:
        if self.stop_reason is not None:
            raise StopIteration
        while True:
            kind, payload = self._events.next()
            if kind == "frame":
                self.codes.append(payload)
            elif kind == "chunk":
                if self.stretch is not None:
                    payload = replace(payload, pcm=self.stretch.process(payload.pcm))
                    if len(payload.pcm) == 0:
                        continue
                if self.first_chunk_s is None:
                    self.first_chunk_s = payload.time_s
                return payload
            elif kind == "error":
                self.stop_reason = "error"
                raise StreamError(payload)
            elif kind == "done":
                self.stop_reason = payload.stop_reason
                tail = self.stretch.finish() if self.stretch is not None else ()
                if len(tail):  # the stretch's look-ahead: the last chunk
                    return AudioChunk(tail, self.stretch.sample_rate, first_frame=payload.frames, num_frames=0,
                                      time_s=payload.elapsed_ms / 1000)
                raise StopIteration

    def close(self) -> None:
        """Stop generating (stop reason "cancelled" if it had not ended) and free the stream's state."""
        job = self._events.job
        if self.stop_reason is None and job is not None:
            job.cancel()
            while self.stop_reason is None:
                kind, payload = self._events.next()
                if kind == "done":
                    self.stop_reason = payload.stop_reason

    def __del__(self):
        job = self._events.job
        if self.stop_reason is None and job is not None:
            job.cancel()


class Synthesizer:
    """Text to 24 kHz speech with a Qwen3-TTS (12 Hz) checkpoint."""

    def __init__(self, checkpoint: Checkpoint, backend: Backend, codec: CodecDecoder, embedder: PromptEmbedder,
                 talker: Talker | None = None, engine_settings: EngineSettings | None = None):
        self.checkpoint = checkpoint
        self.config: ModelConfig = checkpoint.config
        self.tokenizer = checkpoint.tokenizer
        self.backend = backend
        self.codec = codec
        self.embedder = embedder
        self.talker = talker  # the reference talker, where the backend is built on one
        self.sample_rate = codec.sample_rate
        self.samples_per_frame = codec.samples_per_frame
        self.engine_settings = engine_settings or EngineSettings()
        self._engine: Engine | None = None
        self._engine_lock = threading.Lock()
        self.voice_library = None  # stored cloned voices (voices.py), opened on first use by a Base model

    @classmethod
    def from_pretrained(cls, model: str, *, backend: str = "reference", device: str | torch.device | None = None,
                        dtype: torch.dtype | str | None = None, max_streams: int = 16,
                        engine_settings: EngineSettings | None = None) -> "Synthesizer":
        """`model`: a local folder, a Hugging Face id, or "random:0.6b" / "random:1.7b" (random real-size weights).
        `max_streams`: streams generated at once (the megakernel reserves a KV-cache slot for each)."""
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
            from ..synthetic import random_checkpoint

            checkpoint = random_checkpoint(str(model)[len(RANDOM_MODEL_PREFIX):], device=device)
        else:
            checkpoint = load_checkpoint(model)
        return cls.from_checkpoint(checkpoint, backend=backend, device=device, dtype=dtype, max_streams=max_streams,
                                   engine_settings=engine_settings)

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, *, backend: str = "reference",
                        device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32,
                        max_streams: int = 16, engine_settings: EngineSettings | None = None) -> "Synthesizer":
        """From an already loaded checkpoint (e.g. synthetic.random_checkpoint() for benchmarks). Real-time
        admission (engine/scheduler.py) and the start-up warm-up of every batch bucket (engine/warmup.py) are on
        for CUDA devices unless `engine_settings` says otherwise; a CPU engine admits up to its caps (nothing runs
        in real time there)."""
        if engine_settings is None:
            cuda = device.type == "cuda"
            engine_settings = EngineSettings(realtime_admission=cuda, warm_up=cuda)
        codec = CodecDecoder.from_state_dict(checkpoint.config.codec, checkpoint.codec_weights, device=device,
                                             dtype=torch.float32)
        if backend == "graphed":
            from ..backends.graphed import GraphedBackend

            talker = Talker.from_state_dict(checkpoint.config, checkpoint.weights, device=device, dtype=dtype)
            graphed = GraphedBackend(talker, max_streams=max_streams, max_seq_len=2048,
                                     warm_buckets=range(1, max_streams + 1) if device.type == "cuda" else ())
            return cls(checkpoint, graphed, codec, talker.embedder(), talker, engine_settings)
        if backend == "reference":
            from ..backends.reference import ReferenceBackend

            talker = Talker.from_state_dict(checkpoint.config, checkpoint.weights, device=device, dtype=dtype)
            return cls(checkpoint, ReferenceBackend(talker, max_streams=max_streams), codec, talker.embedder(),
                       talker, engine_settings)
        if device.type != "cuda":
            raise ValueError("the megakernel backend needs a CUDA device")
        from ..megakernel.backend import MAX_BATCH, MegakernelBackend

        def build() -> Backend:
            return MegakernelBackend(checkpoint.config, checkpoint.weights, device=device,
                                     max_streams=min(max_streams, MAX_BATCH))

        # The kernel computes in fp32 from the bf16 weights, from fp32 input rows: the prompt rows are computed the
        # same way (a bf16 embedder's rounding would make its audio differ from the fp32 reference's).
        embedder = PromptEmbedder.from_state_dict(checkpoint.config, checkpoint.weights, device=device,
                                                  dtype=torch.float32)
        synth = cls(checkpoint, build(), codec, embedder, None, engine_settings)
        synth.backend_factory = build
        return synth

    backend_factory = None  # rebuilds the backend after it broke (megakernel); None: no rebuild

    # The engine -----------------------------------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        """The one engine of this synthesizer, started on first use."""
        with self._engine_lock:
            if self._engine is None:
                # TF32 tensor cores on a GPU (SNR >= 45 dB against fp32 on every stream, tests/test_codec_batch.py;
                # 2.4x the fp32 throughput at 64 streams on an H200); exact fp32 on the CPU.
                precision = "tf32" if self.codec_device.type == "cuda" else "fp32"
                codec = StreamingCodec(self.codec, max_streams=self.engine_settings.max_active, precision=precision)
                started = time.perf_counter()
                codec.warm_up()  # CUDA graphs for every batch bucket, captured before the first stream
                log.info("warm-up: codec graphs in %.2f s", time.perf_counter() - started)
                self._engine = Engine(self.backend, codec, self.embedder, self.config,
                                      sample_rate=self.sample_rate, settings=self.engine_settings,
                                      backend_factory=self.backend_factory)
                if self.engine_settings.warm_up:  # every batch bucket's first step, before the first stream
                    self._engine.warm_up(self.warm_up_spec)
            self._engine.start()
            return self._engine

    def warm_up_spec(self, i: int) -> StreamSpec:
        """The i-th throw-away stream of the start-up warm-up (Engine.warm_up): 32 prompt rows of the tts_pad
        embedding (any model type, no voice needed), the checkpoint's sampling defaults, 16 frames."""
        pad = self.embedder.text_rows([self.config.ids.tts_pad])[0]
        return StreamSpec(prefill=pad.expand(32, -1).clone(), text_rows=pad[None][:0], pad_row=pad,
                          params=self.sampling_params(), rng=RandomStream(i), max_frames=16)

    def close(self) -> None:
        """Stop the engine (streams still running end as cancelled)."""
        with self._engine_lock:
            if self._engine is not None:
                self._engine.stop()

    # Properties users ask for ----------------------------------------------------------------------------------

    @property
    def voices(self) -> list[str]:
        return list(self.config.speakers)

    @property
    def languages(self) -> list[str]:
        return self.config.languages

    @property
    def codec_device(self) -> torch.device:
        return next(self.codec.parameters()).device

    # Requests ----------------------------------------------------------------------------------------------------

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

    def prepare(self, text: str, *, voice: str | None = None, language: str | None = "auto",
                instruct: str | None = None, do_sample: bool = True, max_new_tokens: int | None = None,
                text_layout: str = "prefill", **sampling) -> Request:
        """Validate a request and build its prompt (PromptError, ValueError or TypeError name the problem)."""
        prompt = self.prompt(text, voice=voice, language=language, instruct=instruct, text_layout=text_layout)
        max_new_tokens = check_max_new_tokens(max_new_tokens, self.config.generation.max_new_tokens)
        limit, reason = frame_limit(max_new_tokens, prompt.num_text_tokens)
        return Request(prompt=prompt, params=self.sampling_params(do_sample=do_sample, **sampling), limit=limit,
                       limit_reason=reason)

    def submit(self, source, *, audio: bool, frames: bool, chunk_schedule=DEFAULT_CHUNK_SCHEDULE,
               cancel: threading.Event | None = None) -> JobEvents:
        """Start one job on the engine; its events arrive on the returned JobEvents."""
        events = JobEvents(self.engine)
        job = Job(source, events.emit, label="api", chunk_schedule=chunk_schedule, audio=audio, frames=frames)
        if cancel is not None:
            job.cancel_event = cancel
        events.job = job
        self.engine.submit(job)
        return events

    # Generation ------------------------------------------------------------------------------------------------

    def frames(self, request: Request, *, seed: int, cancel: threading.Event | None = None,
               random_table: np.ndarray | None = None, report: dict | None = None) -> Iterator[np.ndarray]:
        """Generator of one request's code frames (np.int64 [16] each). When it ends (or is closed) `report` holds
        "stop_reason" and "num_text_tokens"; the backend stream is freed."""
        report = {} if report is None else report
        report["num_text_tokens"] = request.prompt.num_text_tokens
        report["stop_reason"] = "cancelled"
        events = self.submit(PromptSource(request, seed, random_table), audio=False, frames=True, cancel=cancel)
        stream = SpeechStream(_events=events, seed=seed)
        try:
            while True:
                kind, payload = events.next()
                if kind == "frame":
                    yield payload
                elif kind == "error":
                    raise StreamError(payload)
                elif kind == "done":
                    stream.stop_reason = report["stop_reason"] = payload.stop_reason
                    return
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
               speed: float = 1.0, **sampling) -> SpeechStream:
        """Stream PCM16 chunks: the first holds one frame (80 ms), later ones follow `chunk_schedule` (its last
        value repeats). Each chunk is decoded as soon as its frames exist. `speed` (0.25-4.0) stretches the audio
        chunk by chunk, pitch kept (time_stretch.py; needs PyAV). Request errors raise here, before the first
        chunk."""
        speed = check_speed(speed)
        if not chunk_schedule or any(int(n) < 1 for n in chunk_schedule):
            raise ValueError(f"chunk_schedule must be a non-empty list of positive frame counts, got {chunk_schedule}")
        seed = pick_seed(seed)
        request = self.prepare(text, voice=voice, language=language, instruct=instruct, do_sample=do_sample,
                               max_new_tokens=max_new_tokens, text_layout=text_layout, **sampling)
        events = self.submit(PromptSource(request, seed), audio=True, frames=True, chunk_schedule=chunk_schedule,
                             cancel=cancel)
        return SpeechStream(_events=events, seed=seed,
                            stretch=TimeStretch(speed, self.sample_rate) if speed != 1.0 else None)

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
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {str(seed)[:40]!r}")
    return int(seed)
