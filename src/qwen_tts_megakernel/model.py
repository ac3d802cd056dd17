"""The reference talker and code predictor in plain PyTorch: the spec every faster backend is checked against.

Both are Qwen3 decoder stacks (pre-norm, GQA, QK-norm before RoPE, SwiGLU, NeoX rotate-half RoPE). Module and
parameter names mirror the official checkpoint's tensor names (minus the leading "talker."), so an official
state dict loads without renaming. Shapes below: H = talker hidden, D = head_dim, L = rows, P = cache length.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, TransformerConfig
from .layers import RMSNorm, apply_rope, rope_cos_sin


class KVCache:
    """Keys and values of every layer for one sequence: k, v [layers, kv_heads, capacity, D]; `length` filled.
    With `batch` (sequences that share their positions, e.g. (B,)): k, v [layers, *batch, kv_heads, capacity, D]."""

    def __init__(self, cfg: TransformerConfig, capacity: int, device, dtype, batch: tuple[int, ...] = ()):
        shape = (cfg.num_hidden_layers, *batch, cfg.num_key_value_heads, capacity, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[-2]

    def reset(self) -> None:
        self.length = 0


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.q_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.kv_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.kv_dim, bias=False)
        self.o_proj = nn.Linear(cfg.q_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, layer: int):
        """x [L, H] at cache positions cache.length .. +L-1 -> [L, H]; appends this layer's K/V to the cache."""
        cfg, n = self.cfg, x.shape[0]
        q = self.q_norm(self.q_proj(x).view(n, cfg.num_attention_heads, cfg.head_dim)).transpose(0, 1)
        k = self.k_norm(self.k_proj(x).view(n, cfg.num_key_value_heads, cfg.head_dim)).transpose(0, 1)
        v = self.v_proj(x).view(n, cfg.num_key_value_heads, cfg.head_dim).transpose(0, 1)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return self.o_proj(self.attend(q, k, v, cache, layer))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, layer: int) -> torch.Tensor:
        """q [..., heads, n, D], k and v [..., kv_heads, n, D] (after QK-norm and RoPE) at cache positions
        cache.length .. +n-1 -> [..., n, q_dim]; writes k and v into the cache (the caller advances its length).
        Leading dims: a batched cache's (KVCache `batch`), or none."""
        cfg, n = self.cfg, q.shape[-2]
        start, end = cache.length, cache.length + n
        cache.k[layer][..., start:end, :] = k
        cache.v[layer][..., start:end, :] = v
        keys, values = cache.k[layer][..., :end, :], cache.v[layer][..., :end, :]
        group = cfg.num_attention_heads // cfg.num_key_value_heads
        keys = keys.repeat_interleave(group, dim=-3)
        values = values.repeat_interleave(group, dim=-3)
        # Causal over the new rows; every cached row before them is visible.
        mask = torch.ones(n, end, dtype=torch.bool, device=q.device).tril(diagonal=start)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=1.0 / math.sqrt(cfg.head_dim))
        return out.transpose(-3, -2).flatten(-2)


class MLP(nn.Module):
    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, ffn, bias=False)
        self.up_proj = nn.Linear(hidden, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, cache: KVCache, layer: int):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderStack(nn.Module):
    """Qwen3 layers + final norm. forward: rows [L, H] -> post-norm hidden [L, H], advancing the cache by L."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        n = x.shape[0]
        if cache.length + n > cache.capacity:
            raise RuntimeError(f"KV cache full: {cache.length} + {n} rows exceed its capacity {cache.capacity}")
        positions = torch.arange(cache.length, cache.length + n, device=x.device)
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i)
        cache.length += n
        return self.norm(x)


class TextProjection(nn.Module):
    """linear_fc2(silu(linear_fc1(x))), both with bias: text_hidden -> text_hidden -> H."""

    def __init__(self, text_hidden: int, hidden: int):
        super().__init__()
        self.linear_fc1 = nn.Linear(text_hidden, text_hidden, bias=True)
        self.linear_fc2 = nn.Linear(text_hidden, hidden, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(F.silu(self.linear_fc1(x)))


class TalkerTrunk(DecoderStack):
    """The talker's decoder stack plus its two input tables (state-dict prefix "talker.model")."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.codec_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.text_embedding = nn.Embedding(cfg.text_vocab_size, cfg.text_hidden_size)


class CodePredictorTrunk(DecoderStack):
    """The code predictor's stack plus its 15 input tables [2048, H_talker] (prefix "talker.code_predictor.model")."""

    def __init__(self, cfg, talker_hidden: int):
        super().__init__(cfg)
        self.codec_embedding = nn.ModuleList(
            nn.Embedding(cfg.vocab_size, talker_hidden) for _ in range(cfg.num_code_groups - 1))


