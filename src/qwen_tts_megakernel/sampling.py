"""The official sampling rules, written so that a GPU kernel can reproduce them draw for draw.

Talker (codebook 0), in the order Hugging Face's generate() applies them for the official model:
  1. repetition penalty over the set of codebook-0 tokens generated so far (positive logits / p, negative * p);
  2. suppress [vocab-1024, vocab) except EOS (only codes 0..2047 or EOS can come out);
  3. EOS is forbidden while fewer than 2 tokens have been generated (min_new_tokens=2);
  4. greedy: argmax (first index among equals); sampling: / temperature, keep logits >= the k-th largest
     (ties kept, like HF's TopKLogitsWarper), top-p like HF's TopPLogitsWarper, softmax, one draw.
Code predictor (codebooks 1..15): step 4 only, with its own temperature/top-k/top-p, no penalty.

One draw = inverse CDF with one uniform number u in [0, 1): candidates ordered by logit (descending, lower index
first among equals), the first whose running probability sum exceeds u * total wins. That is exactly a draw from
the softmax distribution, and it lets the reference backend and the CUDA kernel share random numbers.

Random numbers come from Philox4x32-10 (counter-based, like cuRAND's): key = the 64-bit seed, counter =
(frame index, draw index 0..15, 0, 0); u = top 24 bits of the first output word * 2^-24. Draw 0 of a frame is
codebook 0, draw j is codebook j.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

NUM_DRAWS_PER_FRAME = 16


class SamplingError(ValueError):
    """Sampling cannot go on: a sampling option is out of range, or the scores are not finite (NaN, +inf, all -inf)."""


@dataclass(frozen=True)
class OptionRange:
    """The values one sampling option may take."""

    low: float
    high: float
    integer: bool = False
    low_open: bool = False  # (low, high] instead of [low, high]

    def contains(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            return False
        if self.integer and not isinstance(value, (int, np.integer)):
            return False
        if not np.isfinite(value):
            return False
        return (self.low < value if self.low_open else self.low <= value) and value <= self.high

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        low = f"({self.low:g}" if self.low_open else f"[{self.low:g}"
        return f"{kind} in {low}, {self.high:g}]"


# The one place for sampling bounds: SamplingParams enforces them (so the Python API), the server validates requests
# with them before answering. They are what every backend runs -- the megakernel keeps at most 256 candidates after
# top-k (csrc/mk_common.cuh CAND_MAX), so top-k is on and at most 256 -- and what keeps the scores finite: logits
# times at most 1 / (0.5 * 0.01) stay far inside fp32, where a temperature near 0 overflows to inf and NaN.
SAMPLING_RANGES = {
    "temperature": OptionRange(0.01, 10.0),
    "top_k": OptionRange(1, 256, integer=True),
    "top_p": OptionRange(0.0, 1.0, low_open=True),
    "repetition_penalty": OptionRange(0.5, 2.0),
}
SAMPLING_RANGES.update({f"subtalker_{name}": SAMPLING_RANGES[name] for name in ("temperature", "top_k", "top_p")})


def check_sampling_option(name: str, value):
    """`value` if it is within SAMPLING_RANGES[name]; SamplingError naming the option and its range otherwise."""
    bounds = SAMPLING_RANGES[name]
    if not bounds.contains(value):
        shown = repr(value)
        raise SamplingError(f"{name} must be {bounds.describe()}, got {shown[:40]}{'...' if len(shown) > 40 else ''}")
    return value


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings for one stream (defaults: the checkpoints' generation_config.json; bounds:
    SAMPLING_RANGES)."""

    do_sample: bool = True
    temperature: float = 0.9
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.05
    subtalker_dosample: bool = True
    subtalker_temperature: float = 0.9
    subtalker_top_k: int = 50
    subtalker_top_p: float = 1.0

    def __post_init__(self) -> None:
        for name in SAMPLING_RANGES:
            check_sampling_option(name, getattr(self, name))


@dataclass(frozen=True)
class TalkerRules:
    """The token constraints of codebook 0, derived from the checkpoint's config."""

    vocab_size: int  # 3072
    eos_id: int  # 2150
    min_new_tokens: int = 2

    @property
    def suppress_start(self) -> int:
        return self.vocab_size - 1024


# ---------------------------------------------------------------------------------------------------------------
# Logit processing


