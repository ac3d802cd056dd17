"""The fp32 reference of many streams at once: validate --batch's oracle.

`reference_run` (validate.py) computes one stream alone; at 64 streams x 32 frames it is thousands of small kernel
launches per frame and takes minutes on a GPU. `batched_reference_run` computes the same frames for all streams
together: the matrix products of model.py's talker and code predictor take every stream's row at once, while each
stream's talker attention runs alone over its own KV cache (model.Attention.attend, the reference's own code), its
codes are drawn by sampling.py on the CPU, and its rows, history and uniforms are its own. It returns what
reference_run returns, per stream.

It is an oracle, so a stream's values must not depend on the streams beside it. Every product has `rows` rows,
whatever the number of streams and however many are still running (rows of streams that ended or do not exist are
zeros), so each product always has the same shape and a product row depends on its input row alone; the talker's
attention and all sampling are per stream, the code predictor's attention (the same positions in every stream) is one
call whose batch elements are computed apart; RoPE comes from one table indexed by position. A stream's results are therefore the same
bits in any batch of the same `rows`, as long as the BLAS picks its kernel by shape alone, which CPU BLAS and cuBLAS
do (tests/test_batch_reference.py checks it on the CPU; on the GPU it rests on that). They are not the same bits as
reference_run's: a product of 1 row and one of `rows` rows sum in different orders (the BLAS picks its kernel by
shape), so the two agree to fp32 rounding (about 1e-6 relative), not bit for bit; validate checks a sample of
streams against reference_run on every run.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from ..layers import apply_rope, rope_cos_sin
from ..model import KVCache, Talker
from ..sampling import SamplingParams, TalkerRules, sample_code_predictor, sample_talker

# One stream: (prefill rows [L, H], text rows [T, H], pad row [H], uniform table [frames, 16]).
StreamInput = tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]


def _layer(layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Callable) -> torch.Tensor:
    """model.DecoderLayer on stacked rows x [R, n, H]: attend(layer's Attention, q [R, heads, n, D], k, v
    [R, kv_heads, n, D]) -> [R, n, q_dim] is the attention after QK-norm and RoPE (cos, sin broadcast over q)."""
    a, cfg = layer.self_attn, layer.self_attn.cfg
    rows, n = x.shape[:2]
    h = layer.input_layernorm(x)
    q = a.q_norm(a.q_proj(h).view(rows, n, cfg.num_attention_heads, cfg.head_dim)).transpose(1, 2)
    k = a.k_norm(a.k_proj(h).view(rows, n, cfg.num_key_value_heads, cfg.head_dim)).transpose(1, 2)
    v = a.v_proj(h).view(rows, n, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    x = x + a.o_proj(attend(a, q, k, v))
    return x + layer.mlp(layer.post_attention_layernorm(x))


class BatchedTalker:
    """One talker step for every live stream: rows [R, H] -> (post-norm hidden [R, H], fp32 logits [R, V])."""

    def __init__(self, talker: Talker, caches: Sequence[KVCache], max_positions: int):
        t = talker.config.talker
        p = talker.codec_head.weight
        self.talker, self.caches = talker, caches
        positions = torch.arange(max_positions, device=p.device)
        self.cos, self.sin = rope_cos_sin(positions, t.head_dim, t.rope_theta, p.dtype)

    def step(self, x: torch.Tensor, live: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """x [R, H]: row i is stream i's input (zeros where i is not live); live: the streams to step."""
        model = self.talker.model
        pos = torch.tensor([self.caches[i].length if i in live else 0 for i in range(len(x))], device=x.device)
        cos, sin = self.cos[pos][:, None, None, :], self.sin[pos][:, None, None, :]
        h = x.unsqueeze(1)
        for index, layer in enumerate(model.layers):
            def attend(a, q, k, v, index=index):
                out = torch.zeros(q.shape[0], 1, a.cfg.q_dim, device=q.device, dtype=q.dtype)
                for i in live:
                    out[i] = a.attend(q[i], k[i], v[i], self.caches[i], index)
                return out
            h = _layer(layer, h, cos, sin, attend)
        for i in live:
            self.caches[i].length += 1
        hidden = model.norm(h)[:, 0]
        return hidden, self.talker.codec_head(hidden).float()


