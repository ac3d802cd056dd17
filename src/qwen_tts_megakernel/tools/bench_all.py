"""`qwen-tts-mk bench --all`: the whole system against the alternatives, in one process, on one GPU.

Sections (each median and p95 over several runs, all on the same random full-size weights and GPU):
  decode     megakernel talker step and full frame at 1, 16 and 64 streams vs the batched reference with CUDA
             graphs, next to the bandwidth floors measured in the same run (tools/mk_bench.py)
  streaming  in-process time to first chunk (request -> first PCM chunk of one frame) and RTF (compute time /
             audio duration) for short, medium and long texts, per backend
  official   the official qwen-tts package's generate: time to complete audio and RTF (own process)
  server     time to first chunk over loopback, HTTP and WebSocket, at 1, 4 and 16 concurrent streams
  pipecat    TTFB as Pipecat's own metrics report it for our two services

Random weights do not stop on EOS like real ones, so every run here has a FIXED FRAME COUNT (a benchmark-only
setting, labelled in the output). Writes benchmarks/results/<gpu>.json, .md and <gpu>-streaming.png.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from .common import git_commit, gpu_slug, summary

TEXTS = {  # (text, fixed frame count ~ what real speech of that length takes at 12.5 frames/s)
    "short": ("Hello there, how are you?", 25),
    "medium": ("The quick brown fox jumps over the lazy dog while the streaming engine turns every word into "
               "sound, one frame at a time.", 100),
    "long": (" ".join(["Streaming text to speech turns words into sound as soon as they arrive, so a voice agent "
                       "can answer before the whole sentence is written, and every frame of audio leaves the GPU "
                       "eighty milliseconds of speech at a time."] * 2), 400),
}


SECTIONS = ("decode", "streaming", "ttfc_breakdown", "streaming_plot", "official", "server", "pipecat")


# Sections -------------------------------------------------------------------------------------------------------


def _sync() -> None:
    """Wait for the GPU (nothing to wait for on a CPU-only run: the CPU tests run these sections there)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure_stream(synth, text: str, frames: int, seed: int) -> dict:
    """One streamed utterance: time to first chunk, compute time, chunk arrival times (s) vs audio end times."""
    _sync()
    start = time.perf_counter()
    stream = synth.stream(text, seed=seed, max_new_tokens=frames)
    arrivals, audio_ends, produced = [], [], 0
    for chunk in stream:
        produced += chunk.num_frames
        arrivals.append(time.perf_counter() - start)
        audio_ends.append(produced * synth.samples_per_frame / synth.sample_rate)
    total = time.perf_counter() - start
    return {"ttfc_s": arrivals[0], "total_s": total, "frames": produced, "stop_reason": stream.stop_reason,
            "arrivals_s": arrivals, "audio_end_s": audio_ends}


# Eager PyTorch takes ~0.1 s per frame and the official package ~0.2 s: one run each, and not the 400-frame text,
# keeps `bench --all` inside ten minutes.
SLOW_BACKENDS = {"reference": 1}
SLOW_TEXTS = ("short", "medium")


def section_streaming(synths: dict, runs: int) -> dict:
    out = {}
    for backend, synth in synths.items():
        measure_stream(synth, "Warm up.", 8, seed=0)
        per_text = {}
        for label, (text, frames) in TEXTS.items():
            if backend in SLOW_BACKENDS and label not in SLOW_TEXTS:
                continue
            n = min(runs, SLOW_BACKENDS.get(backend, runs))
            samples = [measure_stream(synth, text, frames, seed=i + 1) for i in range(n)]
            rtf = [s["total_s"] / s["audio_end_s"][-1] for s in samples]
            per_text[label] = {
                "text_words": len(text.split()), "fixed_frames": frames,
                "frames_produced": [s["frames"] for s in samples],
                "stop_reasons": sorted({s["stop_reason"] for s in samples}),
                "ttfc_ms": {k: (v * 1000 if k != "runs" else v) for k, v in
                            summary([s["ttfc_s"] for s in samples]).items()},
                "rtf": summary(rtf),
            }
        out[backend] = per_text
    return out