def apply_repetition_penalty(logits: torch.Tensor, past_tokens: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF RepetitionPenaltyLogitsProcessor on a [V] vector: each distinct past token's logit is divided by the
    penalty if positive, multiplied by it otherwise."""
    if penalty == 1.0 or past_tokens.numel() == 0:
        return logits
    logits = logits.clone()
    idx = torch.unique(past_tokens.to(device=logits.device, dtype=torch.long))
    score = logits[idx]
    logits[idx] = torch.where(score < 0, score * penalty, score / penalty)
    return logits


def talker_logits(logits: torch.Tensor, past_tokens: torch.Tensor, step: int, params: SamplingParams,
                  rules: TalkerRules) -> torch.Tensor:
    """Rules 1-3 for codebook 0 on fp32 logits [V]; `step` = number of codebook-0 tokens generated so far."""
    logits = apply_repetition_penalty(logits.float(), past_tokens, params.repetition_penalty)
    logits = logits.clone()
    keep_eos = logits[rules.eos_id].clone()
    logits[rules.suppress_start:] = float("-inf")
    logits[rules.eos_id] = keep_eos
    if step < rules.min_new_tokens:
        logits[rules.eos_id] = float("-inf")
    return logits


def warp(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k (ties at the k-th value kept), then top-p, as HF's warpers do. [V] -> [V]."""
    scores = logits / temperature
    if 0 < top_k < scores.numel():
        kth = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, sorted_idx = torch.sort(scores, descending=False)
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cum <= (1 - top_p)
        remove_sorted[-1] = False  # min_tokens_to_keep = 1
        remove = torch.zeros_like(remove_sorted).scatter(0, sorted_idx, remove_sorted)
        scores = scores.masked_fill(remove, float("-inf"))
    return scores


def draw(scores: torch.Tensor, u: float) -> int:
    """One draw from softmax(scores) by inverse CDF with uniform u in [0, 1).

    Candidates are ordered by score descending (lower index first among equals); the winner is the first whose
    running sum of exp(score - max) exceeds u * total."""
    order = torch.sort(-scores.double(), stable=True).indices
    s = scores.double()[order]
    weights = torch.exp(s - s[0])
    cum = torch.cumsum(weights, dim=0)
    target = u * float(cum[-1])
    pos = int(torch.searchsorted(cum, torch.tensor([target], dtype=cum.dtype), right=True)[0])
    pos = min(pos, int(torch.isfinite(s).sum()) - 1)
    return int(order[pos])


def check_finite(scores: torch.Tensor) -> None:
    """SamplingError unless the best score is finite: a NaN anywhere, a +inf, or nothing left to choose from."""
    best = float(scores.max())  # max() propagates NaN
    if not np.isfinite(best):
        raise SamplingError(f"the scores are not finite (best score {best}): no code can be sampled")


def choose(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int, top_p: float,
           u: float) -> int:
    """Greedy argmax or one sampled draw from already-constrained fp32 logits [V]. Raises SamplingError (never
    returns an out-of-range code) when the scores are not finite."""
    if not do_sample:
        check_finite(logits)
        return int(torch.argmax(logits))
    scores = warp(logits, temperature, top_k, top_p)
    check_finite(scores)
    return draw(scores, u)


def sample_talker(logits: torch.Tensor, past_tokens: torch.Tensor, step: int, params: SamplingParams,
                  rules: TalkerRules, u: float) -> int:
    """Codebook 0 from the talker's logits [V]."""
    constrained = talker_logits(logits, past_tokens, step, params, rules)
    return choose(constrained, params.do_sample, params.temperature, params.top_k, params.top_p, u)


def sample_code_predictor(logits: torch.Tensor, params: SamplingParams, u: float) -> int:
    """Codebook j >= 1 from one code-predictor head's logits [2048]."""
    return choose(logits.float(), params.subtalker_dosample, params.subtalker_temperature,
                  params.subtalker_top_k, params.subtalker_top_p, u)


# ---------------------------------------------------------------------------------------------------------------
# Counter-based random numbers (Philox4x32-10)

_PHILOX_M0 = np.uint64(0xD2511F53)
_PHILOX_M1 = np.uint64(0xCD9E8D57)
_PHILOX_W0 = np.uint32(0x9E3779B9)
_PHILOX_W1 = np.uint32(0xBB67AE85)
_MASK32 = np.uint64(0xFFFFFFFF)


def philox4x32(counter: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    """Philox4x32 with 10 rounds on counters [N, 4] (uint32) under a 2-word key; returns [N, 4] uint32."""
    c = np.asarray(counter, dtype=np.uint32).reshape(-1, 4).astype(np.uint64)
    k0, k1 = np.uint64(key[0] & 0xFFFFFFFF), np.uint64(key[1] & 0xFFFFFFFF)
    for round_index in range(10):
        if round_index:
            k0 = (k0 + np.uint64(_PHILOX_W0)) & _MASK32
            k1 = (k1 + np.uint64(_PHILOX_W1)) & _MASK32
        p0 = _PHILOX_M0 * c[:, 0]
        p1 = _PHILOX_M1 * c[:, 2]
        hi0, lo0 = p0 >> np.uint64(32), p0 & _MASK32
        hi1, lo1 = p1 >> np.uint64(32), p1 & _MASK32
        c = np.stack([hi1 ^ c[:, 1] ^ k0, lo1, hi0 ^ c[:, 3] ^ k1, lo0], axis=1)
    return c.astype(np.uint32)


def philox_uniforms(seed: int, frame: int, count: int = NUM_DRAWS_PER_FRAME) -> np.ndarray:
    """The `count` uniforms in [0, 1) used by frame `frame` of a stream seeded with `seed` (float64, exact 24-bit)."""
    seed &= (1 << 64) - 1
    counters = np.zeros((count, 4), dtype=np.uint32)
    counters[:, 0] = frame & 0xFFFFFFFF
    counters[:, 1] = np.arange(count, dtype=np.uint32)
    words = philox4x32(counters, (seed & 0xFFFFFFFF, seed >> 32))[:, 0]
    return (words >> np.uint32(8)).astype(np.float64) * (1.0 / (1 << 24))


class RandomStream:
    """Uniform numbers for one stream: Philox by (seed, frame, draw), or replayed from an explicit table."""

    def __init__(self, seed: int, table: np.ndarray | None = None):
        self.seed = int(seed)
        self.table = None if table is None else np.asarray(table, dtype=np.float64).reshape(-1, NUM_DRAWS_PER_FRAME)

    def frame(self, index: int) -> np.ndarray:
        """The 16 uniforms of frame `index`: [0] for codebook 0, [j] for codebook j."""
        if self.table is not None:
            if index >= len(self.table):
                raise IndexError(f"random table has {len(self.table)} frames, frame {index} requested")
            return self.table[index]
        return philox_uniforms(self.seed, index)
