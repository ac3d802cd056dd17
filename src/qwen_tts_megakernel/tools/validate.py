"""qwen-tts-mk validate: the megakernel against the reference backend on the GPU, with the same weights.

`--batch 1,2,7,16,64` checks batched launches (streams at mixed positions, prompts of 20..--max-pos rows, 1500 by
default, --frames 32 frames each): every stream of the largest batch against the reference (hidden / logits error,
teacher-forced agreement), free-running codes under shared random numbers, and batch invariance: every stream's codes
in every batch equal its solo run on every frame. Batch sizes go up to the kernel's MAX_BATCH. The fp32 reference of
all streams is one batched run (tools/batch_reference.py: a stream's values do not depend on its batch), checked
against the per-stream reference_run on a sample of streams (first, last and two between). Progress lines name each
stage with the seconds since the start; the JSON report holds each stage's wall time (stage_seconds).
Without --batch, one stream is checked as below.

Reports (table + JSON; exit status 1 when a bound fails):
  * talker post-norm hidden and logits, relative error ||mk - ref|| / ||ref|| per frame (bound 1e-2, bf16);
  * teacher-forced agreement of g0 and of g1..g15: both sides see the reference's codes as history and the same
    uniforms; the megakernel's own choices are compared with the reference's (bound >= 99%);
  * free-running codes under shared random numbers: the first frame where the two code streams differ;
  * A/B: perturbing the kernel's hidden state must change the codes (guards against a kernel whose output is
    ignored).
Weights: --model M (a checkpoint), or --random-weights 0.6b|1.7b (random tensors of the real shapes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..precision import fp32_precision
from ..sampling import RandomStream, SamplingParams, TalkerRules, philox_uniforms, sample_code_predictor, sample_talker
from .batch_reference import batched_reference_run

HIDDEN_BOUND = 1e-2
AGREE_BOUND = 0.99
# The batched reference against reference_run (tools/batch_reference.py): fp32 rounding apart, the same values.
ORACLE_BOUND = 1e-4
ORACLE_AGREE = 0.999
ORACLE_SAMPLE = 4  # streams of a --batch run checked against reference_run
MAX_POS = 1500  # --batch: the longest prompt (rows); prompts spread over PROMPT_MIN..MAX_POS
PROMPT_MIN = 20
FRAMES_BATCH = 32  # --batch: default frames per stream


# ---------------------------------------------------------------------------------------------------------------
# Random weights of the real shapes


def random_config(size: str = "0.6b"):
    """A ModelConfig with the real talker / code-predictor shapes (text path kept tiny: it is not used here)."""
    from ..config import CodePredictorConfig, ModelConfig, SpecialIds, TalkerConfig

    hidden, ffn = {"0.6b": (1024, 3072), "1.7b": (2048, 6144)}[size]
    cp = CodePredictorConfig.from_dict(dict(
        vocab_size=2048, hidden_size=1024, intermediate_size=3072, num_hidden_layers=5, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0, num_code_groups=16))
    talker = TalkerConfig.from_dict(dict(
        vocab_size=3072, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0, num_code_groups=16,
        text_vocab_size=8, text_hidden_size=32))
    return ModelConfig(model_type="custom_voice", model_size="0b6" if size == "0.6b" else "1b7", talker=talker,
                       code_predictor=cp, codec=None, ids=SpecialIds())


def random_weights(config, seed: int = 0, device="cpu") -> dict[str, torch.Tensor]:
    """Official tensor names, bf16, scaled like a trained model's (linear std ~ 1/sqrt(fan_in), norms ~ 1)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    out: dict[str, torch.Tensor] = {}

    def lin(name, o, i, scale=1.0):
        out[name] = (torch.randn(o, i, generator=g) * (scale / math.sqrt(i))).to(torch.bfloat16)

    def norm(name, n):
        out[name] = (1.0 + 0.1 * torch.randn(n, generator=g)).to(torch.bfloat16)

    def emb(name, n, d):
        out[name] = (0.05 * torch.randn(n, d, generator=g)).to(torch.bfloat16)

    def stack(prefix, c):
        for i in range(c.num_hidden_layers):
            p = f"{prefix}.layers.{i}."
            lin(p + "self_attn.q_proj.weight", c.q_dim, c.hidden_size)
            lin(p + "self_attn.k_proj.weight", c.kv_dim, c.hidden_size)
            lin(p + "self_attn.v_proj.weight", c.kv_dim, c.hidden_size)
            lin(p + "self_attn.o_proj.weight", c.hidden_size, c.q_dim, 0.5)
            norm(p + "self_attn.q_norm.weight", c.head_dim)
            norm(p + "self_attn.k_norm.weight", c.head_dim)
            norm(p + "input_layernorm.weight", c.hidden_size)
            norm(p + "post_attention_layernorm.weight", c.hidden_size)
            lin(p + "mlp.gate_proj.weight", c.intermediate_size, c.hidden_size)
            lin(p + "mlp.up_proj.weight", c.intermediate_size, c.hidden_size)
            lin(p + "mlp.down_proj.weight", c.hidden_size, c.intermediate_size, 0.5)
        norm(f"{prefix}.norm.weight", c.hidden_size)

    t, c = config.talker, config.code_predictor
    stack("talker.model", t)
    emb("talker.model.codec_embedding.weight", t.vocab_size, t.hidden_size)
    emb("talker.model.text_embedding.weight", t.text_vocab_size, t.text_hidden_size)
    lin("talker.text_projection.linear_fc1.weight", t.text_hidden_size, t.text_hidden_size)
    out["talker.text_projection.linear_fc1.bias"] = torch.zeros(t.text_hidden_size, dtype=torch.bfloat16)
    lin("talker.text_projection.linear_fc2.weight", t.hidden_size, t.text_hidden_size)
    out["talker.text_projection.linear_fc2.bias"] = torch.zeros(t.hidden_size, dtype=torch.bfloat16)
    # Heads scaled up so the sampling distributions are peaked like a trained model's, not flat.
    lin("talker.codec_head.weight", t.vocab_size, t.hidden_size, 4.0)
    stack("talker.code_predictor.model", c)
    for j in range(c.num_code_groups - 1):
        emb(f"talker.code_predictor.model.codec_embedding.{j}.weight", c.vocab_size, t.hidden_size)
        lin(f"talker.code_predictor.lm_head.{j}.weight", c.vocab_size, c.hidden_size, 4.0)
    if config.has_mtp_projection:
        lin("talker.code_predictor.small_to_mtp_projection.weight", c.hidden_size, t.hidden_size)
        out["talker.code_predictor.small_to_mtp_projection.bias"] = (
            0.02 * torch.randn(c.hidden_size, generator=g)).to(torch.bfloat16)
    return {k: v.to(device) for k, v in out.items()}


