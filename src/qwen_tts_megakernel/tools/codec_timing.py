"""Batched streaming codec timing: per-stream-frame cost and seconds of audio decoded per second.

    python -m qwen_tts_megakernel.tools.codec_timing [--batch 1 8 32 64] [--frames 1 2 4 8] [--runs 20]
        [--precisions fp32 tf32 bf16] [--modes eager graphs] [--paths plain fused] [--snr-streams 8]
        [--snr-frames 24] [--tiny] [--out benchmarks/results/codec-timing.json]

For every path x precision x mode x batch B x frames per push n: B open streams each push n frames in one
`StreamingCodec.push` (codes in, PCM out on the host, as the engine calls it); median and p95 ms over `--runs` pushes
after two untimed ones (which capture the graphs). Paths: "plain" (PyTorch ops, the reference) and "fused" (the Triton
kernels of codec/fused.py; default where triton and CUDA are there). Derived: ms per stream-frame and seconds of audio
per second (B * n * 80 ms / push time). The SNR of every path x precision against the plain fp32 decode of the same
codes (same run; 8 streams x 24 frames in pushes of 1, 2, 4, 8, 8 frames, --snr-streams, --snr-frames); a target
counts only rows of a path x precision that holds 45 dB. Then where the time goes: GPU time per layer group (CUDA
events around the decoder's top-level modules, eager) at B = 64 x 8 frames and B = 1 x 1 frame, and the kernels a
1-frame step launches (CUDA profiler; off CUDA, the tensor ops). Writes the JSON and a Markdown report next to it
(same name, .md). Random weights of the released codec's shapes (`--tiny`: the tiny test codec, for a quick check of
the tool itself).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..codec import CodecDecoder, CodecDecoderConfig, StreamingCodec, fused
from ..synthetic.checkpoints import real_speech_tokenizer_config
from ..synthetic.codec import random_speech_tokenizer_weights, tiny_speech_tokenizer_config
from .common import git_commit, summary

TARGETS = {"audio_s_per_s_at_64x8": 2500.0, "one_stream_one_frame_ms": 1.2}
MIN_SNR_DB = 45.0  # against the plain fp32 decode
PATHS = ("plain", "fused")


def real_codec(device: torch.device, seed: int = 1) -> CodecDecoder:
    """The codec decoder with the released speech tokenizer's shapes and random weights (fp32), as in
    synthetic.random_checkpoint (whose codec seed is its seed + 1)."""
    config = real_speech_tokenizer_config()
    weights = random_speech_tokenizer_weights(config, seed)
    return CodecDecoder.from_state_dict(CodecDecoderConfig.from_json_dict(config), weights, device=device)


def tiny_codec(device: torch.device) -> CodecDecoder:
    config = tiny_speech_tokenizer_config()
    weights = random_speech_tokenizer_weights(config, 0)
    return CodecDecoder.from_state_dict(CodecDecoderConfig.from_json_dict(config), weights, device=device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_pushes(codec: StreamingCodec, batch: int, frames: int, runs: int) -> list[float]:
    """ms of `runs` pushes of `frames` frames for each of `batch` fresh streams (after two untimed pushes)."""
    gen = np.random.default_rng(batch * 100 + frames)
    q, size = codec.decoder.cfg.num_quantizers, codec.decoder.cfg.codebook_size
    streams = [codec.open() for _ in range(batch)]
    try:
        times = []
        for i in range(runs + 2):
            codes = [gen.integers(0, size, (frames, q)) for _ in range(batch)]
            _sync(codec.device)
            start = time.perf_counter()
            codec.push(streams, codes)  # ends with the device -> host copy of the PCM
            if i >= 2:
                times.append(1000 * (time.perf_counter() - start))
        return times
    finally:
        for stream in streams:
            codec.close(stream)


GROUPS = ("quantizer", "pre_conv", "pre_transformer", "upsample", "head_conv", "blocks.0", "blocks.1", "blocks.2",
          "blocks.3", "final")


def _group(name: str) -> str:
    for group in GROUPS:
        if name == group or name.startswith(group + "."):
            return group
    return "final"  # final_act, final_conv


def layer_breakdown(codec: StreamingCodec, batch: int, frames: int, runs: int = 5) -> dict[str, float]:
    """GPU ms per layer group of one eager decode step of `batch` streams x `frames` frames (median over runs)."""
    model, device = codec.model, codec.device
    tops = [(n, m) for n, m in model.named_children() if not isinstance(m, torch.nn.ModuleList)]
    tops += [(f"{n}.{i}", m) for n, ml in model.named_children() if isinstance(ml, torch.nn.ModuleList)
             for i, m in enumerate(ml)]
    events: dict[str, list] = defaultdict(list)
    handles = []
    for name, module in tops:
        def pre(_m, _a, name=name):
            events[name].append([torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)])
            events[name][-1][0].record()

        def post(_m, _a, _o, name=name):
            events[name][-1][1].record()

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    codes = torch.randint(0, codec.decoder.cfg.codebook_size, (batch, frames, codec.decoder.cfg.num_quantizers),
                          device=device)
    rows = torch.full((batch,), codec.scratch, device=device)
    try:
        per_run = []
        for _ in range(runs + 1):
            events.clear()
            with torch.inference_mode():
                codec._run(codes, rows)
            torch.cuda.synchronize()
            totals: dict[str, float] = defaultdict(float)
            for name, pairs in events.items():
                totals[_group(name)] += sum(a.elapsed_time(b) for a, b in pairs)
            per_run.append(totals)
    finally:
        for handle in handles:
            handle.remove()
    return {g: float(np.median([r[g] for r in per_run[1:]])) for g in GROUPS}


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def kernels_per_step(codec: StreamingCodec, frames: int = 1) -> int:
    """Kernels one step of one stream launches (gather, decode, scatter): CUDA kernels (profiler) on CUDA, else tensor
    ops (about the kernels a graph replays)."""
    codes = torch.zeros(1, frames, codec.decoder.cfg.num_quantizers, dtype=torch.long, device=codec.device)
    rows = torch.full((1,), codec.scratch, device=codec.device)
    with torch.inference_mode():
        codec._run(codes, rows)  # compiles what the path compiles
        if codec.device.type != "cuda":
            with _OpCounter() as counter:
                codec._run(codes, rows)
            return counter.count
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            codec._run(codes, rows)
            torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def snr_vs_reference(decoder: CodecDecoder, precision: str, use_fused: bool, streams: int = 8, frames: int = 24,
                     seed: int = 7) -> float:
    """SNR (dB) of `streams` streams x `frames` frames decoded by StreamingCodec(precision, fused) against the plain
    fp32 decode of the same codes; pushes of 1, 2, 4, 8 frames in turn (first chunks, then the engine's sizes)."""
    gen = np.random.default_rng(seed)
    q, size = decoder.cfg.num_quantizers, decoder.cfg.codebook_size
    codes = [gen.integers(0, size, (frames, q)) for _ in range(streams)]
    pcm = []
    reference = StreamingCodec(decoder, streams, fused=False)
    for codec in (reference, StreamingCodec(decoder, streams, precision, fused=use_fused)):
        handles, out, at, chunk = [codec.open() for _ in codes], [[] for _ in codes], 0, 1
        while at < frames:
            n = min(chunk, frames - at)
            for i, wav in enumerate(codec.push(handles, [c[at : at + n] for c in codes])):
                out[i].append(wav)
            at, chunk = at + n, min(2 * chunk, 8)
        pcm.append(np.concatenate([np.concatenate(o) for o in out]).astype(np.float64))
        del codec
    ref, got = pcm
    noise = np.sum((ref - got) ** 2)
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(ref**2) / noise))