class BatchedCodePredictor:
    """The code predictor's 15 steps for R rows at once (its positions are the same in every stream)."""

    def __init__(self, talker: Talker, rows: int):
        self.cp, self.rows = talker.code_predictor, rows
        p = talker.codec_head.weight
        self.device, self.dtype = p.device, p.dtype

    def logits(self, x: torch.Tensor, cache: KVCache, head: int) -> torch.Tensor:
        """x [R, n, H_talker] -> fp32 logits [R, 2048] of head `head` on the last row (CodePredictor.logits)."""
        trunk, cfg = self.cp.model, self.cp.cfg
        h = self.cp.small_to_mtp_projection(x)
        positions = torch.arange(cache.length, cache.length + x.shape[1], device=x.device)
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, h.dtype)
        for index, layer in enumerate(trunk.layers):
            h = _layer(layer, h, cos, sin, lambda a, q, k, v, index=index: a.attend(q, k, v, cache, index))
        cache.length += x.shape[1]
        return self.cp.lm_head[head](trunk.norm(h)[:, -1]).float()

    def codes(self, first: torch.Tensor, live: Sequence[int], u: Sequence[np.ndarray | None],
              params: SamplingParams) -> np.ndarray:
        """Codebooks 1..15 of the live rows [R, 16] (column 0 left 0). first [R, 2, H]: (talker hidden,
        codebook-0 embedding) per row, zeros where the row is not live; u[i]: row i's 16 uniforms."""
        cfg = self.cp.cfg
        cache = KVCache(cfg, cfg.num_code_groups, self.device, self.dtype, batch=(self.rows,))
        codes = np.zeros((self.rows, cfg.num_code_groups), dtype=np.int64)
        idle = [i for i in range(self.rows) if i not in live]
        x = first
        for j in range(1, cfg.num_code_groups):
            logits = self.logits(x, cache, head=j - 1).cpu()
            for i in live:
                codes[i, j] = sample_code_predictor(logits[i], params, float(u[i][j]))
            if j + 1 < cfg.num_code_groups:
                table = self.cp.model.codec_embedding[j - 1].weight
                x = table[torch.as_tensor(codes[:, j], device=self.device)].unsqueeze(1)
                x[idle] = 0
        return codes


@torch.inference_mode()
def batched_reference_run(talker: Talker, streams: Sequence[StreamInput], params: SamplingParams, frames: int,
                          rows: int | None = None, progress: Callable[[int], None] | None = None):
    """reference_run (validate.py, free-running) of every stream, stepped together. Returns per stream (codes
    [n, 16], hidden [n, H], logits [n, V]) on the CPU; a stream stops after its EOS frame. rows: the rows of every
    product (>= len(streams); default len(streams)). progress(k) is called after frame k."""
    n = len(streams)
    rows = n if rows is None else rows
    if not 1 <= n <= rows:
        raise ValueError(f"{n} streams do not fit {rows} product rows")
    cfg = talker.config
    rules = TalkerRules(vocab_size=cfg.talker.vocab_size, eos_id=cfg.ids.codec_eos)
    p = talker.codec_head.weight
    dev, dt, H = p.device, p.dtype, cfg.talker.hidden_size
    caches = [talker.new_cache(len(s[0]) + frames) for s in streams]
    for (prefill, *_), cache in zip(streams, caches):
        if len(prefill) > 1:  # rows 0..L-2 fill the cache; row L-1 is frame 0's input (backends/base.py)
            talker.model(prefill[:-1].to(dev, dt), cache)
    step = BatchedTalker(talker, caches, max(len(s[0]) for s in streams) + frames)
    predictor = BatchedCodePredictor(talker, rows)
    past: list[list[int]] = [[] for _ in range(n)]
    last: list[list[int] | None] = [None] * n
    out = [([], [], []) for _ in range(n)]
    live = list(range(n))
    for k in range(frames):
        if not live:
            break
        x = torch.zeros(rows, H, device=dev, dtype=dt)
        for i in live:
            prefill, text_rows, pad_row, _ = streams[i]
            if k == 0:
                x[i] = prefill[-1].to(dev, dt)
            else:
                text = text_rows[k - 1] if k - 1 < len(text_rows) else pad_row
                x[i] = talker.frame_embedding(last[i]) + text.to(dev, dt)
        hidden, logits = step.step(x, live)
        hidden_cpu, logits_cpu = hidden.float().cpu(), logits.cpu()
        u = [streams[i][3][k] if i < n else None for i in range(rows)]
        g0 = np.zeros(rows, dtype=np.int64)
        for i in live:
            g0[i] = sample_talker(logits_cpu[i], torch.tensor(past[i], dtype=torch.long), k, params, rules,
                                  float(u[i][0]))
            out[i][1].append(hidden_cpu[i])
            out[i][2].append(logits_cpu[i])
        for i in live:
            if g0[i] == rules.eos_id:
                out[i][0].append([int(g0[i])] + [0] * 15)
        live = [i for i in live if g0[i] != rules.eos_id]
        if live:
            first = torch.stack([hidden, talker.model.codec_embedding.weight[torch.as_tensor(g0, device=dev)]], 1)
            first[[i for i in range(rows) if i not in live]] = 0
            codes = predictor.codes(first, live, u, params)
            for i in live:
                codes[i, 0] = g0[i]
                out[i][0].append(codes[i].tolist())
                past[i].append(int(g0[i]))
                last[i] = codes[i].tolist()
        if progress is not None:
            progress(k)
    return [(np.array(c, dtype=np.int64).reshape(-1, 16), torch.stack(h), torch.stack(lg)) for c, h, lg in out]