def section_ttfc_breakdown(synth, runs: int) -> dict:
    """Where the time to first chunk goes, stage by stage, for each text length, through the backend contract as
    the engine drives it; each stage ends when its own work is done:
      open_stream_prefill  backend.open: the prefill, device synchronised;
      first_frame          backend.step returning frame 0's codes;
      first_codec_decode   decoding frame 0 to int16 PCM on the host (the engine's push_pcm16: decode, conversion
                           on the device, one copy);
      send                 the engine's event thread handing the chunk to a consumer's queue."""
    import queue

    from ..codec import StreamingCodec
    from ..engine import PromptSource
    from ..engine.delivery import Courier

    codec = StreamingCodec(synth.codec, max_streams=1)
    codec.warm_up()
    courier, inbox = Courier(), queue.SimpleQueue()
    courier.start()

    def once(text: str) -> dict:
        marks = {}

        def mark(name: str, t0: float, sync: bool = True) -> float:
            if sync:
                _sync()
            now = time.perf_counter()
            marks[name] = 1000 * (now - t0)
            return now

        _sync()  # the previous run's queued frame must not count here
        t = time.perf_counter()
        request = synth.prepare(text, max_new_tokens=8)
        t = mark("tokenize_and_layout_ms", t)
        with torch.inference_mode():
            spec = PromptSource(request, seed=1).spec(synth.embedder, synth.config)
            prefill = spec.prefill
            t = mark("embed_rows_ms", t)
            [stream] = synth.backend.open([spec])
            t = mark("open_stream_prefill_ms", t)
            codes = synth.backend.step([stream]).codes[0]
            t = mark("first_frame_ms", t, sync=False)
            handle = codec.open()
            pcm = codec.push_pcm16([handle], [codes[None]]).wait()  # waits for the codec's work only
            codec.close(handle)
            t = mark("first_codec_decode_ms", t, sync=False)
            courier.post(inbox.put, ("chunk", pcm[0]))
            inbox.get()
            mark("send_ms", t, sync=False)
            synth.backend.close(stream)
        marks["prefill_rows"] = len(prefill)
        return marks

    try:
        once("Warm up.")
        out = {}
        for label, (text, _) in TEXTS.items():
            samples = [once(text) for _ in range(runs)]
            out[label] = {k: statistics.median([x[k] for x in samples]) for k in samples[0]}
    finally:
        courier.stop()
    return out


def section_plot(synth, out_png: Path) -> dict:
    """Chunk arrival time against the audio time it completes, for one long utterance."""
    text, frames = TEXTS["long"]
    s = measure_stream(synth, text, frames, seed=99)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.step(s["audio_end_s"], s["arrivals_s"], where="post", label="chunk ready (wall clock)")
    ax.plot([0, s["audio_end_s"][-1]], [0, s["audio_end_s"][-1]], "--", label="real time (playback)")
    ax.set_xlabel("audio time covered (s)")
    ax.set_ylabel("time since request (s)")
    ax.set_title(f"Streaming proof: {len(s['arrivals_s'])} chunks, first after {1000 * s['ttfc_s']:.1f} ms")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return {"png": out_png.name, "ttfc_ms": 1000 * s["ttfc_s"], "total_s": s["total_s"],
            "audio_s": s["audio_end_s"][-1], "chunks": len(s["arrivals_s"])}


