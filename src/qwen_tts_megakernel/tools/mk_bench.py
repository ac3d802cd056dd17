"""qwen-tts-mk bench --decode --batch 1,2,4,...,64: batched megakernel timings next to floors and a baseline.

All numbers come from the same process on the same GPU, per batch size B (streams at positions 50..800):
  * megakernel: median ms per frame (talker + code predictor + sampling for all B streams) and per talker step
    (launch flag: stop after codebook 0), from CUDA events around back-to-back launches; aggregate frames/s and
    seconds of audio per second; achieved GB/s = (weight bytes + KV-cache bytes read) / time; wall ms per step
    through the backend contract (host polling included);
  * floors: the same bytes over the bandwidth the weight ring reaches alone (every tile, no math, no barriers) and
    over a large bf16 matrix-vector product (torch.mv over ~1 GB);
  * baseline: the reference math batched with a static KV cache and one CUDA graph per batch size (bf16).
Writes benchmarks/results/<gpu>[-size]-decode-batch.json and .md.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..sampling import RandomStream, SamplingParams
from .common import gpu_slug
from .validate import random_config, random_prompt, random_weights


def _median_ms(events: list[tuple[torch.cuda.Event, torch.cuda.Event]]) -> float:
    return statistics.median(a.elapsed_time(b) for a, b in events)


def matvec_bandwidth(device, gbytes: float = 1.0, reps: int = 20) -> float:
    """Achieved read bandwidth (GB/s) of torch.mv on a bf16 matrix of ~gbytes (median of reps)."""
    n = 16384
    m = int(gbytes * 1e9 / (2 * n))
    w = torch.randn(m, n, device=device, dtype=torch.bfloat16)
    x = torch.randn(n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        torch.mv(w, x)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        torch.mv(w, x)
        b.record()
        times.append((a, b))
    torch.cuda.synchronize()
    ms = _median_ms(times)
    bw = w.numel() * 2 / (ms * 1e-3) / 1e9
    del w
    torch.cuda.empty_cache()
    return bw


def bench_prompts(config, n: int, lo: int = 50, hi: int = 800):
    """n prompts of lo..hi rows (spread evenly): the streams of a batch sit at mixed positions."""
    return [random_prompt(config, n_prefill=lo + (hi - lo) * i // max(1, n - 1), n_text=200, seed=100 + i)
            for i in range(n)]


def kv_bytes_per_frame(config, positions, elem_bytes: int = 4) -> int:
    """KV-cache bytes one frame reads (elements of elem_bytes): the talker over each stream's positions 0..pos, the
    predictor over positions 0..j in step j (K and V, every layer)."""
    t, c = config.talker, config.code_predictor
    row_t = 2 * t.num_key_value_heads * t.head_dim * elem_bytes * t.num_hidden_layers
    row_c = 2 * c.num_key_value_heads * c.head_dim * elem_bytes * c.num_hidden_layers
    cp_positions = 2 + sum(j + 1 for j in range(2, 16))
    return sum(row_t * (p + 1) + row_c * cp_positions for p in positions)


def _time_launches(backend, launch, n: int, warmup: int) -> tuple[float, float]:
    evs = []
    s = backend.stream
    for k in range(warmup + n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(s)
        backend.launch(launch)
        b.record(s)
        if k >= warmup:
            evs.append((a, b))
    s.synchronize()
    ms = [a.elapsed_time(b) for a, b in evs]
    return statistics.median(ms), float(np.percentile(ms, 90))


def bench_megakernel(backend, config, batches, frames: int = 100, warmup: int = 10) -> dict:
    """Per batch size: median ms per frame and per talker step (CUDA events around back-to-back launches of the
    same streams; positions stay put), plus wall time per step through the contract (host poll included)."""
    from ..backends.base import StreamSpec
    from ..megakernel.backend import FLAG_STREAM_ONLY, FLAG_TALKER_ONLY

    prompts = bench_prompts(config, max(batches))
    out = {}
    for B in batches:
        idx = sorted({i * len(prompts) // B for i in range(B)})
        specs = [StreamSpec(prefill=p, text_rows=t, pad_row=pad, params=SamplingParams(), rng=RandomStream(7 + i),
                            max_frames=200) for i, (p, t, pad) in enumerate(prompts[j] for j in idx)]
        hs = backend.open(specs)
        launch = backend._entries(hs)
        positions = [launch.e[i].pos for i in range(launch.n)]
        r = {"positions": positions, "kv_bytes": kv_bytes_per_frame(config, positions, backend.lay["KV_BYTES"])}
        for name, flags in (("frame", 0), ("talker_step", FLAG_TALKER_ONLY)):
            launch.flags = flags
            r[name + "_ms"], r[name + "_ms_p90"] = _time_launches(backend, launch, frames, warmup)
        if B == batches[0]:
            for name, flags in (("frame", FLAG_STREAM_ONLY), ("talker_step", FLAG_STREAM_ONLY | FLAG_TALKER_ONLY)):
                launch.flags = flags
                out[name + "_stream_only_ms"] = _time_launches(backend, launch, frames, warmup)[0]
        t0 = time.perf_counter()
        steps = 0
        for _ in range(20):
            live = [h for h in hs if not h.ended]
            if not live:
                break
            backend.step(live)
            steps += 1
        r["step_wall_ms"] = (time.perf_counter() - t0) * 1e3 / max(1, steps)
        for h in hs:
            backend.close(h)
        out[str(B)] = r
    return out


# ---------------------------------------------------------------------------------------------------------------
# Baseline: the reference math batched, static KV cache, one CUDA graph per batch size (bf16).


class _StaticStack:
    """One decoder stack for B streams with a static cache [L, B, KV, cap, D]; step(x [B, n, H], pos [B]) at
    positions pos[b]..pos[b]+n-1 (a device tensor), so the same graph replays at any positions."""

    def __init__(self, weights, prefix, cfg, batch, cap, device, dtype):
        self.cfg, self.cap = cfg, cap
        g = lambda n: weights[n].to(device, dtype)  # noqa: E731
        self.layers = []
        for i in range(cfg.num_hidden_layers):
            p = f"{prefix}.layers.{i}."
            self.layers.append(dict(
                qkv=torch.cat([g(p + "self_attn.q_proj.weight"), g(p + "self_attn.k_proj.weight"),
                               g(p + "self_attn.v_proj.weight")]),
                o=g(p + "self_attn.o_proj.weight"),
                gu=torch.cat([g(p + "mlp.gate_proj.weight"), g(p + "mlp.up_proj.weight")]),
                d=g(p + "mlp.down_proj.weight"), ln1=g(p + "input_layernorm.weight"),
                ln2=g(p + "post_attention_layernorm.weight"), qn=g(p + "self_attn.q_norm.weight"),
                kn=g(p + "self_attn.k_norm.weight")))
        self.norm = g(f"{prefix}.norm.weight")
        self.k = torch.zeros(cfg.num_hidden_layers, batch, cfg.num_key_value_heads, cap, cfg.head_dim,
                             device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        hd = cfg.head_dim
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, device=device).float() / hd))
        fr = torch.arange(cap, device=device).float()[:, None] * inv[None]
        emb = torch.cat([fr, fr], -1)
        self.cos, self.sin = emb.cos().to(dtype), emb.sin().to(dtype)
        self.ar = torch.arange(cap, device=device)

    @staticmethod
    def _rms(x, w, eps):
        xf = x.float()
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    def step(self, x, pos):  # x [B, n, H], pos: int64 device tensor [B]
        c = self.cfg
        B, n = x.shape[:2]
        nq, nkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        posn = pos[:, None] + torch.arange(n, device=x.device)  # [B, n]
        cos, sin = self.cos[posn][:, None], self.sin[posn][:, None]  # [B, 1, n, hd]
        mask = (self.ar[None, None, :] <= posn[:, :, None])[:, None]  # [B, 1, n, cap]
        idx = posn[:, None, :, None].expand(B, nkv, n, hd)

        def rot(t):
            t1, t2 = t[..., : hd // 2], t[..., hd // 2:]
            return t * cos + torch.cat([-t2, t1], -1) * sin

        for i, L in enumerate(self.layers):
            h = self._rms(x, L["ln1"], c.rms_norm_eps)
            qkv = h @ L["qkv"].T
            q = self._rms(qkv[..., : nq * hd].view(B, n, nq, hd), L["qn"], c.rms_norm_eps).transpose(1, 2)
            k = self._rms(qkv[..., nq * hd:(nq + nkv) * hd].view(B, n, nkv, hd), L["kn"],
                          c.rms_norm_eps).transpose(1, 2)
            v = qkv[..., (nq + nkv) * hd:].view(B, n, nkv, hd).transpose(1, 2)
            self.k[i, :B].scatter_(2, idx, rot(k))
            self.v[i, :B].scatter_(2, idx, v)
            keys = self.k[i, :B].repeat_interleave(nq // nkv, 1)
            vals = self.v[i, :B].repeat_interleave(nq // nkv, 1)
            a = F.scaled_dot_product_attention(rot(q), keys, vals, attn_mask=mask, scale=1 / math.sqrt(hd))
            x = x + a.transpose(1, 2).reshape(B, n, nq * hd) @ L["o"].T
            h = self._rms(x, L["ln2"], c.rms_norm_eps)
            gu = h @ L["gu"].T
            f = c.intermediate_size
            x = x + (F.silu(gu[..., :f]) * gu[..., f:]) @ L["d"].T
        return self._rms(x, self.norm, c.rms_norm_eps)


def bench_graphs(config, weights, device, batches, steps: int = 30, cap: int = 1024) -> dict:
    """The batched reference baseline: per batch size one CUDA graph for the talker step + head and one per
    predictor pass (2-row first step, then 14 one-row steps), streams at positions 50..800; sampling excluded."""
    dt = torch.bfloat16
    nmax = max(batches)
    t = _StaticStack(weights, "talker.model", config.talker, nmax, cap, device, dt)
    cpk = _StaticStack(weights, "talker.code_predictor.model", config.code_predictor, nmax, 16, device, dt)
    head = weights["talker.codec_head.weight"].to(device, dt)
    cp_head = weights["talker.code_predictor.lm_head.0.weight"].to(device, dt)
    proj = None
    if config.has_mtp_projection:
        proj = (weights["talker.code_predictor.small_to_mtp_projection.weight"].to(device, dt),
                weights["talker.code_predictor.small_to_mtp_projection.bias"].to(device, dt))
    H = config.talker.hidden_size
    out = {}
    for B in batches:
        x = torch.randn(B, 1, H, device=device, dtype=dt) * 0.05
        pos = torch.tensor([50 + 750 * i // max(1, B - 1) for i in range(B)], device=device)
        x2 = torch.randn(B, 2, H, device=device, dtype=dt) * 0.05
        xc = torch.randn(B, 1, H, device=device, dtype=dt) * 0.05
        cpos0 = torch.zeros(B, dtype=torch.long, device=device)
        cpos = torch.full((B,), 2, dtype=torch.long, device=device)

        def cp_in(v):
            return v if proj is None else v @ proj[0].T + proj[1]

        def fns():
            lt = t.step(x, pos)[:, -1] @ head.T
            l2 = cpk.step(cp_in(x2), cpos0)[:, -1] @ cp_head.T
            lc = cpk.step(cp_in(xc), cpos)[:, -1] @ cp_head.T
            return lt, l2, lc

        s = torch.cuda.Stream(device)
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                fns()
        torch.cuda.current_stream().wait_stream(s)
        gt, g2, gc = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(gt):
            lt = t.step(x, pos)[:, -1] @ head.T
        with torch.cuda.graph(g2):
            l2 = cpk.step(cp_in(x2), cpos0)[:, -1] @ cp_head.T
        with torch.cuda.graph(gc):
            lc = cpk.step(cp_in(xc), cpos)[:, -1] @ cp_head.T
        del lt, l2, lc
        ev_t, ev_f = [], []
        for k in range(steps + 5):
            a, b, e = (torch.cuda.Event(enable_timing=True) for _ in range(3))
            a.record()
            gt.replay()
            b.record()
            g2.replay()
            for _ in range(14):
                gc.replay()
            e.record()
            if k >= 5:
                ev_t.append((a, b))
                ev_f.append((a, e))
        torch.cuda.synchronize()
        out[str(B)] = {"talker_step_ms": _median_ms(ev_t), "frame_ms": _median_ms(ev_f)}
        del gt, g2, gc
        torch.cuda.empty_cache()
    out["note"] = ("bf16, static KV cache (1024 positions), one CUDA graph per batch size for the talker step and "
                   "each predictor pass; sampling excluded")
    return out


def run_bench(size: str = "0.6b", device="cuda", out_dir: str = "benchmarks/results", weights=None,
              config=None, batches=(1,), frames: int = 100) -> dict:
    from ..megakernel.backend import MegakernelBackend

    dev = torch.device(device)
    config = config or random_config(size)
    weights = weights or random_weights(config, seed=0)
    batches = sorted(set(batches))
    bw = matvec_bandwidth(dev)
    be = MegakernelBackend(config, weights, device=dev, max_streams=max(batches), max_seq_len=1024)
    wb = be.weight_bytes()
    mk = bench_megakernel(be, config, batches, frames=frames)
    bw2 = matvec_bandwidth(dev)
    res = summarize_decode(gpu=torch.cuda.get_device_name(dev), size=size, blocks=be.num_blocks, weight_bytes=wb,
                           matvec_GBps=max(bw, bw2), megakernel=mk, batches=batches,
                           memory_per_stream=be.memory_per_stream(), hidden_size=config.talker.hidden_size)
    res["kv_dtype"] = {2: "fp16", 4: "fp32"}[be.lay["KV_BYTES"]]
    del be
    torch.cuda.empty_cache()
    try:
        res["reference_graphs"] = bench_graphs(config, weights, dev, batches)
    except Exception as e:  # a baseline failure must not hide the kernel's numbers
        res["reference_graphs"] = {"error": repr(e)}
    torch.cuda.empty_cache()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    slug = gpu_slug(res["gpu"]) + ("" if size == "0.6b" else f"-{size}")
    (out / f"{slug}-decode-batch.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / f"{slug}-decode-batch.md").write_text(format_md(res))
    return res


def summarize_decode(*, gpu: str, size: str, blocks: int, weight_bytes: dict, matvec_GBps: float, megakernel: dict,
                     batches, memory_per_stream: int, hidden_size: int) -> dict:
    """The decode result from the raw measurements (bench_megakernel's dict): per batch size the frame and talker
    step times, throughput, achieved bandwidth and the two floors; what `bench --decode` writes and `bench --all`'s
    decode section reports."""
    mk = megakernel
    ring_bw = weight_bytes["frame"] / (mk["frame_stream_only_ms"] * 1e-3) / 1e9  # what the weight ring reaches alone
    rows = {}
    for B in batches:
        r = mk[str(B)]
        total = weight_bytes["frame"] + r["kv_bytes"]
        rows[str(B)] = {
            **r,
            "frames_per_s": B / (r["frame_ms"] * 1e-3),
            "audio_s_per_s": B / (r["frame_ms"] * 1e-3) * 0.08,
            "GBps": total / (r["frame_ms"] * 1e-3) / 1e9,
            "floor_ring_ms": total / ring_bw / 1e6,
            "floor_matvec_ms": total / matvec_GBps / 1e6,
        }
    return {
        "gpu": gpu, "model": f"random-{size}", "blocks": blocks,
        "weight_bytes": weight_bytes, "matvec_GBps": matvec_GBps, "ring_GBps": ring_bw,
        "stream_only_ms": {"talker_step": mk["talker_step_stream_only_ms"], "frame": mk["frame_stream_only_ms"]},
        "memory_per_stream_bytes": memory_per_stream,
        "megakernel": rows,
        # The targets (ms per frame) for the two sizes; other batch sizes show none.
        "targets": {"1": 2.2, "16": 2.8, "64": 4.0} if hidden_size == 1024 else {"1": 3.5, "64": 7.0},
    }


def _f(d: dict, k: str, fmt: str = ".3f") -> str:
    v = d.get(k)
    return format(v, fmt) if isinstance(v, (int, float)) else "n/a"


def format_md(r: dict) -> str:
    g = r.get("reference_graphs", {})
    lines = [
        f"# Decode benchmark: {r['gpu']}, {r['model']}, batched",
        "",
        f"Weight bytes per frame {r['weight_bytes']['frame'] / 1e9:.3f} GB (talker step "
        f"{r['weight_bytes']['talker'] / 1e9:.3f} GB). Weight ring alone (no math, no barriers): frame "
        f"{r['stream_only_ms']['frame']:.3f} ms = {r['ring_GBps']:.0f} GB/s; large bf16 matvec "
        f"{r['matvec_GBps']:.0f} GB/s. Grid {r['blocks']} blocks. GPU memory per stream slot "
        f"{r['memory_per_stream_bytes'] / 2**20:.0f} MiB ({r.get('kv_dtype', 'fp32')} KV, 1024 positions). Streams at "
        "positions 50..800.",
        "",
        "| batch | frame ms | p90 | talker step ms | frames/s | audio s/s | GB/s (weights + KV) | floor ring / matvec ms "
        "| target ms | graphed reference frame ms | speed-up | step wall ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for b, m in r["megakernel"].items():
        ref = g.get(b, {}) if isinstance(g, dict) else {}
        speed = (ref["frame_ms"] / m["frame_ms"]) if isinstance(ref.get("frame_ms"), float) else None
        lines.append(
            f"| {b} | {m['frame_ms']:.3f} | {m['frame_ms_p90']:.3f} | {m['talker_step_ms']:.3f} | "
            f"{m['frames_per_s']:.0f} | {m['audio_s_per_s']:.1f} | {m['GBps']:.0f} | {m['floor_ring_ms']:.3f} / "
            f"{m['floor_matvec_ms']:.3f} | {r['targets'].get(b, '')} | {_f(ref, 'frame_ms')} | "
            f"{'' if speed is None else f'{speed:.1f}x'} | {m['step_wall_ms']:.3f} |")
    if isinstance(g, dict) and "error" in g:
        lines.append(f"\nGraphed reference failed: {g['error']}")
    lines += ["", "Written by `qwen-tts-mk bench --decode --batch ...` (tools/mk_bench.py).", ""]
    return "\n".join(lines)


def main_bench_decode(argv=None) -> int:
    """Entry point for `qwen-tts-mk bench --decode` (argv list or the CLI's argparse Namespace)."""
    if isinstance(argv, argparse.Namespace):
        args = argv
    else:
        p = argparse.ArgumentParser(prog="qwen-tts-mk bench --decode")
        p.add_argument("--decode", action="store_true")
        p.add_argument("--random-weights", default="0.6b", choices=["0.6b", "1.7b"])
        p.add_argument("--model", default=None)
        p.add_argument("--device", default=None)
        p.add_argument("--output-dir", default="benchmarks/results")
        p.add_argument("--batch", default="1", help="batch sizes, e.g. 1,2,4,8,16,32,64")
        p.add_argument("--frames", type=int, default=100, help="timed launches per figure")
        args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if not torch.cuda.is_available():
        print("bench --decode needs a CUDA GPU", file=sys.stderr)
        return 2
    config = weights = None
    if getattr(args, "model", None):
        from ..checkpoint import load_checkpoint

        ck = load_checkpoint(args.model)
        config, weights = ck.config, ck.weights
    try:
        batches = [int(b) for b in str(getattr(args, "batch", None) or "1").split(",")]
    except ValueError:
        print(f"--batch: expected comma-separated integers, got {args.batch!r}", file=sys.stderr)
        return 2
    if min(batches) < 1 or max(batches) > 64:
        print("--batch: sizes must be 1..64", file=sys.stderr)
        return 2
    res = run_bench(getattr(args, "random_weights", None) or "0.6b", device=getattr(args, "device", None) or "cuda",
                    out_dir=getattr(args, "output_dir", "benchmarks/results"), weights=weights, config=config,
                    batches=batches, frames=int(getattr(args, "frames", 100) or 100))
    print(format_md(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main_bench_decode())