def random_prompt(config, n_prefill: int = 12, n_text: int = 4, seed: int = 1, device="cpu"):
    """Prefill rows [L,H], text rows [T,H] and a pad row, random with embedding-like scale."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    H = config.talker.hidden_size
    rows = 0.05 * torch.randn(n_prefill, H, generator=g)
    text = 0.05 * torch.randn(n_text, H, generator=g)
    pad = 0.05 * torch.randn(H, generator=g)
    return rows.to(device), text.to(device), pad.to(device)


def uniform_table(seed: int, frames: int) -> np.ndarray:
    return np.stack([philox_uniforms(seed, k) for k in range(frames)])


# ---------------------------------------------------------------------------------------------------------------
# Reference runs (teacher forcing capable)


@torch.inference_mode()
def reference_run(talker, prefill, text_rows, pad_row, params: SamplingParams, table: np.ndarray, frames: int,
                  forced: np.ndarray | None = None):
    """Frames of the reference talker + code predictor. Returns (own codes [n,16], hidden [n,H], logits [n,V]).

    With `forced`, the history fed back (next inputs, penalty set, predictor inputs) is forced[k] instead of the
    sampled codes; the sampled ("own") codes are still what is returned."""
    cfg = talker.config
    rules = TalkerRules(vocab_size=cfg.talker.vocab_size, eos_id=cfg.ids.codec_eos)
    dev = talker.codec_head.weight.device
    dt = talker.codec_head.weight.dtype
    cache = talker.new_cache(len(prefill) + frames + 1)
    past: list[int] = []
    last = None
    codes_out, hid_out, log_out = [], [], []
    cp = talker.code_predictor
    for k in range(frames):
        if k == 0:
            rows = prefill.to(dev, dt)
        else:
            text = text_rows[k - 1] if k - 1 < len(text_rows) else pad_row
            rows = (talker.frame_embedding(last) + text.to(dev, dt)).unsqueeze(0)
        hidden, logits = talker.forward_rows(rows, cache)
        hid_out.append(hidden.float().cpu())
        log_out.append(logits.float().cpu())
        u = table[k]
        g0 = sample_talker(logits.cpu(), torch.tensor(past, dtype=torch.long), k, params, rules, float(u[0]))
        own = [g0] + [0] * 15
        used = list(own)
        if forced is not None:
            used[0] = int(forced[k][0])
        if used[0] == rules.eos_id:
            codes_out.append(own)
            break
        cp_cache = cp.new_cache(dev, dt)
        crow = torch.stack([hidden, talker.model.codec_embedding.weight[used[0]]])
        for j in range(1, 16):
            lj = cp.logits(crow, cp_cache, head=j - 1)
            own[j] = sample_code_predictor(lj.cpu(), params, float(u[j]))
            used[j] = int(forced[k][j]) if forced is not None else own[j]
            if j < 15:
                crow = cp.input_row(j + 1, used[j])
        past.append(used[0])
        last = used
        codes_out.append(own)
    return np.array(codes_out, dtype=np.int64), torch.stack(hid_out), torch.stack(log_out)


def kernel_spec(prefill, text_rows, pad_row, params, table, frames) -> "StreamSpec":
    from ..backends.base import StreamSpec

    return StreamSpec(prefill=prefill, text_rows=text_rows, pad_row=pad_row, params=params,
                      rng=RandomStream(0, table), max_frames=frames)


def kernel_batch_run(backend, specs, frames, forced=None, perturb=0.0, debug=True):
    """Frames of several streams stepped together (a stream that hits EOS leaves the batch). Returns per stream
    (codes [n,16], hidden [n,H], logits [n,V]); hidden/logits only with `debug`."""
    handles = backend.open(specs, forced=forced)
    eos = backend.config.ids.codec_eos
    codes = [[] for _ in specs]
    hid = [[] for _ in specs]
    log = [[] for _ in specs]
    live = list(range(len(specs)))
    try:
        for _ in range(frames):
            if not live:
                break
            out = backend.step([handles[i] for i in live], perturb=perturb)
            assert not out.failed, out.failed
            for row, i in enumerate(live):
                codes[i].append(out.codes[row])
                if debug:
                    hid[i].append(backend.last_hidden(row).cpu())
                    log[i].append(backend.last_logits(row).cpu())
            live = [i for row, i in enumerate(live) if out.codes[row, 0] != eos and handles[i].frame < handles[i].limit]
    finally:
        for h in handles:
            backend.close(h)
    res = []
    for i in range(len(specs)):
        c = np.array(codes[i], dtype=np.int64).reshape(-1, 16)
        res.append((c, torch.stack(hid[i]) if hid[i] else None, torch.stack(log[i]) if log[i] else None))
    return res


def kernel_run(backend, prefill, text_rows, pad_row, params, table, frames, forced=None, perturb=0.0):
    """Frames of one stream on the megakernel: (codes [n,16], hidden [n,H], logits [n,V])."""
    spec = kernel_spec(prefill, text_rows, pad_row, params, table, frames)
    return kernel_batch_run(backend, [spec], frames, forced=None if forced is None else [forced], perturb=perturb)[0]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def first_divergence(a: np.ndarray, b: np.ndarray) -> int | None:
    n = min(len(a), len(b))
    for k in range(n):
        if not np.array_equal(a[k], b[k]):
            return k
    return None if len(a) == len(b) else n


# ---------------------------------------------------------------------------------------------------------------


def run_validation(config, weights, frames: int = 64, seed: int = 1234, device="cuda", log=print) -> dict:
    from ..model import Talker
    from ..megakernel.backend import MegakernelBackend

    dev = torch.device(device)
    t0 = time.perf_counter()
    backend = MegakernelBackend(config, weights, device=dev, max_streams=1,
                                max_seq_len=max(1024, frames + 64))
    # The reference gets the bf16 weights upcast to fp32: the same numbers the kernel reads.
    talker = Talker.from_state_dict(config, {k: v.float() for k, v in weights.items()}, device=dev,
                                    dtype=torch.float32)
    prefill, text, pad = random_prompt(config, seed=seed)
    params = SamplingParams()
    table = uniform_table(seed, frames)
    log(f"setup {time.perf_counter() - t0:.1f} s; blocks {backend.num_blocks}, SMs {backend.sm_count}")

    ref_codes, ref_hid, ref_log = reference_run(talker, prefill, text, pad, params, table, frames)
    n = len(ref_codes)
    forced = np.zeros((frames, 16), dtype=np.int64)
    forced[:n] = ref_codes
    # Teacher-forced: the kernel sees the reference's history; its own choices are compared.
    tf_codes, tf_hid, tf_log = kernel_run(backend, prefill, text, pad, params, table, n, forced=forced[:n])
    m = min(len(tf_codes), n)
    hid_err = [rel_err(tf_hid[k], ref_hid[k]) for k in range(m)]
    log_err = [rel_err(tf_log[k], ref_log[k]) for k in range(m)]
    agree0 = float(np.mean(tf_codes[:m, 0] == ref_codes[:m, 0]))
    full = [k for k in range(m) if ref_codes[k, 0] != config.ids.codec_eos]
    agree_rest = float(np.mean(tf_codes[full, 1:] == ref_codes[full, 1:])) if full else 1.0
    # Free-running under shared random numbers.
    fr_codes, _, _ = kernel_run(backend, prefill, text, pad, params, table, frames)
    div = first_divergence(fr_codes, ref_codes)
    # A/B: a perturbed hidden state must change the codes.
    ab_codes, _, _ = kernel_run(backend, prefill, text, pad, params, table, min(frames, 16), perturb=0.05)
    ab_changed = first_divergence(ab_codes, fr_codes[: len(ab_codes)]) is not None

    report = {
        "frames_compared": m,
        "hidden_rel_err_max": max(hid_err), "hidden_rel_err_median": float(np.median(hid_err)),
        "logits_rel_err_max": max(log_err), "logits_rel_err_median": float(np.median(log_err)),
        "teacher_forced_g0_agreement": agree0, "teacher_forced_g1_15_agreement": agree_rest,
        "free_running_frames": int(len(fr_codes)), "free_running_first_divergence": div,
        "ab_perturbation_changes_codes": bool(ab_changed),
        "bounds": {"hidden_logits_rel_err": HIDDEN_BOUND, "agreement": AGREE_BOUND},
        "device": torch.cuda.get_device_name(dev), "blocks": backend.num_blocks,
        "seconds": time.perf_counter() - t0,
    }
    report["pass"] = bool(report["hidden_rel_err_max"] <= HIDDEN_BOUND and report["logits_rel_err_max"] <= HIDDEN_BOUND
                          and agree0 >= AGREE_BOUND and agree_rest >= AGREE_BOUND and ab_changed)
    return report


def batch_prompts(config, n: int, frames: int, seed: int, lo: int = 20, hi: int = MAX_POS):
    """n streams with prompts of lo..hi rows (spread evenly), their own text, seeds and uniform tables."""
    out = []
    for i in range(n):
        rows = lo + (hi - lo) * i // max(1, n - 1)
        prefill, text, pad = random_prompt(config, n_prefill=rows, n_text=3 + i % 5, seed=seed + i)
        out.append((prefill, text, pad, uniform_table(seed + 1000 + i, frames)))
    return out


def pick(n_total: int, b: int) -> list[int]:
    """b of n_total streams, spread over them (so every batch mixes short and long prompts)."""
    return sorted({i * n_total // b for i in range(b)})


def sample_streams(n_total: int, k: int = ORACLE_SAMPLE) -> list[int]:
    """k of n_total streams, the first and the last (shortest and longest prompt) among them."""
    if n_total <= k:
        return list(range(n_total))
    return sorted({round(i * (n_total - 1) / (k - 1)) for i in range(k)})


def kernel_max_batch(config) -> int:
    """The most streams one launch of the compiled kernel takes (its MAX_BATCH), without building a backend."""
    from ..megakernel.backend import layout, variant_for
    from ..megakernel.build import load_library

    return int(layout(load_library(), variant_for(config))["MAX_BATCH"])


def _megakernel(config, weights, device, max_streams: int, max_seq_len: int):
    from ..megakernel.backend import MegakernelBackend

    return MegakernelBackend(config, weights, device=device, max_streams=max_streams, max_seq_len=max_seq_len)


def device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev)


def print_now(line: str) -> None:
    """print, flushed: progress lines show at once through a pipe too."""
    print(line, flush=True)


class Stages:
    """Wall time of each stage of a run, with a progress line (seconds since the start) as each starts and ends."""

    def __init__(self, log=print_now):
        self.log, self.t0, self.seconds = log, time.perf_counter(), {}

    def note(self, text: str) -> None:
        self.log(f"[{time.perf_counter() - self.t0:7.1f} s] {text}")

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        self.note(f"{name} ...")
        yield
        self.seconds[name] = round(time.perf_counter() - start, 3)
        self.note(f"{name}: {self.seconds[name]:.1f} s")


def check_oracle(talker, prompts, refs, params, streams: list[int]) -> dict:
    """The batched reference against reference_run, stream by stream, for `streams`: teacher-forced on the batched
    run's codes (a code that flips on a near-tie does not change the history), hidden / logits / codes compared."""
    hid, log, agree = [], [], []
    for i in streams:
        prefill, text, pad, table = prompts[i]
        codes, hidden, logits = refs[i]
        own, want_hid, want_log = reference_run(talker, prefill, text, pad, params, table, len(codes), forced=codes)
        m = min(len(own), len(codes))
        hid += [rel_err(hidden[k], want_hid[k]) for k in range(m)]
        log += [rel_err(logits[k], want_log[k]) for k in range(m)]
        agree += list((own[:m] == codes[:m]).reshape(-1)) + [False] * 16 * abs(len(own) - len(codes))
    return {"streams": streams, "hidden_rel_err_max": max(hid), "logits_rel_err_max": max(log),
            "codes_agreement": float(np.mean(agree)),
            "bounds": {"hidden_logits_rel_err": ORACLE_BOUND, "codes_agreement": ORACLE_AGREE}}


