"""Streaming codec: the pending frames of many streams decoded in one call, exactly, each stream in its own state slot.

    codec = StreamingCodec(decoder, max_streams=64)
    a, b = codec.open(), codec.open(prime_codes=reference_codes)   # prime: voice-clone codes, no output
    pcm_a, pcm_b = codec.push([a, b], [codes_a, codes_b])           # [n_a, 16], [n_b, 16] -> float32 [n * 1920]
    codec.close(a); codec.close(b)

Every stream's carried state (codec/modules.py: conv tails, transposed-conv overlaps, the attention window's keys and
values, its position) is one row of a slot store, a BatchState of max_streams + 1 rows (the last row is scratch, for
padding). A push groups its streams by frame count (first chunks are 1 frame, later ones 2, 4, 8: each group is one
batched decode, so no stream is cut down to the smallest count) and decodes each group as

    part = store.gather(rows); wav = decoder(codes, part); store.scatter(rows, part)

all on the device. The codes go to the device in one copy and the PCM of every stream comes back in one copy.
`push_pcm16` queues the same decode, the int16 conversion and that one copy (to pinned memory) on the caller's CUDA
stream and returns at once: the engine runs the codec on its own stream, beside the talker's next step.

Execution, by device:
  * CUDA (default): a CUDA graph per (batch bucket, frames per step). Buckets are 1, 2, 4, ... up to max_streams; a
    group of b streams runs in the smallest bucket >= b, its spare rows pointing at the scratch slot; n frames run as
    steps of 8, 4, 2, 1 (exact: the streaming decode is exact for any chunking). Static codes and row buffers, no
    host synchronisation inside a push; graphs are captured at first use or by `warm_up()`.
  * CPU: eager, one stream at a time. CPU kernels choose their summation order by the number of rows (measured with
    torch 2.13 / MKL / oneDNN: a 1-row Linear takes a GEMV path whose sums differ from the GEMM's in the last bits,
    and oneDNN's conv1d and conv_transpose1d differ between batch 1 and 3 for small widths), so a batched CPU call
    would not give a stream the bits of its solo decode. One stream at a time it does, bit for bit, whatever the
    other streams of the call; CPU is the exact reference, not the fast path.
  * use_graphs=True off CUDA runs the fixed bucket-and-step shapes of the graphs eagerly (how CPU tests check them);
    use_graphs=False on CUDA runs each group eagerly at its exact batch.

Exactness: a stream's PCM equals its whole-utterance decode (fp32, to float rounding), and does not depend on the
other streams of a call: bit for bit on CPU; on CUDA bit for bit within a bucket (a GEMM or convolution never mixes
rows, and a captured graph fixes its kernels), while two buckets may pick different kernels for their shapes
(tests/test_codec_batch.py measures both on the GPU).

Precision (fp32 stays the reference; the others are for the GPU, where they use tensor cores):
  * "fp32": TF32 off for the codec's matmuls and convolutions, whatever the process-wide torch flags say.
  * "tf32": fp32 weights, activations and state; matmuls and convolutions on TF32 tensor cores.
  * "bf16": as "tf32", plus bfloat16 weights and inputs for the residual units' convolutions (about 78% of the FLOPs
    of the real codec); every other layer, the SnakeBeta activations, residual sums and the carried state stay fp32.
    Against fp32 on the released shapes with random weights (CPU emulation of the roundings): bf16 everywhere gives
    about 39 dB SNR, bf16 in the residual units only about 49 dB, TF32 everywhere about 59 dB; the bound is 45 dB.

Fused path (`fused=True`, or QWEN_TTS_MK_CODEC_FUSED=1 for the default; codec/fused.py): the same decode with Triton
kernels for SnakeBeta, conv tails, casts, residual sums, RMSNorm, RoPE and the QKV/SwiGLU splits (about 200 tensor
ops a 1-frame step instead of about 600, views not counted), for any precision above; CUDA only (and Triton's
interpreter in CPU tests), the plain path stays the reference. Its kernels are row-independent, so batch invariance
is the plain path's: bit for bit within a bucket, last bits across buckets (the GEMMs and convolutions pick kernels
by shape). `tools/codec_timing` times both paths and prints each one's SNR against plain fp32 in the same run.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass

import numpy as np
import torch

from ..precision import fp32_precision
from . import fused as fused_path
from .decoder import CodecDecoder, check_codes
from .modules import BatchState, ResidualUnit, StateLayout

STEP_FRAMES = (8, 4, 2, 1)  # frames per captured graph; a push of any length is a sequence of these
PRECISIONS = ("fp32", "tf32", "bf16")


def frame_steps(frames: int) -> list[int]:
    """`frames` frames as graph steps, largest first: 3 -> [2, 1], 13 -> [8, 4, 1]."""
    steps = []
    for size in STEP_FRAMES:
        while frames >= size:
            steps.append(size)
            frames -= size
    return steps


def batch_buckets(max_streams: int) -> tuple[int, ...]:
    """Batch sizes with a graph: powers of two below max_streams, then max_streams (64 -> 1, 2, 4, ..., 64)."""
    buckets = [1]
    while buckets[-1] * 2 < max_streams:
        buckets.append(buckets[-1] * 2)
    return tuple(buckets) if buckets[-1] == max_streams else (*buckets, max_streams)


@dataclass(eq=False)
class CodecStream:
    """One stream's handle from `StreamingCodec.open`: its state slot while open, and the frames it has decoded."""

    slot: int
    codec: StreamingCodec
    frames: int = 0
    closed: bool = False