def codec_timing(decoder: CodecDecoder, batches, frames, precisions, modes, runs: int, paths=("plain",),
                 snr_streams: int = 8, snr_frames: int = 24) -> dict:
    device = decoder.device
    rows = []
    breakdown = {}
    snr = {}
    kernels = {}
    spf, rate = decoder.samples_per_frame, decoder.sample_rate
    for path in paths:  # first: a tool failure shows before minutes of timing
        codec = StreamingCodec(decoder, 1, precisions[0], use_graphs=False, fused=path == "fused")
        kernels[path] = kernels_per_step(codec)
        print(json.dumps({"kernels_per_step": path, "value": kernels[path]}), flush=True)
    for path in paths:
        for precision in precisions:
            key = f"{path} {precision}"
            snr[key] = snr_vs_reference(decoder, precision, path == "fused", snr_streams, snr_frames)
            print(json.dumps({"snr_db": key, "value": snr[key]}), flush=True)
            for mode in modes:
                codec = StreamingCodec(decoder, max_streams=max(batches), precision=precision,
                                       use_graphs=(mode == "graphs"), fused=path == "fused")
                for b in batches:
                    for n in frames:
                        times = time_pushes(codec, b, n, runs)
                        s = summary(times)
                        rows.append({"path": path, "precision": precision, "mode": mode, "batch": b, "frames": n,
                                     "median_ms": s["median"], "p95_ms": s["p95"], "runs": s["runs"],
                                     "per_stream_frame_ms": s["median"] / (b * n),
                                     "audio_s_per_s": b * n * spf / rate / (s["median"] / 1000)})
                        print(json.dumps(rows[-1]), flush=True)
                if mode == "eager" and device.type == "cuda":
                    for b, n in ((max(batches), max(frames)), (1, 1)):
                        breakdown[f"{key} B={b} x {n} frames"] = layer_breakdown(codec, b, n)
                del codec
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    best = {}
    for key, pick in (("audio_s_per_s_at_64x8", lambda r: r["batch"] == 64 and r["frames"] == 8),
                      ("one_stream_one_frame_ms", lambda r: r["batch"] == 1 and r["frames"] == 1)):
        cands = [r for r in rows if pick(r) and r["mode"] == "graphs"
                 and snr[f"{r['path']} {r['precision']}"] >= MIN_SNR_DB]
        if cands:
            if key.startswith("audio"):
                r = max(cands, key=lambda r: r["audio_s_per_s"])
                value = r["audio_s_per_s"]
            else:
                r = min(cands, key=lambda r: r["median_ms"])
                value = r["median_ms"]
            best[key] = {"value": value, "path": r["path"], "precision": r["precision"], "target": TARGETS[key],
                         "snr_db": snr[f"{r['path']} {r['precision']}"]}
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "commit": git_commit(),
        "codec": "tiny" if decoder.cfg.hidden_size < 512 else "released shapes, random weights",
        "runs": runs,
        "kernels_per_step": kernels,
        "snr_db": snr,
        "rows": rows,
        "layer_groups_ms": breakdown,
        "targets": best,
    }


