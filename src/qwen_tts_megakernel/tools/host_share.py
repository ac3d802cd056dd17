"""The engine's own cost, in process: the host's share of a step at 1, 16 and 64 streams, and the first chunk stage
by stage.

    python -m qwen_tts_megakernel.tools.host_share --model random:0.6b --backend megakernel --streams 1 16 64

For each stream count N: N streams of `--frames` frames start together on one engine (after a warm-up run at the
same N); the engine's StepProfile (engine/step_profile.py) splits the wall time of every step that stepped N streams
into GPU waits (the backend's frame, the codec's chunks), prefill and host work, the part no GPU speed hides (the
target: <= 1 ms at 64). The first chunk of each stream is split into queued, prefill, first step, codec (decode,
int16 conversion, copy to the host) and send (the event thread's hand-over); medians over the N streams.
Writes benchmarks/results/<gpu>[-size]-host-share.json and .md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import sys
import threading
from pathlib import Path

import torch

from .common import git_commit, gpu_slug

TEXT = ("The quick brown fox jumps over the lazy dog while the streaming engine turns every word into sound, one "
        "frame at a time.")


def run_streams(synth, streams: int, frames: int, seed: int = 0) -> list:
    """`streams` streams submitted together, each consumed on its own thread until done; returns their jobs."""
    from ..engine import PromptSource

    request = synth.prepare(TEXT, max_new_tokens=frames)
    events = [synth.submit(PromptSource(request, seed + i), audio=True, frames=False) for i in range(streams)]

    def drain(ev):
        while ev.next()[0] != "done":
            pass

    threads = [threading.Thread(target=drain, args=(ev,)) for ev in events]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    return [ev.job for ev in events]


def measure(synth, streams: int, frames: int) -> dict:
    profile = synth.engine.step_profile
    run_streams(synth, streams, min(frames, 16), seed=10_000)  # warm-up at this size: graphs, allocator
    profile.reset()
    jobs = run_streams(synth, streams, frames)
    steps = profile.summary()
    stages = [j.first_chunk_stages_ms() for j in jobs]
    names = [name for name, _ in jobs[0].FIRST_CHUNK_STAGES]
    first_chunk = {n: statistics.median(s[n] for s in stages if n in s) for n in names if any(n in s for s in stages)}
    return {"streams": streams, "frames": frames, "step": steps.get(str(profile.bucket(streams))), "by_bucket": steps,
            "first_chunk_ms": first_chunk,
            "time_to_first_chunk_ms": statistics.median(sum(s.values()) for s in stages)}


def markdown(report: dict) -> str:
    lines = [f"# Engine step split and first chunk ({report['device']}, {report['model']}, {report['backend']})", "",
             f"{report['date']}, commit {report['commit']}. Every step that stepped all N streams: mean wall time, "
             "the part spent waiting on the GPU, on prefill, and the rest (host work: the target is <= 1 ms at 64).",
             "", "| streams | steps | step ms | GPU wait ms | prefill ms | host ms | first chunk ms: "
             + " / ".join(report["stages"]) + " | time to first chunk ms |", "|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        s = r["step"] or {}
        f = lambda k: f"{s[k]:.3f}" if k in s else "-"  # noqa: E731
        fc = " / ".join(f"{r['first_chunk_ms'][n]:.2f}" if n in r["first_chunk_ms"] else "-" for n in report["stages"])
        lines.append(f"| {r['streams']} | {s.get('steps', 0)} | {f('step_ms')} | {f('gpu_wait_ms')} | "
                     f"{f('prefill_ms')} | {f('host_ms')} | {fc} | {r['time_to_first_chunk_ms']:.2f} |")
    lines += ["", "Written by `python -m qwen_tts_megakernel.tools.host_share` (tools/host_share.py).", ""]
    return "\n".join(lines)


def run(args) -> dict:
    from ..engine import EngineSettings, Job, Synthesizer

    streams = sorted(set(args.streams))
    synth = Synthesizer.from_pretrained(args.model, backend=args.backend, device=args.device,
                                        max_streams=max(streams),
                                        engine_settings=EngineSettings(max_active=max(streams),
                                                                       realtime_admission=False))
    try:
        results = [measure(synth, n, args.frames) for n in streams]
    finally:
        synth.close()
    device = torch.cuda.get_device_name() if synth.codec_device.type == "cuda" else "cpu"
    return {"benchmark": "host_share", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "commit": git_commit(), "device": device, "model": args.model, "backend": args.backend,
            "stages": [name for name, _ in Job.FIRST_CHUNK_STAGES], "results": results}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwen_tts_megakernel.tools.host_share")
    p.add_argument("--model", default="random:0.6b")
    p.add_argument("--backend", default="megakernel", choices=["reference", "graphed", "megakernel"])
    p.add_argument("--device", default=None)
    p.add_argument("--streams", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--frames", type=int, default=100)
    p.add_argument("--output-dir", default="benchmarks/results")
    args = p.parse_args(argv)
    if min(args.streams) < 1 or max(args.streams) > 64 or args.frames < 1:
        print("--streams: 1..64 each; --frames: >= 1", file=sys.stderr)
        return 2
    report = run(args)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    size = args.model.removeprefix("random:") if args.model.startswith("random:") else Path(args.model).name
    stem = out / f"{gpu_slug(report['device'])}{'' if size == '0.6b' else '-' + size}-host-share"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