class CodePredictor(nn.Module):
    """Fills codebooks 1..15 of a frame from the talker's hidden state and codebook 0."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        cp = config.code_predictor
        self.cfg = cp
        self.model = CodePredictorTrunk(cp, config.talker.hidden_size)
        self.lm_head = nn.ModuleList(nn.Linear(cp.hidden_size, cp.vocab_size, bias=False)
                                     for _ in range(cp.num_code_groups - 1))
        if config.has_mtp_projection:
            self.small_to_mtp_projection = nn.Linear(config.talker.hidden_size, cp.hidden_size, bias=True)
        else:
            self.small_to_mtp_projection = nn.Identity()

    def new_cache(self, device, dtype) -> KVCache:
        return KVCache(self.cfg, self.cfg.num_code_groups, device, dtype)

    def logits(self, rows: torch.Tensor, cache: KVCache, head: int) -> torch.Tensor:
        """rows [n, H_talker] (projected here) -> fp32 logits [2048] of head `head` on the last row."""
        hidden = self.model(self.small_to_mtp_projection(rows), cache)
        return self.lm_head[head](hidden[-1]).float()

    def input_row(self, j: int, code: int) -> torch.Tensor:
        """The input of step j >= 2: embedding of codebook j-1's code, [1, H_talker]."""
        table = self.model.codec_embedding[j - 2].weight
        return table[code].unsqueeze(0)