def markdown(result: dict) -> str:
    lines = [f"# Codec timing: {result['device']}", "",
             f"torch {result['torch']}, commit {result['commit']}, {result['codec']}, {result['runs']} timed pushes "
             "per row (median / p95 ms of one `StreamingCodec.push`, host codes in, host PCM out).", ""]
    for key, t in result["targets"].items():
        ok = t["value"] >= t["target"] if key.startswith("audio") else t["value"] <= t["target"]
        lines.append(f"- {key}: {t['value']:.4g} ({t['path']} {t['precision']}, graphs, {t['snr_db']:.1f} dB), "
                     f"target {t['target']:g}: {'met' if ok else 'MISSED'}")
    lines += ["", f"SNR against the plain fp32 decode (same codes, this run; a target counts rows of >= {MIN_SNR_DB:g} "
                  "dB only): " + ", ".join(f"{k} {v:.1f} dB" for k, v in result["snr_db"].items()),
              "", "Kernels per 1-frame step (one stream, eager; tensor ops off CUDA): "
              + ", ".join(f"{k} {v}" for k, v in result["kernels_per_step"].items()), "",
              "| path | precision | mode | B | frames/push | median ms | p95 ms | ms per stream-frame | s audio / s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['path']} | {r['precision']} | {r['mode']} | {r['batch']} | {r['frames']} | "
                     f"{r['median_ms']:.3f} | {r['p95_ms']:.3f} | {r['per_stream_frame_ms']:.4f} | "
                     f"{r['audio_s_per_s']:.1f} |")
    if result["layer_groups_ms"]:
        names = list(result["layer_groups_ms"])
        lines += ["", "Where the time goes: GPU ms per layer group of one eager step (CUDA events)", "",
                  "| group | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for group in GROUPS:
            lines.append(f"| {group} | " + " | ".join(f"{result['layer_groups_ms'][n][group]:.3f}" for n in names)
                         + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--frames", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "tf32", "bf16"], choices=["fp32", "tf32", "bf16"])
    parser.add_argument("--modes", nargs="+", default=["eager", "graphs"], choices=["eager", "graphs"])
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=None,
                        help="plain (the reference) and/or fused (Triton; default: both where available)")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--snr-streams", type=int, default=8, help="streams of the SNR check")
    parser.add_argument("--snr-frames", type=int, default=24, help="frames per stream of the SNR check")
    parser.add_argument("--tiny", action="store_true", help="the tiny test codec instead of the released shapes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="benchmarks/results/codec-timing.json",
                        help="JSON file; the Markdown report goes next to it (.md)")
    args = parser.parse_args(argv)
    if min(args.runs, *args.batch, *args.frames, args.snr_streams, args.snr_frames) < 1:
        parser.error("--runs, --batch, --frames, --snr-streams and --snr-frames must be >= 1")
    device = torch.device(args.device)
    paths = args.paths or (list(PATHS) if fused.available(device) else ["plain"])
    if "fused" in paths and not fused.available(device):
        parser.error("--paths fused needs triton and a CUDA device")
    decoder = tiny_codec(device) if args.tiny else real_codec(device)
    result = codec_timing(decoder, args.batch, args.frames, args.precisions, args.modes, args.runs, paths,
                          args.snr_streams, args.snr_frames)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