def section_official(model_dir: Path, site: str | None, runs: int) -> dict:
    env = dict(os.environ)
    if site:
        env["PYTHONPATH"] = os.pathsep.join([site, env.get("PYTHONPATH", "")])
    frames = [TEXTS[label][1] for label in SLOW_TEXTS]
    cmd = [sys.executable, "-m", "qwen_tts_megakernel.tools.official_baseline", "--model", str(model_dir),
           "--runs", str(runs), "--frames", *map(str, frames)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=420)
    if proc.returncode != 0:
        raise RuntimeError(f"official baseline failed: {proc.stderr.strip().splitlines()[-1:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for label, entry in zip(SLOW_TEXTS, result["results"]):
        entry["text"] = label
    return result


# Orchestration --------------------------------------------------------------------------------------------------


def run_all(args) -> int:
    if not torch.cuda.is_available():
        print("bench --all needs a CUDA GPU", file=sys.stderr)
        return 2
    from ..engine import Synthesizer
    from ..synthetic import random_checkpoint, write_random_model

    device = torch.device(args.device or "cuda")
    size = args.random_weights or "0.6b"
    runs = int(getattr(args, "runs", None) or 5)
    out_dir = Path(args.output_dir or "benchmarks/results")
    out_dir.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(device)
    slug = gpu_slug(name)
    report = {
        "benchmark": "all", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(), "device": name, "sm_count": torch.cuda.get_device_properties(device).multi_processor_count,
        "torch": torch.__version__, "host": platform.node(), "model": f"random weights, real {size} shapes",
        "kernel_defines": os.environ.get("QWEN_TTS_MK_DEFINES", ""),  # compile-time kernel switches, "" = defaults
        "fixed_frame_count": "benchmark-only: random weights do not stop on EOS, so each run generates a fixed "
                             "number of frames (max_new_tokens)",
        "sections": {}, "errors": {},
    }
    started = time.perf_counter()

    only = set(getattr(args, "only", None) or ())
    unknown = only - set(SECTIONS)
    if unknown:
        print(f"bench --all --only: unknown section(s) {sorted(unknown)}; choose from {list(SECTIONS)}",
              file=sys.stderr)
        return 2
    if only:
        report["only"] = sorted(only)

    def section(key: str, fn):
        if only and key != "load" and key not in only:
            return
        t0 = time.perf_counter()
        print(f"[bench --all] {key} ...", file=sys.stderr, flush=True)
        try:
            report["sections"][key] = fn()
        except Exception as exc:  # one failing section must not hide the others' numbers
            report["errors"][key] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        print(f"[bench --all] {key} done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)

    checkpoint = random_checkpoint(size, seed=0, device=device)
    report["model_shapes"] = {"talker": vars(checkpoint.config.talker),
                              "code_predictor": vars(checkpoint.config.code_predictor)}
    synths = {}

    def load():
        for label, backend in (("megakernel", "megakernel"), ("reference-graphed", "graphed"),
                               ("reference", "reference")):
            synths[label] = Synthesizer.from_checkpoint(checkpoint, backend=backend, device=device,
                                                        dtype=torch.bfloat16, max_streams=4)
        return {"backends": list(synths)}

    section("load", load)

    def decode():
        from .mk_bench import run_bench

        return run_bench(size=size, device=str(device), out_dir=str(out_dir), weights=checkpoint.weights,
                         config=checkpoint.config, batches=DECODE_BATCHES)

    section("decode", decode)
    section("streaming", lambda: section_streaming(synths, runs))
    section("ttfc_breakdown", lambda: section_ttfc_breakdown(synths["megakernel"], runs))
    section("streaming_plot", lambda: section_plot(synths["megakernel"], out_dir / f"{slug}-streaming.png"))

    def official():
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = write_random_model(Path(tmp) / "model", size, seed=0, device=device)
            return section_official(model_dir, getattr(args, "official_site", None), 1)

    section("official", official)
    synths.clear()
    torch.cuda.empty_cache()

    def server():
        from types import SimpleNamespace

        from .server_bench import run_bench_server

        sargs = SimpleNamespace(model=f"random:{size}", backend="megakernel", device=str(device), dtype=None,
                                output_dir=str(out_dir / "server"), concurrency=(1, 4, 16), requests_per_client=3,
                                max_new_tokens=TEXTS["medium"][1], protocols=("http", "ws"), text=TEXTS["medium"][0])
        code = run_bench_server(sargs)
        latest = sorted((out_dir / "server").glob("server_*.json"))[-1]
        result = json.loads(latest.read_text())
        result["exit_code"] = code
        return result

    section("server", server)

    def pipecat():
        from loguru import logger

        from .pipecat_bench import measure_ttfb
        from ..testing.server import TTSServerProcess

        logger.remove()
        logger.add(sys.stderr, level="WARNING")
        with TTSServerProcess(f"random:{size}", backend="megakernel", device=str(device),
                              startup_timeout_s=300) as srv:
            result = measure_ttfb(srv.base_url, runs=runs, max_new_tokens=TEXTS["short"][1])
        result["server"] = "qwen-tts-mk serve --backend megakernel (random weights), loopback"
        return result

    section("pipecat", pipecat)
    report["elapsed_s"] = time.perf_counter() - started
    stem = slug if not only else f"{slug}-only-{'-'.join(sorted(only))}"  # a partial run keeps the full file
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / f"{stem}.md").write_text(format_markdown(report))
    print(format_markdown(report))
    return 1 if report["errors"] else 0


def _ms(d: dict | None, key: str = "median") -> str:
    return f"{d[key]:.1f}" if d and isinstance(d.get(key), (int, float)) else "n/a"


DECODE_BATCHES = (1, 16, 64)


def format_markdown(r: dict) -> str:
    s = r["sections"]
    lines = [f"# {r['device']}: qwen-tts-megakernel vs alternatives ({r['model']})", "",
             f"{r['date']}, commit {r['commit']}, torch {r['torch']}, kernel switches: "
             f"{r.get('kernel_defines') or 'defaults'}. {r['fixed_frame_count']}.", ""]
    dec = s.get("decode")
    if dec:
        g = dec.get("reference_graphs") or {}
        lines += ["## Decode, batched (megakernel: one launch per frame for every stream)", "",
                  "| streams | frame ms | talker step ms | audio s/s | floor ring / matvec ms | "
                  "reference + CUDA graphs frame ms |", "|---|---|---|---|---|---|"]
        for b, m in dec["megakernel"].items():
            ref = g.get(b) if isinstance(g.get(b), dict) else {}
            lines.append(f"| {b} | {m['frame_ms']:.3f} | {m['talker_step_ms']:.3f} | {m['audio_s_per_s']:.1f} | "
                         f"{m['floor_ring_ms']:.3f} / {m['floor_matvec_ms']:.3f} | {_ms(ref, 'frame_ms')} |")
        lines += ["", f"Weight ring alone {dec['ring_GBps']:.0f} GB/s, large bf16 matvec {dec['matvec_GBps']:.0f} GB/s "
                  f"(the floors: weight + KV bytes over these).", ""]
    st = s.get("streaming")
    if st:
        lines += ["## In-process streaming", "", "| backend | text | frames | time to first chunk (ms) median / p95 | "
                  "RTF median / p95 |", "|---|---|---|---|---|"]
        for backend, per_text in st.items():
            for label, v in per_text.items():
                lines.append(f"| {backend} | {label} ({v['text_words']} words) | {v['fixed_frames']} | "
                             f"{_ms(v['ttfc_ms'])} / {_ms(v['ttfc_ms'], 'p95')} | "
                             f"{v['rtf']['median']:.4f} / {v['rtf']['p95']:.4f} |")
        lines.append("")
    br = s.get("ttfc_breakdown")
    if br:
        keys = [k for k in next(iter(br.values())) if k.endswith("_ms")]
        lines += ["## Time to first chunk, stage by stage (megakernel, median ms)", "",
                  "| text | prefill rows | " + " | ".join(k.removesuffix("_ms").replace("_", " ") for k in keys) + " |",
                  "|---" * (len(keys) + 2) + "|"]
        for label, v in br.items():
            lines.append(f"| {label} | {v['prefill_rows']:.0f} | " + " | ".join(f"{v[k]:.2f}" for k in keys) + " |")
        lines.append("")
    off = s.get("official")
    if off:
        lines += ["## The official qwen-tts package (same weights and GPU)", "",
                  "| text | frames | time to complete audio (ms) median / p95 | RTF | ms per frame |",
                  "|---|---|---|---|---|"]
        for v in off["results"]:
            t = v["time_to_complete_audio_ms"]
            lines.append(f"| {v.get('text', '')} | {v['frames_requested']} | {t['median']:.0f} / {t['p95']:.0f} | "
                         f"{v['rtf_median']:.3f} | {v['ms_per_frame_median']:.1f} |")
        lines.append("")
    srv = s.get("server")
    if srv:
        lines += ["## Server over loopback", "", "| protocol | concurrent | TTFC (ms) median / p95 | RTF median |",
                  "|---|---|---|---|"]
        for v in srv["results"]:
            lines.append(f"| {v['protocol']} | {v['clients']} | {_ms({'m': v['ttfc_ms_median']}, 'm')} / "
                         f"{_ms({'m': v['ttfc_ms_p95']}, 'm')} | {v['rtf_median'] or float('nan'):.3f} |")
        lines.append("")
    pc = s.get("pipecat")
    if pc:
        lines += ["## Pipecat (TTFB from Pipecat's own metrics)", "", "| service | TTFB (ms) median / p95 | runs |",
                  "|---|---|---|"]
        for key in ("http", "websocket"):
            v = pc.get(key)
            if v:
                lines.append(f"| {v['service']} | {_ms({'m': v['ttfb_ms_median']}, 'm')} / "
                             f"{_ms({'m': v['ttfb_ms_p95']}, 'm')} | {v['with_metric']}/{v['runs']} |")
        lines.append("")
    if r.get("errors"):
        lines += ["## Sections that failed", ""] + [f"- {k}: {v}" for k, v in r["errors"].items()] + [""]
    lines += ["Written by `qwen-tts-mk bench --all` (src/qwen_tts_megakernel/tools/bench_all.py).", ""]
    return "\n".join(lines)