class Talker(nn.Module):
    """The talker (state-dict prefix "talker."): trunk, text projection, codec head and code predictor."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        t = config.talker
        self.model = TalkerTrunk(t)
        self.text_projection = TextProjection(t.text_hidden_size, t.hidden_size)
        self.codec_head = nn.Linear(t.hidden_size, t.vocab_size, bias=False)
        self.code_predictor = CodePredictor(config)

    @classmethod
    def from_state_dict(cls, config: ModelConfig, weights: dict[str, torch.Tensor], device=None,
                        dtype: torch.dtype = torch.float32) -> "Talker":
        """Build from official tensors (keys "talker.*"; others are ignored); shapes were checked on load."""
        with torch.device("meta"):
            talker = cls(config)
        own = {k[len("talker."):]: v for k, v in weights.items() if k.startswith("talker.")}
        talker.load_state_dict(own, strict=True, assign=True)
        return talker.to(device=device, dtype=dtype).eval()

    def new_cache(self, capacity: int) -> KVCache:
        p = self.codec_head.weight
        return KVCache(self.config.talker, capacity, p.device, p.dtype)

    # Input rows (the same math as PromptEmbedder, over this talker's tables) ----------------------------------

    def embedder(self) -> "PromptEmbedder":
        return PromptEmbedder.of_talker(self)

    def text_rows(self, ids: list[int]) -> torch.Tensor:
        return self.embedder().text_rows(ids)

    def embed_rows(self, text_ids: list[int | None], codec_ids: list[int | None]) -> torch.Tensor:
        return self.embedder().embed_rows(text_ids, codec_ids)

    def embed_prompt(self, prompt) -> torch.Tensor:
        return self.embedder().embed_prompt(prompt)

    def frame_embedding(self, codes: list[int]) -> torch.Tensor:
        """F(frame) = C(g0) + sum_j cp_emb[j-1][g_j]: [H], summed in codebook order."""
        parts = [self.model.codec_embedding.weight[codes[0]]]
        parts += [self.code_predictor.model.codec_embedding[j - 1].weight[codes[j]] for j in range(1, len(codes))]
        return torch.stack(parts).sum(0)

    # Forward passes ---------------------------------------------------------------------------------------------

    def forward_rows(self, rows: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """rows [L, H] -> (post-norm hidden of the last row [H], fp32 codec logits of the last row [3072])."""
        hidden = self.model(rows, cache)[-1]
        return hidden, self.codec_head(hidden).float()


class PromptEmbedder(nn.Module):
    """Turns a prompt's ids into talker input rows: the talker's two input tables and its text projection, and
    nothing else, so a backend that keeps its own copy of the talker (the megakernel) needs only these here.

    Built from a Talker (sharing its modules) or from the official tensors alone (from_state_dict)."""

    def __init__(self, text_embedding: nn.Embedding, text_projection: TextProjection, codec_embedding: nn.Embedding,
                 frame_tables: nn.ModuleList | None = None):
        super().__init__()
        self.text_embedding, self.text_projection, self.codec_embedding = text_embedding, text_projection, codec_embedding
        # Base models: the code predictor's 15 input tables, for F(reference frame) rows of in-context voices.
        self.frame_tables = frame_tables

    @classmethod
    def of_talker(cls, talker: "Talker") -> "PromptEmbedder":
        return cls(talker.model.text_embedding, talker.text_projection, talker.model.codec_embedding,
                   talker.code_predictor.model.codec_embedding)

    @classmethod
    def from_state_dict(cls, config: ModelConfig, weights: dict[str, torch.Tensor], device=None,
                        dtype: torch.dtype = torch.float32) -> "PromptEmbedder":
        """`dtype`: what the rows are computed in. The text table (151936 x 2048, the one large tensor) keeps the
        checkpoint's dtype when that is narrower, its rows widened on lookup (exact), so an fp32 embedder of a bf16
        checkpoint computes what an fp32 talker of the same weights does without a 1.2 GB fp32 copy of it."""
        t = config.talker
        with torch.device("meta"):
            embedder = cls(nn.Embedding(t.text_vocab_size, t.text_hidden_size),
                           TextProjection(t.text_hidden_size, t.hidden_size), nn.Embedding(t.vocab_size, t.hidden_size))
        names = {"text_embedding.weight": "talker.model.text_embedding.weight",
                 "codec_embedding.weight": "talker.model.codec_embedding.weight"}
        names |= {f"text_projection.{k}": f"talker.text_projection.{k}"
                  for k in ("linear_fc1.weight", "linear_fc1.bias", "linear_fc2.weight", "linear_fc2.bias")}
        if config.model_type == "base":
            cp = config.code_predictor
            with torch.device("meta"):
                embedder.frame_tables = nn.ModuleList(nn.Embedding(cp.vocab_size, t.hidden_size)
                                                      for _ in range(cp.num_code_groups - 1))
            names |= {f"frame_tables.{j}.weight": f"talker.code_predictor.model.codec_embedding.{j}.weight"
                      for j in range(cp.num_code_groups - 1)}
        embedder.load_state_dict({ours: weights[theirs] for ours, theirs in names.items()}, strict=True, assign=True)
        stored = embedder.text_embedding.weight.dtype
        embedder = embedder.to(device=device, dtype=dtype).eval()
        if stored.is_floating_point and torch.finfo(stored).bits < torch.finfo(dtype).bits:
            embedder.text_embedding.to(dtype=stored)
        return embedder

    @property
    def device(self) -> torch.device:
        return self.codec_embedding.weight.device

    def text_rows(self, ids: list[int]) -> torch.Tensor:
        """T(ids) = text_projection(text_embedding(ids)): [n, H]."""
        idx = torch.tensor(ids, dtype=torch.long, device=self.device)
        return self.text_projection(self.text_embedding(idx).to(self.codec_embedding.weight.dtype))

    def codec_rows(self, ids: list[int]) -> torch.Tensor:
        """C(ids) = codec_embedding(ids): [n, H]."""
        return self.codec_embedding(torch.tensor(ids, dtype=torch.long, device=self.device))

    def embed_prompt(self, prompt) -> torch.Tensor:
        """Prefill rows [L, H] of a prompt.Prompt: embed_rows of its ids, plus the codec terms that are vectors (a
        cloned voice's x-vector row, F(reference frame) rows of the in-context layout)."""
        rows = self.embed_rows(prompt.text_ids, prompt.codec_ids)
        if prompt.speaker_embedding is not None:
            rows[prompt.speaker_row] += prompt.speaker_embedding.to(device=rows.device, dtype=rows.dtype)
        if prompt.ref_codes is not None:
            start = prompt.ref_row
            rows[start:start + len(prompt.ref_codes)] += self.frame_rows(prompt.ref_codes)
        return rows

    def frame_rows(self, codes) -> torch.Tensor:
        """F(frame) = C(g0) + sum_j cp_emb[j-1][g_j] for every frame of codes [R, 16]: [R, H], summed in codebook
        order (needs frame_tables: Base models)."""
        if self.frame_tables is None:
            raise ValueError("reference frames need the code predictor's input tables (Base models only)")
        idx = torch.as_tensor(codes, dtype=torch.long, device=self.device)
        parts = [self.codec_embedding(idx[:, 0])]
        parts += [self.frame_tables[j - 1](idx[:, j]) for j in range(1, idx.shape[1])]
        return torch.stack(parts, dim=1).sum(1)

    def embed_rows(self, text_ids: list[int | None], codec_ids: list[int | None]) -> torch.Tensor:
        """Prefill rows [L, H]: T(text) + C(codec), a missing id contributing nothing."""
        w = self.codec_embedding.weight
        rows = torch.zeros(len(text_ids), w.shape[1], device=w.device, dtype=w.dtype)
        t_pos = [i for i, t in enumerate(text_ids) if t is not None]
        c_pos = [i for i, c in enumerate(codec_ids) if c is not None]
        if t_pos:
            rows[t_pos] = self.text_rows([text_ids[i] for i in t_pos])
        if c_pos:
            rows[c_pos] = rows[c_pos] + self.codec_rows([codec_ids[i] for i in c_pos])
        return rows
