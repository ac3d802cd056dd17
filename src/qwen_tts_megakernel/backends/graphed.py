"""The graphed reference backend: the reference math for many streams at once, one CUDA graph per batch bucket.

This is the strongest plain-PyTorch baseline (the technique of public "fast" Qwen3-TTS ports, batched): a static
KV cache with one slot per stream, attention over each slot's whole cache under its own position mask, sampling on
the device with per-row parameters, and the code predictor's 15 steps unrolled with constant positions. One step of
B streams = one replay of the graph captured for the smallest bucket >= B (1, 2, 4, ..., max_streams); the streams
are named by a device index tensor copied in before the replay, so one graph serves any set of slots at any
positions. Rows that only pad the batch up to its bucket point at a scratch slot that no stream owns.

Without CUDA (or with `use_graph=False`) the same frame function runs eagerly; that is how the CPU tests check it
against the reference math, stream for stream.

Sampling is the device twin of sampling.py: the same rules in the same order, the same inverse-CDF draw and the same
Philox4x32-10 uniforms, generated on the device from each slot's seed and frame counter (or read from the stream's
explicit table). Where they can differ: among exactly tied scores at the top-p boundary (top-p walks the candidates
in the reverse of the draw's stable order; HF's ascending sort promises no order among ties), and on CUDA in the
last bit of a scaled score (a tensor divisor here, a scalar one there). On the CPU in fp32 the codes equal the
reference's (tests/test_graphed.py).

Batch invariance: every operation is row-wise, so a stream's codes depend only on its own slot's state, but not bit
for bit on its batch: the BLAS picks its kernel by shape. Measured on the CPU in fp32 (tiny models): logits of a row
alone (bucket 1, a matrix-vector product) and in a bucket of 2..8 differ by up to 2e-6, and the codes were equal in
every test (tests/test_graphed.py checks alone against 8 rows); a near-tie could still sample differently. On the
GPU the same holds with cuBLAS and the attention kernels choosing by shape; nothing is promised bit for bit there.

Cost model: attention reads every slot's whole cache (max_seq_len positions) whatever its position, so a frame costs
the same at position 10 and position 2000; pick max_seq_len for the longest utterance you serve.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..layers import apply_rope, rope_cos_sin
from ..model import Talker
from ..sampling import NUM_DRAWS_PER_FRAME, TalkerRules
from .base import BackendError, StepOutput, StreamSpec

BUCKETS = (1, 2, 4, 8, 16, 32, 64)
PREFILL_ROWS = 4096  # rows (streams x longest prompt) of one batched prefill pass
NEG_INF = float("-inf")

# ---------------------------------------------------------------------------------------------------------------
# Philox4x32-10 on the device (sampling.philox4x32 for every row of a batch at once, in int64 arithmetic)

_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def _mulhilo32(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of a * m for a < 2^32 (int64 tensor) and a 32-bit constant m, without overflowing
    int64: m is split into 16-bit halves, so no partial product exceeds 2^49."""
    high_part = a * (m >> 16)
    t = a * (m & 0xFFFF) + ((high_part & 0xFFFF) << 16)
    return (high_part >> 16) + (t >> 32), t & _MASK32