def oracle_ok(check: dict) -> bool:
    return bool(check["hidden_rel_err_max"] <= ORACLE_BOUND and check["logits_rel_err_max"] <= ORACLE_BOUND
                and check["codes_agreement"] >= ORACLE_AGREE)


def run_batch_validation(config, weights, batches, frames: int = 32, seed: int = 1234, device="cuda",
                         max_pos: int = MAX_POS, oracle_rows: int | None = None, log=print_now,
                         make_backend=_megakernel) -> dict:
    """Streams with prompts of 20..max_pos rows, `frames` frames each, on the kernel against the batched fp32
    reference. oracle_rows: the rows of every reference product (default max(batches); validate passes the
    kernel's MAX_BATCH, so a stream's reference values do not depend on how many streams run beside it).
    make_backend(config, weights, device, max_streams, max_seq_len): the kernel (tests pass a CPU stand-in)."""
    from ..model import Talker

    dev = torch.device(device)
    stages = Stages(log)
    n = max(batches)
    max_seq_len = max_pos + frames + 1
    with stages("setup"):
        backend = make_backend(config, weights, dev, n, max_seq_len)
        # The reference gets the bf16 weights upcast to fp32: the same numbers the kernel reads.
        talker = Talker.from_state_dict(config, {k: v.float() for k, v in weights.items()}, device=dev,
                                        dtype=torch.float32)
        params = SamplingParams()
        lo = min(PROMPT_MIN, max_pos)
        prompts = batch_prompts(config, n, frames, seed, lo=lo, hi=max_pos)
        specs = [kernel_spec(p, t, pad, params, tab, frames) for p, t, pad, tab in prompts]
        stages.note(f"blocks {backend.num_blocks}, streams {n}, prompts {lo}..{max_pos} rows, "
                    f"max_seq_len {max_seq_len}")

    def every(step: int, what: str, total: int):
        """A progress callback: a line after every `step`-th item k (0-based) of `total`."""
        def progress(k: int) -> None:
            if (k + 1) % step == 0 or k + 1 == total:
                stages.note(f"  {what} {k + 1}/{total}")
        return progress

    # The reference: all streams stepped together (tools/batch_reference.py), then a sample checked against the
    # per-stream reference_run.
    rows = max(n, oracle_rows or n)
    with fp32_precision(tf32=False):
        with stages("reference"):
            refs = batched_reference_run(talker, prompts, params, frames, rows=rows,
                                         progress=every(8, "reference frame", frames))
        with stages("reference check"):
            oracle = check_oracle(talker, prompts, refs, params, sample_streams(n))
    oracle["product_rows"] = rows
    # Teacher-forced, all n streams in one batch: each stream sees its reference history.
    with stages("teacher-forced"):
        forced = [codes for codes, _, _ in refs]
        tf_specs = [kernel_spec(p, t, pad, params, tab, len(r[0])) for (p, t, pad, tab), r in zip(prompts, refs)]
        tf = kernel_batch_run(backend, tf_specs, frames, forced=forced)
    hid_err, log_err, agree0, agree_rest = [], [], [], []
    for (rc, rh, rl), (kc, kh, kl) in zip(refs, tf):
        m = min(len(rc), len(kc))
        hid_err += [rel_err(kh[k], rh[k]) for k in range(m)]
        log_err += [rel_err(kl[k], rl[k]) for k in range(m)]
        agree0 += list(kc[:m, 0] == rc[:m, 0])
        full = [k for k in range(m) if rc[k, 0] != config.ids.codec_eos]
        agree_rest += list((kc[full, 1:] == rc[full, 1:]).reshape(-1))
    # Solo free runs, then every batch against them.
    with stages("solo runs"):
        solo = []
        for i, s in enumerate(specs):
            solo.append(kernel_batch_run(backend, [s], frames, debug=False)[0][0])
            every(8, "solo stream", n)(i)
    divergence = [first_divergence(sc, rc) for sc, (rc, _, _) in zip(solo, refs)]
    invariance = {}
    with stages("batches"):
        for b in batches:
            idx = pick(n, b)
            got = kernel_batch_run(backend, [specs[i] for i in idx], frames, debug=False)
            bad = [i for i, (c, _, _) in zip(idx, got) if not np.array_equal(c, solo[i])]
            invariance[str(b)] = {"streams": idx, "differ": bad}
            stages.note(f"  batch {b}: {'identical to solo runs' if not bad else f'streams {bad} differ'}")
    with stages("A/B"):
        ab = kernel_batch_run(backend, [specs[0]], min(frames, 16), perturb=0.05, debug=False)[0][0]
        ab_changed = first_divergence(ab, solo[0][: len(ab)]) is not None
    report = {
        "batches": list(batches), "streams": n, "frames": frames, "max_pos": max_pos, "max_seq_len": max_seq_len,
        "prompt_rows": [int(p[0].shape[0]) for p in prompts],
        "hidden_rel_err_max": max(hid_err), "hidden_rel_err_median": float(np.median(hid_err)),
        "logits_rel_err_max": max(log_err), "logits_rel_err_median": float(np.median(log_err)),
        "teacher_forced_g0_agreement": float(np.mean(agree0)),
        "teacher_forced_g1_15_agreement": float(np.mean(agree_rest)) if agree_rest else 1.0,
        "free_running_first_divergence": divergence,
        "batch_invariance": invariance,
        "batch_invariant": all(not v["differ"] for v in invariance.values()),
        "ab_perturbation_changes_codes": bool(ab_changed),
        "reference_check": oracle,
        "bounds": {"hidden_logits_rel_err": HIDDEN_BOUND, "agreement": AGREE_BOUND},
        "device": device_name(dev), "blocks": backend.num_blocks,
        "memory_per_stream_bytes": backend.memory_per_stream(),
        "stage_seconds": stages.seconds,
        "seconds": time.perf_counter() - stages.t0,
    }
    report["frames_compared"] = len(hid_err)
    report["pass"] = bool(report["hidden_rel_err_max"] <= HIDDEN_BOUND and report["logits_rel_err_max"] <= HIDDEN_BOUND
                          and report["teacher_forced_g0_agreement"] >= AGREE_BOUND
                          and report["teacher_forced_g1_15_agreement"] >= AGREE_BOUND and report["batch_invariant"]
                          and ab_changed and oracle_ok(oracle))
    return report