@dataclass(eq=False)
class _Step:
    """One fixed-shape decode step: static inputs (codes, store rows) and, once captured, the graph and its output."""

    codes: torch.Tensor  # [bucket, frames, Q] long
    rows: torch.Tensor  # [bucket] long: slot rows, spare ones the scratch row
    graph: torch.cuda.CUDAGraph | None = None
    wav: torch.Tensor | None = None  # [bucket, frames * samples_per_frame], written by each replay


class StreamingCodec:
    """Exact streaming decode of up to `max_streams` streams at once (see the module docstring).

    `decoder` is the fp32 CodecDecoder (precision "bf16" decodes with a copy of it; see the module docstring).
    `fused` decodes with the Triton kernels of codec/fused.py (default: when QWEN_TTS_MK_CODEC_FUSED=1 and the device
    has them; True where it has not is a ValueError); the plain path stays the reference.
    `use_graphs` (default: on CUDA) decodes with fixed-shape steps, captured as CUDA graphs on CUDA. One push at a
    time (a lock); every caller on the same CUDA stream. State memory: max_streams + 1 rows of `store.layout.size`
    floats (about 5 MB per stream for the released codec, most of it the attention window's keys and values).
    """

    def __init__(self, decoder: CodecDecoder, max_streams: int = 64, precision: str = "fp32",
                 use_graphs: bool | None = None, fused: bool | None = None):
        if not isinstance(max_streams, int) or isinstance(max_streams, bool) or max_streams < 1:
            raise ValueError(f"max_streams must be an integer >= 1, got {max_streams!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if decoder.quantizer.codebooks.dtype != torch.float32 or decoder.pre_conv.weight.dtype != torch.float32:
            raise ValueError("StreamingCodec needs the fp32 decoder (precision='bf16' makes its own bf16 copy)")
        self.decoder = decoder
        self.device = decoder.device
        if fused is None:
            fused = fused_path.requested() and fused_path.available(self.device)
        elif fused and not fused_path.available(self.device):
            raise ValueError("fused=True needs triton and a CUDA device (codec/fused.py)")
        self.fused = bool(fused)
        self.model = _bf16_copy(decoder) if precision == "bf16" else decoder
        if self.fused:
            self.model = fused_path.fuse(self.model)
        self.precision = precision
        self.max_streams = max_streams
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else bool(use_graphs)
        self.cuda_graphs = self.use_graphs and self.device.type == "cuda"
        self.buckets = batch_buckets(max_streams)
        self.store = BatchState(StateLayout(decoder), max_streams + 1, like=decoder.quantizer.codebooks)
        self.scratch = max_streams  # the store row that padding rows read and write
        self._free = list(range(max_streams - 1, -1, -1))  # pop() hands out slot 0 first
        self._steps: dict[tuple[int, int], _Step] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        self._lock = threading.Lock()

    @property
    def samples_per_frame(self) -> int:
        return self.decoder.samples_per_frame

    @property
    def open_streams(self) -> int:
        return self.max_streams - len(self._free)

    # ----- streams ---------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def open(self, prime_codes: torch.Tensor | np.ndarray | None = None) -> CodecStream:
        """A new stream (a fresh state slot). `prime_codes` [P, 16]: frames that precede the stream's own (a voice
        clone's reference codes), run through its state without output. RuntimeError when every slot is open."""
        if prime_codes is not None:
            prime_codes = self._host_codes(prime_codes, "prime_codes")
        with self._lock:
            if not self._free:
                raise RuntimeError(f"all {self.max_streams} codec streams are open (max_streams); close one first")
            stream = CodecStream(self._free.pop(), self)
            self.store.values[stream.slot].zero_()
            self.store.position[stream.slot].zero_()
            if prime_codes is not None and len(prime_codes):
                self._push([stream], [prime_codes])
        return stream

    def close(self, stream: CodecStream) -> None:
        """Free the stream's slot. Closing a closed stream does nothing."""
        self._check_own(stream, "stream")
        with self._lock:
            if not stream.closed:
                stream.closed = True
                self._free.append(stream.slot)

    @torch.inference_mode()
    def push(self, streams: list[CodecStream], codes: list[torch.Tensor | np.ndarray]) -> list[np.ndarray]:
        """Decode the next frames of each stream: codes[i] [n_i, 16] (host integers; n_i may differ, and may be 0)
        -> float32 PCM [n_i * 1920] in [-1, 1] per stream, in order. Every argument is checked before any state
        moves, so a push that raises ValueError changed nothing (a caller may retry its streams one by one)."""
        host = self._checked(streams, codes)
        with self._lock:
            out, spans = self._enqueue(streams, host)
            self._count(streams, host)
            pcm = out.cpu().numpy()  # one device -> host copy (waits for the decode)
        return [pcm[slice(*span)] for span in spans]

    @torch.inference_mode()
    def push_pcm16(self, streams: list[CodecStream], codes: list[torch.Tensor | np.ndarray]) -> PendingPCM:
        """As push, without waiting: the decode, the conversion to int16 PCM (jobs.float_to_pcm16's rounding) and one
        device -> host copy into pinned memory are queued on the current CUDA stream, and the returned PendingPCM's
        wait() gives the int16 arrays once they are there (at once off CUDA)."""
        host = self._checked(streams, codes)
        with self._lock:
            out, spans = self._enqueue(streams, host)
            self._count(streams, host)
            pcm = to_pcm16(out)
            if self.device.type != "cuda":
                return PendingPCM(pcm, spans, None)
            pinned = torch.empty(pcm.shape, dtype=torch.int16, pin_memory=True)
            pinned.copy_(pcm, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            return PendingPCM(pinned, spans, done)

    @torch.inference_mode()
    def warm_up(self, batch_sizes: tuple[int, ...] | None = None, frames: tuple[int, ...] = STEP_FRAMES) -> None:
        """Capture the graphs for these batch sizes (default: every bucket) and step sizes now, so that no push pays
        the capture time. Nothing to do without CUDA graphs."""
        if batch_sizes is not None and not all(1 <= b <= self.max_streams for b in batch_sizes):
            raise ValueError(f"batch_sizes must be in [1, {self.max_streams}] (max_streams), got {batch_sizes}")
        if not set(frames) <= set(STEP_FRAMES):
            raise ValueError(f"frames must be step sizes {STEP_FRAMES}, got {frames}")
        if not self.cuda_graphs:
            return
        buckets = self.buckets if batch_sizes is None else sorted({self._bucket(b) for b in batch_sizes})
        with self._lock:
            for bucket in buckets:
                for n in frames:
                    self._step_for(bucket, n)

    # ----- internals -------------------------------------------------------------------------------------------

    def _check_own(self, stream, name: str) -> None:
        if not isinstance(stream, CodecStream) or stream.codec is not self:
            raise ValueError(f"{name} is not a stream of this codec")

    def _host_codes(self, codes, name: str) -> torch.Tensor:
        if isinstance(codes, torch.Tensor) and codes.device.type != "cpu":
            codes = codes.cpu()  # waits for the device: pass host codes
        return check_codes(codes, self.decoder.cfg, name)

    def _bucket(self, batch: int) -> int:
        return next(b for b in self.buckets if b >= batch)

    def _checked(self, streams: list[CodecStream], codes) -> list[torch.Tensor]:
        """The host codes of a push, every argument checked before any state moves."""
        if len(streams) != len(codes):
            raise ValueError(f"push got {len(streams)} streams and {len(codes)} code arrays")
        host = [self._host_codes(c, f"codes[{i}]") for i, c in enumerate(codes)]
        seen = set()
        for i, stream in enumerate(streams):
            self._check_own(stream, f"streams[{i}]")
            if stream.closed:
                raise ValueError(f"streams[{i}] is closed")
            if id(stream) in seen:
                raise ValueError(f"streams[{i}] appears twice in one push")
            seen.add(id(stream))
        return host

    @staticmethod
    def _count(streams: list[CodecStream], codes: list[torch.Tensor]) -> None:
        for stream, c in zip(streams, codes):
            stream.frames += len(c)

    def _push(self, streams: list[CodecStream], codes: list[torch.Tensor]) -> list[np.ndarray]:
        out, spans = self._enqueue(streams, codes)
        pcm = out.cpu().numpy()
        return [pcm[slice(*span)] for span in spans]

    def _enqueue(self, streams: list[CodecStream], codes: list[torch.Tensor]
                 ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Queue the decode of every stream's codes: the float32 PCM of all of them on the device, and each stream's
        span of it (empty for a stream that pushed no frames)."""
        spf, q = self.samples_per_frame, self.decoder.cfg.num_quantizers
        groups: dict[int, list[int]] = {}  # frames -> indices of the streams pushing that many
        for i, c in enumerate(codes):
            if len(c):
                groups.setdefault(len(c), []).append(i)
        order = [i for n in sorted(groups, reverse=True) for i in groups[n]]
        # One host -> device copy: every group's codes, then every stream's store row.
        flat = torch.cat([codes[i].reshape(-1) for i in order] + [torch.tensor([streams[i].slot for i in order])])
        if self.device.type == "cuda":  # from pinned memory: an upload from pageable memory would wait for the GPU
            flat = flat.pin_memory().to(self.device, non_blocking=True)
        rows = flat[flat.numel() - len(order):]
        out = torch.empty(sum(len(c) for c in codes) * spf, dtype=torch.float32, device=self.device)
        at_code = at_row = at_out = 0
        spans: dict[int, tuple[int, int]] = {}
        for n in sorted(groups, reverse=True):
            members = groups[n]
            b = len(members)
            group_out = out[at_out : at_out + b * n * spf].view(b, n * spf)
            self._decode(flat[at_code : at_code + b * n * q].view(b, n, q), rows[at_row : at_row + b], group_out)
            for j, i in enumerate(members):
                spans[i] = (at_out + j * n * spf, at_out + (j + 1) * n * spf)
            at_code, at_row, at_out = at_code + b * n * q, at_row + b, at_out + b * n * spf
        return out, [spans.get(i, (0, 0)) for i in range(len(codes))]

    def _decode(self, codes: torch.Tensor, rows: torch.Tensor, out: torch.Tensor) -> None:
        """codes [b, n, Q] of the streams in store rows `rows` [b] -> out [b, n * samples_per_frame]."""
        b, n, _ = codes.shape
        spf = self.samples_per_frame
        if self.use_graphs:
            start = 0
            for k in frame_steps(n):
                step = self._step_for(self._bucket(b), k)
                step.codes[:b].copy_(codes[:, start : start + k])
                step.rows[:b].copy_(rows)
                step.rows[b:].fill_(self.scratch)
                if step.graph is not None:
                    step.graph.replay()
                else:
                    step.wav = self._run(step.codes, step.rows)
                out[:, start * spf : (start + k) * spf].copy_(step.wav[:b])  # before the next step reuses memory
                start += k
        elif self.device.type == "cpu":
            for i in range(b):  # one stream at a time: see the module docstring
                out[i : i + 1].copy_(self._run(codes[i : i + 1], rows[i : i + 1]))
        else:
            out.copy_(self._run(codes, rows))

    def _run(self, codes: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Decode codes [b, n, Q] continuing store rows `rows` [b]; the rows' state moves on. -> [b, n * spf]."""
        # TF32 on for "tf32" and "bf16", off for "fp32", while the codec runs (a captured graph keeps its choice).
        with fp32_precision(tf32=self.precision != "fp32"):
            part = self.store.gather(rows)
            wav = self.model(codes, part)
            self.store.scatter(rows, part)
        return wav

    def _step_for(self, bucket: int, frames: int) -> _Step:
        """The fixed-shape step (bucket, frames), captured as a CUDA graph at its first use on CUDA."""
        step = self._steps.get((bucket, frames))
        if step is None:
            q = self.decoder.cfg.num_quantizers
            step = _Step(codes=torch.zeros(bucket, frames, q, dtype=torch.long, device=self.device),
                         rows=torch.full((bucket,), self.scratch, dtype=torch.long, device=self.device))
            if self.cuda_graphs:
                self._capture(step)
            self._steps[(bucket, frames)] = step
        return step

    def _capture(self, step: _Step) -> None:
        """Warm up on a side stream (lazy initialisation, kernel choice), then capture one step. Every row points at
        the scratch slot meanwhile, so no stream's state changes."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self._run(step.codes, step.rows)
        torch.cuda.current_stream().wait_stream(side)
        step.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(step.graph, pool=self._pool):
            step.wav = self._run(step.codes, step.rows)


def to_pcm16(audio: torch.Tensor) -> torch.Tensor:
    """float PCM in [-1, 1] -> int16, on the tensor's device: clip, scale by 32767, round half to even (the same
    float32 operations as jobs.float_to_pcm16, so the same bits)."""
    return (audio.clamp(-1.0, 1.0) * 32767.0).round().to(torch.int16)


class PendingPCM:
    """The int16 PCM of one push_pcm16, per stream, once its device -> host copy is done."""

    def __init__(self, pcm: torch.Tensor, spans: list[tuple[int, int]], done: torch.cuda.Event | None):
        self.pcm, self.spans, self.done = pcm, spans, done

    def ready(self) -> bool:
        return self.done is None or self.done.query()

    def wait(self) -> list[np.ndarray]:
        """Per stream its int16 PCM (waits for this push's copy only, never for the whole device)."""
        if self.done is not None:
            self.done.synchronize()
        pcm = self.pcm.numpy()
        return [pcm[a:b] for a, b in self.spans]


def _bf16_copy(decoder: CodecDecoder) -> CodecDecoder:
    """The decoder with the residual units' convolutions in bfloat16; everything else stays fp32."""
    model = copy.deepcopy(decoder)
    for module in model.modules():
        if isinstance(module, ResidualUnit):
            module.conv1.to(torch.bfloat16)
            module.conv2.to(torch.bfloat16)
    return model