def device_uniforms(seed_lo: torch.Tensor, seed_hi: torch.Tensor, frame: torch.Tensor) -> torch.Tensor:
    """The 16 uniforms of frame `frame` for each row, [B, 16] float64: sampling.philox_uniforms on the device.
    seed_lo, seed_hi: the seed's 32-bit halves [B] (int64); frame: [B] (int64)."""
    shape = (frame.shape[0], NUM_DRAWS_PER_FRAME)
    c0 = frame.unsqueeze(1).expand(shape)
    c1 = torch.arange(NUM_DRAWS_PER_FRAME, device=frame.device).expand(shape)
    c2 = c3 = torch.zeros_like(c0)
    k0, k1 = seed_lo.unsqueeze(1), seed_hi.unsqueeze(1)
    for round_index in range(10):
        if round_index:
            k0, k1 = (k0 + _PHILOX_W0) & _MASK32, (k1 + _PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo32(c0, _PHILOX_M0)
        hi1, lo1 = _mulhilo32(c2, _PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return (c0 >> 8).double() * (1.0 / (1 << 24))


# ---------------------------------------------------------------------------------------------------------------
# Per-row sampling (sampling.choose for a batch, each row with its own parameters)


@dataclass
class RowSampler:
    """Sampling parameters of one codebook family (talker or code predictor), one row per slot (the backend's
    table) or per batch row (`rows(idx)`, what `choose` uses), on the device."""

    do_sample: torch.Tensor  # [rows] bool
    temperature: torch.Tensor  # [rows] float32
    top_k: torch.Tensor  # [rows] int64; 0 = off
    top_p_on: torch.Tensor  # [rows] bool: top_p < 1
    top_p_cut: torch.Tensor  # [rows] float32: float32(1 - top_p), the threshold HF compares against

    @classmethod
    def empty(cls, slots: int, device) -> "RowSampler":
        def z(dtype):
            return torch.zeros(slots, dtype=dtype, device=device)

        sampler = cls(z(torch.bool), z(torch.float32), z(torch.long), z(torch.bool), z(torch.float32))
        sampler.temperature.fill_(1.0)
        return sampler

    def set(self, slot: int, do_sample: bool, temperature: float, top_k: int, top_p: float) -> None:
        self.do_sample[slot] = bool(do_sample)
        self.temperature[slot] = float(temperature)
        self.top_k[slot] = int(top_k)
        self.top_p_on[slot] = top_p < 1.0
        self.top_p_cut[slot] = float(np.float32(1.0 - top_p))

    def rows(self, idx: torch.Tensor) -> "RowSampler":
        """The parameters of the slots idx [B], one row each."""
        return RowSampler(*(getattr(self, f).index_select(0, idx) for f in
                            ("do_sample", "temperature", "top_k", "top_p_on", "top_p_cut")))

    def choose(self, logits: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per row (self holds one row per batch row) from already-constrained fp32 logits [B, V] with
        uniforms u [B] (float64).

        Returns (tokens [B] int64, bad [B] bool). A bad row (its logits hold NaN, or no finite candidate is left)
        gets token 0, so no out-of-range code can leave the backend."""
        do_sample, top_k = self.do_sample, self.top_k
        vocab = logits.shape[-1]
        greedy = logits.argmax(-1)
        scores = logits / self.temperature.unsqueeze(1)
        ranked, order = torch.sort(scores, dim=-1, descending=True, stable=True)
        # Top-k: keep scores >= the k-th largest (ties kept); the ranked row is masked in place of the scores.
        kth = ranked.gather(1, (top_k - 1).clamp(0, vocab - 1).unsqueeze(1))
        kth = kth.masked_fill(((top_k <= 0) | (top_k >= vocab)).unsqueeze(1), NEG_INF)
        ranked = ranked.masked_fill(ranked < kth, NEG_INF)
        # Top-p as HF's warper: ascending order, drop while the running probability <= 1 - top_p, keep the last.
        ascending = ranked.flip(-1)
        remove = ascending.softmax(-1).cumsum(-1) <= self.top_p_cut.unsqueeze(1)
        remove[:, -1].zero_()
        remove &= self.top_p_on.unsqueeze(1)
        ranked = ranked.masked_fill(remove.flip(-1), NEG_INF)
        # The inverse-CDF draw over the ranked candidates (sampling.draw).
        s = ranked.double()
        cum = torch.cumsum(torch.exp(s - s[:, :1]), -1)
        pos = torch.searchsorted(cum, u.unsqueeze(1) * cum[:, -1:], right=True)
        pos = torch.minimum(pos, torch.isfinite(s).sum(-1, keepdim=True) - 1).clamp_(min=0)
        tokens = torch.where(do_sample, order.gather(1, pos).squeeze(1), greedy)
        # sampling.choose's SamplingError: NaN anywhere; greedy: no finite score; sampled: no finite warped score
        # (a NaN ranks first, so ranked[:, 0] is the maximum or a NaN).
        unusable = torch.where(do_sample, ~torch.isfinite(ranked[:, 0]), ~torch.isfinite(logits).any(-1))
        bad = torch.isnan(logits).any(-1) | unusable
        return tokens.masked_fill(bad, 0), bad


# ---------------------------------------------------------------------------------------------------------------
# The backend


@dataclass(eq=False)
class GraphedStream:
    """The handle of one open stream (host-side bookkeeping; its state lives in the backend's slot)."""

    slot: int
    max_frames: int  # the spec's, bounded by what the slot holds (max_seq_len - prompt rows + 1)
    pad_row: torch.Tensor
    text_final: bool
    text_rows: int  # rows received so far (rows past max_frames - 1 are never read and are not stored)
    table_frames: int | None  # frames of the stream's explicit random table (None: Philox)
    frames: int = 0  # frames generated so far
    closed: bool = False


class GraphedBackend:
    """Static-shape reference math for up to `max_streams` streams; on CUDA one captured graph per batch bucket.

    max_seq_len: positions per stream (prompt rows + frames); every frame attends over all of them.
    warm_buckets: batch sizes whose graphs are captured now rather than on first use (a capture takes seconds).
    use_graph: None = CUDA graphs on a CUDA device; False runs the same frame function eagerly."""

    def __init__(self, talker: Talker, *, max_streams: int = 8, max_seq_len: int = 2048,
                 warm_buckets: Sequence[int] = (), use_graph: bool | None = None):
        if max_streams < 1:
            raise ValueError(f"max_streams must be >= 1, got {max_streams}")
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")
        cfg = talker.config
        t, cp = cfg.talker, cfg.code_predictor
        p = talker.codec_head.weight
        self.talker = talker
        self.max_streams, self.max_seq_len = max_streams, max_seq_len
        self.device, self.dtype = p.device, p.dtype
        self.use_graph = (p.device.type == "cuda") if use_graph is None else use_graph
        self.buckets = tuple(b for b in BUCKETS if b < max_streams) + (max_streams,)
        self.scratch = max_streams  # the slot that padding rows point at
        slots = max_streams + 1
        dev, dt = p.device, p.dtype

        def zeros(*shape, dtype=dt):
            return torch.zeros(shape, dtype=dtype, device=dev)

        # Per-slot state. Frame k's talker row sits at position pos = L - 1 + k.
        self.k = zeros(slots, t.num_hidden_layers, t.num_key_value_heads, max_seq_len, t.head_dim)
        self.v = torch.zeros_like(self.k)
        self.first_input = zeros(slots, t.hidden_size)  # frame 0's talker input (the last prefill row)
        self.text = zeros(slots, max_seq_len, t.hidden_size)  # text track, then the pad row at index num_text
        self.num_text = zeros(slots, dtype=torch.long)
        self.last_codes = zeros(slots, t.num_code_groups, dtype=torch.long)  # the previous frame
        self.pos = zeros(slots, dtype=torch.long)
        self.frame_index = zeros(slots, dtype=torch.long)
        self.seen = zeros(slots, t.vocab_size, dtype=torch.bool)  # codebook-0 tokens generated so far
        self.repetition_penalty = zeros(slots, dtype=torch.float32)
        self.talker_sampler = RowSampler.empty(slots, dev)
        self.cp_sampler = RowSampler.empty(slots, dev)
        self.seed = zeros(slots, 2, dtype=torch.long)  # 32-bit halves (lo, hi)
        self.table = zeros(slots, max_seq_len, NUM_DRAWS_PER_FRAME, dtype=torch.float64)  # explicit uniforms
        self.use_table = zeros(slots, dtype=torch.bool)
        # Constants.
        self.cos, self.sin = rope_cos_sin(torch.arange(max_seq_len, device=dev), t.head_dim, t.rope_theta, dt)
        self.cp_cos, self.cp_sin = rope_cos_sin(torch.arange(cp.num_code_groups, device=dev), cp.head_dim,
                                                cp.rope_theta, dt)
        self.positions = torch.arange(max_seq_len, device=dev)
        self.rules = TalkerRules(vocab_size=t.vocab_size, eos_id=cfg.ids.codec_eos)
        self.suppress = zeros(t.vocab_size, dtype=torch.bool)
        self.suppress[self.rules.suppress_start:] = True
        self.suppress[self.rules.eos_id] = False
        self.eos_only = zeros(t.vocab_size, dtype=torch.bool)
        self.eos_only[self.rules.eos_id] = True
        self.true = torch.ones((), dtype=torch.bool, device=dev)
        # Per bucket: the index input, the output [bucket, 17] (16 codes + failed flag), and the graph.
        self._idx = {b: torch.full((b,), self.scratch, dtype=torch.long, device=dev) for b in self.buckets}
        self._out = {b: zeros(b, t.num_code_groups + 1, dtype=torch.long) for b in self.buckets}
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.use_graph else None
        self._free = list(range(max_streams))
        if warm_buckets and not self.use_graph:
            raise ValueError("warm_buckets: there are no graphs to capture without CUDA graphs (use_graph=False)")
        for batch in warm_buckets:
            self._graph(self.bucket_for(batch))

    # The contract ------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def open(self, specs: Sequence[StreamSpec]) -> list[GraphedStream]:
        """Prefill each stream into a free slot (rows 0..L-2 into its cache; row L-1 is frame 0's input). A stream
        gets at most max_seq_len - L + 1 frames, what its slot holds (the engine bounds its frames the same way)."""
        if len(specs) > len(self._free):
            raise ValueError(f"no free stream slot: {len(specs)} requested, {len(self._free)} of "
                             f"max_streams={self.max_streams} free")
        hidden = self.first_input.shape[1]
        for i, spec in enumerate(specs):
            length = spec.prefill.shape[0] if spec.prefill.dim() == 2 else 0
            if spec.prefill.dim() != 2 or length < 1 or spec.prefill.shape[1] != hidden:
                raise ValueError(f"spec {i}: prefill must be [L >= 1, {hidden}], got {tuple(spec.prefill.shape)}")
            if length >= self.max_seq_len:
                raise ValueError(f"spec {i}: prompt of {length} rows exceeds the KV cache "
                                 f"(max_seq_len={self.max_seq_len} positions)")
            if spec.max_frames < 1:
                raise ValueError(f"spec {i}: max_frames must be >= 1, got {spec.max_frames}")
            for name in ("text_rows", "pad_row"):
                if getattr(spec, name).shape[-1] != hidden:
                    raise ValueError(f"spec {i}: {name} must be {hidden} wide, got {tuple(getattr(spec, name).shape)}")
        streams = [self._open_one(spec) for spec in specs]
        # Prompts prefill together, in batches of at most PREFILL_ROWS rows (streams x longest prompt).
        batch: list[tuple[int, torch.Tensor]] = []
        for stream, spec in zip(streams, specs):
            rows = spec.prefill[:-1].to(device=self.device, dtype=self.dtype)
            if batch and (len(batch) + 1) * max(len(rows), *(len(r) for _, r in batch)) > PREFILL_ROWS:
                self._prefill(batch)
                batch = []
            batch.append((stream.slot, rows))
        self._prefill(batch)
        return streams

    def step(self, streams: Sequence[GraphedStream]) -> StepOutput:
        """The next frame of every given stream, in one batched frame (one graph replay on CUDA). A stream that
        cannot take a frame (closed, out of frames, waiting for text) fails alone; the others step."""
        num_groups = self._out[self.buckets[0]].shape[1] - 1
        if len({id(s) for s in streams}) != len(streams):
            raise ValueError("a stream appears twice in one step")
        codes = np.zeros((len(streams), num_groups), dtype=np.int64)
        failed = {i: problem for i, s in enumerate(streams) if (problem := self._cannot_step(s))}
        rows = [i for i in range(len(streams)) if i not in failed]
        if not rows:
            return StepOutput(codes=codes, failed=failed)
        try:
            result = self._run([streams[i].slot for i in rows])[: len(rows)].cpu().numpy()
        except RuntimeError as exc:  # a CUDA error: no slot's state can be trusted any more
            raise BackendError(f"graphed frame failed: {exc}") from exc
        for row, i in enumerate(rows):
            codes[i] = result[row, :num_groups]
            if result[row, num_groups]:
                failed[i] = f"frame {streams[i].frames}: the scores cannot be sampled (NaN, or none finite)"
            streams[i].frames += 1
        return StepOutput(codes=codes, failed=failed)

    @torch.inference_mode()
    def append_text(self, stream: GraphedStream, rows: torch.Tensor) -> None:
        if stream.closed:
            raise ValueError("append_text: the stream is closed")
        if stream.text_final:
            raise ValueError("append_text: the stream's text already ended (end_text was called)")
        rows = rows.to(device=self.device, dtype=self.dtype).reshape(-1, self.text.shape[-1])
        stored = self._stored_text_rows(stream, stream.text_rows)
        stream.text_rows += len(rows)
        self._write_text(stream, stored, rows)

    def end_text(self, stream: GraphedStream) -> None:
        stream.text_final = True  # the pad row already follows the last row

    def close(self, stream: GraphedStream) -> None:
        if not stream.closed:
            stream.closed = True
            self._free.append(stream.slot)

    # Slots -------------------------------------------------------------------------------------------------

    def _open_one(self, spec: StreamSpec) -> GraphedStream:
        slot = self._free.pop(0)
        p = spec.params
        prefill = spec.prefill.to(device=self.device, dtype=self.dtype)
        length = len(prefill)
        # A previous tenant may have left NaN behind; masked positions must hold finite values (0 * NaN = NaN).
        self.k[slot].zero_()
        self.v[slot].zero_()
        self.first_input[slot] = prefill[-1]
        self.pos[slot] = length - 1
        self.frame_index[slot] = 0
        self.last_codes[slot] = 0
        self.seen[slot] = False
        self.repetition_penalty[slot] = float(p.repetition_penalty)
        self.talker_sampler.set(slot, p.do_sample, p.temperature, p.top_k, p.top_p)
        self.cp_sampler.set(slot, p.subtalker_dosample, p.subtalker_temperature, p.subtalker_top_k,
                            p.subtalker_top_p)
        seed = spec.rng.seed & ((1 << 64) - 1)
        self.seed[slot, 0], self.seed[slot, 1] = seed & _MASK32, seed >> 32
        max_frames = min(spec.max_frames, self.max_seq_len - length + 1)
        table = spec.rng.table
        self.use_table[slot] = table is not None
        if table is not None:
            frames = min(len(table), max_frames)
            self.table[slot, :frames] = torch.as_tensor(np.asarray(table[:frames]), device=self.device)
        stream = GraphedStream(slot=slot, max_frames=max_frames,
                               pad_row=spec.pad_row.to(device=self.device, dtype=self.dtype),
                               text_final=spec.text_final, text_rows=len(spec.text_rows),
                               table_frames=None if table is None else len(table))
        self._write_text(stream, 0, spec.text_rows.to(device=self.device, dtype=self.dtype))
        return stream

    def _prefill(self, group: list[tuple[int, torch.Tensor]]) -> None:
        """Prompt rows [L-1, H] of (slot, rows) streams in one batched pass through the talker, each stream a batch
        row padded at its end (causal attention keeps real rows from seeing the padding; the padding's K/V land past
        the prompt, where frames overwrite them before any row can see them). Streams share no attention, so a
        non-finite prompt stays in its own slot."""
        group = [(slot, rows) for slot, rows in group if len(rows)]
        if not group:
            return
        model = self.talker.model
        cfg = self.talker.config.talker
        length = max(len(rows) for _, rows in group)
        x = torch.zeros(len(group), length, cfg.hidden_size, device=self.device, dtype=self.dtype)
        for row, (_, rows) in enumerate(group):
            x[row, : len(rows)] = rows
        slots = torch.tensor([slot for slot, _ in group], device=self.device)
        cos, sin = self.cos[:length], self.sin[:length]
        causal = torch.ones(length, length, dtype=torch.bool, device=self.device).tril()
        group_size = cfg.num_attention_heads // cfg.num_key_value_heads
        for i, layer in enumerate(model.layers):
            attn = layer.self_attn
            q, k, v = _qkv(attn, layer.input_layernorm(x), cos, sin)  # [G, heads, length, D]
            self.k[slots, i, :, :length] = k
            self.v[slots, i, :, :length] = v
            out = F.scaled_dot_product_attention(q, k.repeat_interleave(group_size, dim=1),
                                                 v.repeat_interleave(group_size, dim=1), attn_mask=causal,
                                                 scale=1.0 / math.sqrt(cfg.head_dim))
            x = x + attn.o_proj(out.transpose(1, 2).reshape(len(group), length, cfg.q_dim))
            x = x + layer.mlp(layer.post_attention_layernorm(x))

    @staticmethod
    def _stored_text_rows(stream: GraphedStream, received: int) -> int:
        """Rows worth storing: frame k reads row k-1, and the last frame is max_frames - 1."""
        return min(received, stream.max_frames - 1)

    def _write_text(self, stream: GraphedStream, start: int, rows: torch.Tensor) -> None:
        """Store rows from index `start` on (as many as can ever be read), then the pad row after them."""
        end = self._stored_text_rows(stream, stream.text_rows)
        if end > start:
            self.text[stream.slot, start:end] = rows[: end - start]
        self.text[stream.slot, end] = stream.pad_row
        self.num_text[stream.slot] = end

    @staticmethod
    def _cannot_step(s: GraphedStream) -> str | None:
        """Why the stream cannot take its next frame, or None."""
        if s.closed:
            return "stream is closed"
        if s.frames >= s.max_frames:
            return f"the stream has all {s.max_frames} frames its KV-cache slot and frame limit allow"
        if s.table_frames is not None and s.frames >= s.table_frames:
            return f"random table has {s.table_frames} frames, frame {s.frames} requested"
        if not s.text_final and s.frames >= 1 and s.frames - 1 >= s.text_rows:
            return (f"frame {s.frames} needs text row {s.frames - 1}, which has not arrived (append_text) and the "
                    "text has not ended (end_text)")
        return None

    # One frame ---------------------------------------------------------------------------------------------

    def bucket_for(self, batch: int) -> int:
        """The smallest bucket that holds `batch` rows."""
        for bucket in self.buckets:
            if bucket >= batch:
                return bucket
        raise ValueError(f"a step of {batch} streams exceeds max_streams={self.max_streams}")

    @torch.inference_mode()
    def _run(self, slots: list[int]) -> torch.Tensor:
        """One frame for the given slots (padded with the scratch slot); returns the bucket's output [bucket, 17]."""
        bucket = self.bucket_for(len(slots))
        graph = self._graph(bucket) if self.use_graph else None  # before the copy: capture rewrites the index
        idx = torch.tensor(slots + [self.scratch] * (bucket - len(slots)), dtype=torch.long)
        self._idx[bucket].copy_(idx, non_blocking=True)
        if graph is not None:
            graph.replay()
        else:
            self._frame(self._idx[bucket], self._out[bucket])
        return self._out[bucket]

    def _graph(self, bucket: int) -> torch.cuda.CUDAGraph:
        """The captured frame of one bucket (captured on first use). Warm-up and capture see only the scratch slot,
        so no open stream moves."""
        graph = self._graphs.get(bucket)
        if graph is not None:
            return graph
        idx, out = self._idx[bucket], self._out[bucket]
        with torch.inference_mode():
            idx.fill_(self.scratch)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._frame(idx, out)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: CUDA work of other threads (a server's request threads) cannot spoil this capture.
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                self._frame(idx, out)
        self._graphs[bucket] = graph
        return graph

    def _frame(self, idx: torch.Tensor, out: torch.Tensor) -> None:
        """The whole frame for rows idx [B] (fixed shapes, no host sync): input row -> talker -> codebook 0 ->
        15 code-predictor steps -> state update; out[:, :16] = codes, out[:, 16] = 1 where the row failed."""
        talker = self.talker
        t = talker.config.talker
        frame = self.frame_index.index_select(0, idx)
        pos = self.pos.index_select(0, idx)
        # Input: frame 0 reads the last prefill row; frame k >= 1 reads F(frame k-1) + text row k-1 (pad past the
        # end). Built here, at the start of frame k, so a live stream needs row k-1 only now.
        last = self.last_codes.index_select(0, idx)
        parts = [talker.model.codec_embedding.weight.index_select(0, last[:, 0])]
        parts += [talker.code_predictor.model.codec_embedding[j - 1].weight.index_select(0, last[:, j])
                  for j in range(1, t.num_code_groups)]
        text_row = torch.minimum((frame - 1).clamp(min=0), self.num_text.index_select(0, idx))
        fed = torch.stack(parts, 1).sum(1) + self.text[idx, text_row]
        x = torch.where((frame == 0).unsqueeze(1), self.first_input.index_select(0, idx), fed)

        hidden, logits = self._talker_step(x, idx, pos)
        u = torch.where(self.use_table.index_select(0, idx).unsqueeze(1),
                        self.table[idx, frame.clamp(max=self.max_seq_len - 1)],
                        device_uniforms(self.seed[idx, 0], self.seed[idx, 1], frame))
        # Codebook 0: repetition penalty over past tokens, suppression, no EOS before frame 2, then choose.
        penalty = self.repetition_penalty.index_select(0, idx).unsqueeze(1)
        penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
        constrained = torch.where(self.seen.index_select(0, idx), penalised, logits)
        constrained = constrained.masked_fill(self.suppress, NEG_INF)
        constrained = constrained.masked_fill(self.eos_only & (frame < self.rules.min_new_tokens).unsqueeze(1),
                                              NEG_INF)
        g0, bad = self.talker_sampler.rows(idx).choose(constrained, u[:, 0])
        codes, cp_bad = self._code_predictor(idx, hidden, g0, u)
        bad |= cp_bad
        # State for the next frame.
        self.last_codes[idx] = codes
        self.seen[idx, g0] = self.true
        self.frame_index[idx] = frame + 1
        self.pos[idx] = pos + 1
        self.frame_index[self.scratch].zero_()  # padding rows never advance (their position stays in range)
        self.pos[self.scratch].zero_()
        out[:, : t.num_code_groups].copy_(codes)
        out[:, t.num_code_groups].copy_(bad)

    def _talker_step(self, x: torch.Tensor, idx: torch.Tensor, pos: torch.Tensor):
        """x [B, H] at positions pos [B] -> (post-norm hidden [B, H], fp32 logits [B, V]); each row's K/V is written
        at its position in its slot, and it attends over its slot's positions <= pos."""
        model = self.talker.model
        cfg = self.talker.config.talker
        b = x.shape[0]
        cos = self.cos.index_select(0, pos).view(b, 1, 1, -1)
        sin = self.sin.index_select(0, pos).view(b, 1, 1, -1)
        visible = (self.positions.unsqueeze(0) <= pos.unsqueeze(1)).view(b, 1, 1, -1)
        group = cfg.num_attention_heads // cfg.num_key_value_heads
        for i, layer in enumerate(model.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q, k, v = _qkv(attn, h.unsqueeze(1), cos, sin)  # [B, heads, 1, D]
            self.k[idx, i, :, pos] = k[:, :, 0]
            self.v[idx, i, :, pos] = v[:, :, 0]
            # GQA without repeating the cache: a KV head's `group` query heads attend as `group` query rows.
            out = F.scaled_dot_product_attention(
                q.view(b, cfg.num_key_value_heads, group, cfg.head_dim), self.k[:, i].index_select(0, idx),
                self.v[:, i].index_select(0, idx), attn_mask=visible, scale=1.0 / math.sqrt(cfg.head_dim))
            x = x + attn.o_proj(out.reshape(b, cfg.q_dim))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        hidden = model.norm(x)
        return hidden, self.talker.codec_head(hidden).float()

    def _code_predictor(self, idx: torch.Tensor, hidden: torch.Tensor, g0: torch.Tensor, u: torch.Tensor):
        """Codebooks 1..15 for every row; step 1 reads [hidden, C(g0)] at positions 0, 1, step j >= 2 reads the
        embedding of code j-1 at position j. Returns (codes [B, 16], bad [B])."""
        talker = self.talker
        cp = talker.code_predictor
        cfg = cp.cfg
        b = hidden.shape[0]
        cache_k = hidden.new_zeros(b, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.num_code_groups,
                                   cfg.head_dim)
        cache_v = torch.zeros_like(cache_k)
        group = cfg.num_attention_heads // cfg.num_key_value_heads
        sampler = self.cp_sampler.rows(idx)
        codes = [g0]
        bad = torch.zeros_like(g0, dtype=torch.bool)
        rows = torch.stack([hidden, talker.model.codec_embedding.weight.index_select(0, g0)], 1)  # [B, 2, H]
        start = 0
        for j in range(1, cfg.num_code_groups):
            n = rows.shape[1]
            end = start + n
            cos, sin = self.cp_cos[start:end], self.cp_sin[start:end]
            mask = torch.ones(n, end, dtype=torch.bool, device=hidden.device).tril(diagonal=start)
            x = cp.small_to_mtp_projection(rows)
            for i, layer in enumerate(cp.model.layers):
                attn = layer.self_attn
                q, k, v = _qkv(attn, layer.input_layernorm(x), cos, sin)  # [B, heads, n, D]
                cache_k[:, i, :, start:end] = k
                cache_v[:, i, :, start:end] = v
                keys = cache_k[:, i, :, :end].repeat_interleave(group, dim=1)
                values = cache_v[:, i, :, :end].repeat_interleave(group, dim=1)
                out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                                     scale=1.0 / math.sqrt(cfg.head_dim))
                x = x + attn.o_proj(out.transpose(1, 2).reshape(b, n, cfg.q_dim))
                x = x + layer.mlp(layer.post_attention_layernorm(x))
            logits = cp.lm_head[j - 1](cp.model.norm(x)[:, -1]).float()
            code, code_bad = sampler.choose(logits, u[:, j])
            codes.append(code)
            bad |= code_bad
            rows = cp.model.codec_embedding[j - 1].weight.index_select(0, code).unsqueeze(1)
            start = end
        return torch.stack(codes, 1), bad


def _qkv(attn, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """h [B, n, H] -> q [B, heads, n, D], k, v [B, kv_heads, n, D]: projections, QK-norm, RoPE (as model.Attention)."""
    cfg = attn.cfg
    b, n = h.shape[:2]
    q = attn.q_norm(attn.q_proj(h).view(b, n, cfg.num_attention_heads, cfg.head_dim)).transpose(1, 2)
    k = attn.k_norm(attn.k_proj(h).view(b, n, cfg.num_key_value_heads, cfg.head_dim)).transpose(1, 2)
    v = attn.v_proj(h).view(b, n, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


# ---------------------------------------------------------------------------------------------------------------
# Timing (for the load and decode benchmarks)


def time_graphed_frames(backend: GraphedBackend, batch_sizes: Sequence[int], replays: int = 10) -> dict[int, float]:
    """Milliseconds per frame at each batch size (it runs as its bucket), median of `replays` runs after a warm-up.

    Shapes are static, so the time does not depend on positions or on which slots ride along: every row points at
    the scratch slot, and no open stream moves. CUDA events on the GPU, the wall clock elsewhere."""
    result = {}
    cuda = backend.device.type == "cuda"
    for batch in batch_sizes:
        slots = [backend.scratch] * backend.bucket_for(batch)
        backend._run(slots)  # captures the bucket's graph on first use
        times = []
        for _ in range(replays):
            if cuda:
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                backend._run(slots)
                stop.record()
                stop.synchronize()
                times.append(start.elapsed_time(stop))
            else:
                t0 = time.perf_counter()
                backend._run(slots)
                times.append((time.perf_counter() - t0) * 1e3)
        result[batch] = float(np.median(times))
    return result