def _short(v) -> str:
    if isinstance(v, list):
        hit = [d for d in v if d is not None]
        return f"{len(hit)}/{len(v)} diverge, first at {min(hit)}" if hit else f"none of {len(v)}"
    return str(v)


def _oracle_row(c: dict) -> tuple:
    value = (f"{max(c['hidden_rel_err_max'], c['logits_rel_err_max']):.1e}, codes "
             f"{100 * c['codes_agreement']:.2f} %, streams {c['streams']}")
    return ("batched reference = per-stream reference", value, f"<= {ORACLE_BOUND:g}", oracle_ok(c))


def format_table(r: dict) -> str:
    rows = [
        ("talker hidden rel. error (max / median)", f"{r['hidden_rel_err_max']:.2e} / {r['hidden_rel_err_median']:.2e}",
         f"<= {HIDDEN_BOUND:g}", r["hidden_rel_err_max"] <= HIDDEN_BOUND),
        ("talker logits rel. error (max / median)", f"{r['logits_rel_err_max']:.2e} / {r['logits_rel_err_median']:.2e}",
         f"<= {HIDDEN_BOUND:g}", r["logits_rel_err_max"] <= HIDDEN_BOUND),
        ("teacher-forced g0 agreement", f"{100 * r['teacher_forced_g0_agreement']:.2f} %", ">= 99 %",
         r["teacher_forced_g0_agreement"] >= AGREE_BOUND),
        ("teacher-forced g1..g15 agreement", f"{100 * r['teacher_forced_g1_15_agreement']:.2f} %", ">= 99 %",
         r["teacher_forced_g1_15_agreement"] >= AGREE_BOUND),
        ("free-running first divergence (frame)", _short(r["free_running_first_divergence"]), "report", True),
        *([("batch invariance (codes = solo run, every frame)",
            ", ".join(f"B={b}: {'ok' if not v['differ'] else 'DIFFER'}" for b, v in r["batch_invariance"].items()),
            "all ok", r["batch_invariant"])] if "batch_invariance" in r else []),
        ("A/B: perturbed hidden changes codes", str(r["ab_perturbation_changes_codes"]), "True",
         r["ab_perturbation_changes_codes"]),
        *([_oracle_row(r["reference_check"])] if "reference_check" in r else []),
    ]
    w = max(len(a) for a, *_ in rows)
    lines = [f"{'check':<{w}}  {'value':<40} {'bound':<10} ok"]
    lines += [f"{a:<{w}}  {b:<40} {c:<10} {'PASS' if d else 'FAIL'}" for a, b, c, d in rows]
    lines.append(f"frames compared: {r['frames_compared']}, device: {r['device']}, overall: "
                 f"{'PASS' if r['pass'] else 'FAIL'}")
    return "\n".join(lines)


