"""The reference math with fixed shapes, so that one whole frame can be captured into a CUDA graph.

This is the strongest plain-PyTorch baseline (the technique of public "fast" Qwen3-TTS ports): a static KV cache,
attention over the whole cache with a position mask, sampling on the device, and the code predictor unrolled with
constant positions. One frame = one graph replay: talker step -> codebook 0 -> 15 code-predictor steps -> the
next talker input. Without CUDA (or with `use_graph=False`) the same function runs eagerly, which is how the tests
check it against the reference backend on the CPU.

The sampling here is the device twin of sampling.py: same rules, same inverse-CDF draw, same Philox uniforms
(copied in per frame), so a graphed stream and a reference stream with the same seed produce the same codes up to
floating-point rounding of the logits.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..layers import apply_rope, rope_cos_sin
from ..model import KVCache, Talker
from ..sampling import RandomStream, SamplingParams


def _row(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table[index] for a 0-d device index without a host sync (plain indexing would call .item())."""
    return table.index_select(0, index.view(1))[0]


def device_draw(scores: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw from softmax(scores) [V] with uniform u (0-d float64): candidates by score descending, lower
    index first among equals (a stable sort). Returns a 0-d int64 token."""
    s, order = torch.sort(scores.double(), descending=True, stable=True)
    cum = torch.cumsum(torch.exp(s - s[0]), 0)
    pos = torch.searchsorted(cum, (u * cum[-1]).reshape(1), right=True)[0]
    pos = torch.minimum(pos, torch.isfinite(s).sum() - 1)
    return order.index_select(0, pos.view(1))[0]


def device_choose(logits: torch.Tensor, u: torch.Tensor, do_sample: bool, temperature: float, top_k: int,
                  top_p: float) -> torch.Tensor:
    """sampling.choose() on the device: greedy argmax, or temperature -> top-k -> top-p -> one draw."""
    if not do_sample:
        return torch.argmax(logits)
    scores = logits / temperature
    if 0 < top_k < scores.numel():
        kth = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, sorted_idx = torch.sort(scores)
        remove_sorted = sorted_scores.softmax(-1).cumsum(-1) <= (1 - top_p)
        remove_sorted = torch.cat([remove_sorted[:-1], remove_sorted.new_zeros(1)])  # keep at least one
        scores = scores.masked_fill(torch.zeros_like(remove_sorted).scatter(0, sorted_idx, remove_sorted),
                                    float("-inf"))
    return device_draw(scores, u)


class StaticFrame:
    """Buffers and the fixed-shape frame function for one stream slot."""

    def __init__(self, talker: Talker, params: SamplingParams, capacity: int, max_text_rows: int):
        cfg = talker.config
        p = talker.codec_head.weight
        self.talker, self.params, self.capacity = talker, params, capacity
        self.device, self.dtype = p.device, p.dtype
        t = cfg.talker
        self.cache = KVCache(t, capacity, p.device, p.dtype)
        self.cp_cache = KVCache(cfg.code_predictor, cfg.code_predictor.num_code_groups, p.device, p.dtype)
        self.cos, self.sin = rope_cos_sin(torch.arange(capacity, device=p.device), t.head_dim, t.rope_theta, p.dtype)
        self.positions = torch.arange(capacity, device=p.device)
        # Per-stream state, all on the device so a replay needs no host values.
        self.x = torch.zeros(t.hidden_size, device=p.device, dtype=p.dtype)  # this frame's talker input
        self.pos = torch.zeros((), dtype=torch.long, device=p.device)  # its position
        self.step = torch.zeros((), dtype=torch.long, device=p.device)  # frames generated so far
        self.seen = torch.zeros(t.vocab_size, dtype=torch.bool, device=p.device)  # past codebook-0 tokens
        self.u = torch.zeros(16, dtype=torch.float64, device=p.device)
        self.text_rows = torch.zeros(max_text_rows + 1, t.hidden_size, device=p.device, dtype=p.dtype)
        self.num_text_rows = torch.zeros((), dtype=torch.long, device=p.device)
        self.codes = torch.zeros(t.num_code_groups, dtype=torch.long, device=p.device)
        self.hidden = torch.zeros(t.hidden_size, device=p.device, dtype=p.dtype)
        self.logits = torch.zeros(t.vocab_size, device=p.device, dtype=torch.float32)
        # Constant masks of the codebook-0 rules (no Python-scalar writes may happen under capture: each would be a
        # host-to-device copy).
        self.suppress = torch.zeros(t.vocab_size, dtype=torch.bool, device=p.device)
        self.suppress[t.vocab_size - 1024:] = True
        self.suppress[cfg.ids.codec_eos] = False
        self.eos_mask = torch.zeros_like(self.suppress)
        self.eos_mask[cfg.ids.codec_eos] = True
        cp = talker.code_predictor
        self.lm_heads = torch.stack([h.weight for h in cp.lm_head])  # [15, 2048, cp_hidden]

    # Talker --------------------------------------------------------------------------------------------------

    def talker_step(self) -> None:
        """x at position pos -> hidden, fp32 logits; K/V written at pos; attention over positions <= pos."""
        t = self.talker
        cfg = t.config.talker
        x = self.x.unsqueeze(0)
        cos, sin = self.cos.index_select(0, self.pos.view(1)), self.sin.index_select(0, self.pos.view(1))
        visible = (self.positions <= self.pos).unsqueeze(0)  # [1, capacity]
        for i, layer in enumerate(t.model.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_norm(attn.q_proj(h).view(1, cfg.num_attention_heads, cfg.head_dim)).transpose(0, 1)
            k = attn.k_norm(attn.k_proj(h).view(1, cfg.num_key_value_heads, cfg.head_dim)).transpose(0, 1)
            v = attn.v_proj(h).view(1, cfg.num_key_value_heads, cfg.head_dim).transpose(0, 1)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            self.cache.k[i].index_copy_(1, self.pos.view(1), k)
            self.cache.v[i].index_copy_(1, self.pos.view(1), v)
            group = cfg.num_attention_heads // cfg.num_key_value_heads
            keys = self.cache.k[i].repeat_interleave(group, dim=0)
            values = self.cache.v[i].repeat_interleave(group, dim=0)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible,
                                                 scale=1.0 / math.sqrt(cfg.head_dim))
            x = x + attn.o_proj(out.transpose(0, 1).reshape(1, cfg.q_dim))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        hidden = t.model.norm(x)[0]
        self.hidden.copy_(hidden)
        self.logits.copy_(t.codec_head(hidden).float())

    def sample_g0(self) -> torch.Tensor:
        p = self.params
        logits = self.logits
        if p.repetition_penalty != 1.0:
            penalised = torch.where(logits < 0, logits * p.repetition_penalty, logits / p.repetition_penalty)
            logits = torch.where(self.seen, penalised, logits)
        logits = logits.masked_fill(self.suppress, float("-inf"))
        logits = logits.masked_fill(self.eos_mask & (self.step < 2), float("-inf"))
        return device_choose(logits, self.u[0], p.do_sample, p.temperature, p.top_k, p.top_p)

    # Code predictor ------------------------------------------------------------------------------------------

    def code_predictor(self, g0: torch.Tensor) -> None:
        """Codebooks 1..15 from hidden and g0; positions are constants, so the 15 steps unroll."""
        t = self.talker
        cp = t.code_predictor
        p = self.params
        self.cp_cache.reset()
        rows = torch.stack([self.hidden, _row(t.model.codec_embedding.weight, g0)])
        for j in range(1, 16):
            h = cp.model(cp.small_to_mtp_projection(rows), self.cp_cache)[-1]
            logits = F.linear(h, self.lm_heads[j - 1]).float()
            code = device_choose(logits, self.u[j], p.subtalker_dosample, p.subtalker_temperature,
                                 p.subtalker_top_k, p.subtalker_top_p)
            self.codes[j:j + 1].copy_(code.view(1))
            if j < 15:
                rows = _row(cp.model.codec_embedding[j - 1].weight, code).unsqueeze(0)

    def frame(self) -> None:
        """One whole frame; afterwards `codes` holds it (codes[0] == EOS: the stream ended, nothing else moved)."""
        self.talker_step()
        g0 = self.sample_g0()
        self.codes.zero_()
        self.codes[0:1].copy_(g0.view(1))
        self.code_predictor(g0)
        # Next input: F(frame) + text row (tts_pad past the end). After EOS none of this is used.
        t = self.talker
        parts = [_row(t.model.codec_embedding.weight, self.codes[0])]
        parts += [_row(t.code_predictor.model.codec_embedding[j - 1].weight, self.codes[j]) for j in range(1, 16)]
        row = _row(self.text_rows, torch.minimum(self.step, self.num_text_rows))
        self.x.copy_(torch.stack(parts).sum(0) + row)
        self.seen.index_fill_(0, g0.view(1), True)
        self.pos += 1
        self.step += 1


class GraphedStream:
    def __init__(self, backend: "GraphedBackend", slot: StaticFrame, rng: RandomStream, prefill_len: int):
        self.backend, self.slot, self.rng = backend, slot, rng
        self.prefill_len = prefill_len
        self.frame_index = 0
        self.closed = False

    @torch.inference_mode()
    def next_frame(self) -> np.ndarray:
        if self.closed:
            raise RuntimeError("stream is closed")
        slot = self.slot
        if self.prefill_len + self.frame_index + 1 > slot.capacity:
            raise RuntimeError(f"KV cache full at {slot.capacity} positions")
        slot.u.copy_(torch.from_numpy(self.rng.frame(self.frame_index)))
        self.backend.run_frame()
        self.frame_index += 1
        return np.array(slot.codes.tolist(), dtype=np.int64)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.backend.busy = False


class GraphedBackend:
    """Reference math, static KV cache, one CUDA graph per frame. One stream at a time (one slot)."""

    name = "reference-graphed"

    def __init__(self, talker: Talker, params: SamplingParams, capacity: int = 2048, max_text_rows: int = 512,
                 use_graph: bool | None = None):
        self.talker = talker
        self.slot = StaticFrame(talker, params, capacity, max_text_rows)
        device = talker.codec_head.weight.device
        self.use_graph = (device.type == "cuda") if use_graph is None else use_graph
        self.graph: torch.cuda.CUDAGraph | None = None
        self.busy = False

    @torch.inference_mode()
    def open_stream(self, prefill: torch.Tensor, text_rows: torch.Tensor, pad_row: torch.Tensor,
                    params: SamplingParams, rng: RandomStream, max_frames: int | None = None) -> GraphedStream:
        if params != self.slot.params:
            raise ValueError("this graphed backend was captured for other sampling parameters")
        if self.busy:
            raise RuntimeError("the graphed backend holds one stream at a time")
        slot = self.slot
        if len(text_rows) + 1 > len(slot.text_rows):
            raise ValueError(f"{len(text_rows)} text rows exceed the slot's {len(slot.text_rows) - 1}")
        if len(prefill) >= slot.capacity:
            raise ValueError(f"prefill of {len(prefill)} rows exceeds the cache ({slot.capacity})")
        # Rows 0..L-2 through the batched eager path into the static cache; row L-1 is frame 0's input.
        slot.cache.reset()
        if len(prefill) > 1:
            self.talker.forward_rows(prefill[:-1], slot.cache)
        slot.x.copy_(prefill[-1])
        slot.pos.fill_(len(prefill) - 1)
        slot.step.zero_()
        slot.seen.zero_()
        slot.text_rows[: len(text_rows)] = text_rows
        slot.text_rows[len(text_rows)] = pad_row
        slot.num_text_rows.fill_(len(text_rows))
        self.busy = True
        return GraphedStream(self, slot, rng, len(prefill))

    def run_frame(self) -> None:
        if not self.use_graph:
            self.slot.frame()
            return
        if self.graph is None:
            self.graph = self._capture()
        self.graph.replay()

    def _capture(self) -> torch.cuda.CUDAGraph:
        """Capture slot.frame() once, on a copy of the slot state (warm-up runs must not advance the stream)."""
        slot = self.slot
        saved = {name: getattr(slot, name).clone() for name in ("x", "pos", "step", "seen", "codes")}
        saved_k, saved_v = slot.cache.k.clone(), slot.cache.v.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._restore(saved, saved_k, saved_v)
                slot.frame()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        self._restore(saved, saved_k, saved_v)
        with torch.cuda.graph(graph):
            slot.frame()
        self._restore(saved, saved_k, saved_v)
        return graph

    def _restore(self, saved, saved_k, saved_v) -> None:
        for name, value in saved.items():
            getattr(self.slot, name).copy_(value)
        self.slot.cache.k.copy_(saved_k)
        self.slot.cache.v.copy_(saved_v)