def _parse(argv) -> argparse.Namespace:
    if isinstance(argv, argparse.Namespace):
        return argv
    p = argparse.ArgumentParser(prog="qwen-tts-mk validate")
    p.add_argument("--model", default=None)
    p.add_argument("--random-weights", default=None, choices=["0.6b", "1.7b"])
    p.add_argument("--frames", type=int, default=None,
                   help=f"frames per stream (default 64, with --batch {FRAMES_BATCH})")
    p.add_argument("--batch", default=None, help="batch sizes, e.g. 1,2,7,16,64")
    p.add_argument("--max-pos", type=int, default=MAX_POS, help=f"--batch: longest prompt in rows (default {MAX_POS})")
    p.add_argument("--output", default=None)
    return p.parse_args(argv)


def main_validate(argv=None) -> int:
    """Entry point for `qwen-tts-mk validate` (argv list or the CLI's argparse Namespace)."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    if not torch.cuda.is_available():
        print("validate needs a CUDA GPU", file=sys.stderr)
        return 2
    if getattr(args, "model", None):
        from ..checkpoint import load_checkpoint

        ck = load_checkpoint(args.model)
        config, weights, name = ck.config, ck.weights, args.model
    else:
        size = getattr(args, "random_weights", None) or "0.6b"
        config = random_config(size)
        weights = random_weights(config, seed=0)
        name = f"random-{size}"
    batch = getattr(args, "batch", None)
    frames = getattr(args, "frames", None)
    if batch:
        try:
            batches = sorted({int(b) for b in str(batch).split(",")})
        except ValueError:
            print(f"--batch: expected comma-separated integers, got {batch!r}", file=sys.stderr)
            return 2
        max_batch = kernel_max_batch(config)
        if not batches or batches[0] < 1 or batches[-1] > max_batch:
            print(f"--batch: sizes must be 1..{max_batch} (the kernel's MAX_BATCH)", file=sys.stderr)
            return 2
        max_pos = int(getattr(args, "max_pos", None) or MAX_POS)
        if max_pos < 1:
            print(f"--max-pos: expected a positive number of rows, got {max_pos}", file=sys.stderr)
            return 2
        report = run_batch_validation(config, weights, batches, frames=int(frames or FRAMES_BATCH), max_pos=max_pos,
                                      oracle_rows=max_batch)
    else:
        report = run_validation(config, weights, frames=int(frames or 64))
    report["model"] = name
    print(format_table(report))
    suffix = "-batch" if batch else ""
    out = getattr(args, "output", None) or f"benchmarks/results/validate-{name.replace('/', '_')}{suffix}.json"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    raise SystemExit(main_validate())
