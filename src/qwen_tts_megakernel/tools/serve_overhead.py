"""`qwen-tts-mk bench --serve-overhead`: the time to first audio Ray Serve adds over the direct server, in one run.

The same model and backend are served on this machine one after the other: `qwen-tts-mk serve` in a subprocess
(direct), then a one-replica Ray Serve deployment (server/ray_serve.py) on a local Ray instance behind each of
Serve's ingresses (HAProxy, then the Python proxy; a fresh Ray instance for each, as the ingress is fixed when Ray
starts). Each is driven by load_bench's closed-loop Fleet over HTTP (/tts/stream) and WebSocket at 1 and 16
concurrent streams, and the report gives p50 and p95 time to first audio (request sent -> first audio byte at the
client) for each and what Serve adds. JSON and Markdown are written by this command. Needs the [ray] extra.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import json
import math
import os
import sys
from pathlib import Path

from ..testing.server import TTSServerProcess, free_port
from .common import git_commit, gpu_slug
from .load_bench import Fleet, fmt

LEVELS = (1, 16)
PROTOCOLS = ("http", "ws")
TARGET_ADDED_P50_MS = 3.0


def measure(url: str, *, protocols=PROTOCOLS, levels=LEVELS, frames: int = 25, requests: int = 32) -> list[dict]:
    """Closed-loop rows against one server: at least `requests` requests per (protocol, level)."""
    fleet = Fleet(url, frames)
    asyncio.run(fleet.closed_loop("http", 2, 1))  # warm-up: graphs, allocator, connections
    rows = []
    for protocol in protocols:
        for streams in levels:
            row = asyncio.run(fleet.closed_loop(protocol, streams, math.ceil(requests / streams)))
            rows.append(row)
            print(f"[serve-overhead] {url} {protocol} x{streams}: TTFA p50 {fmt(row['ttfa_ms']['p50'])} ms, "
                  f"p95 {fmt(row['ttfa_ms']['p95'])} ms, ok {row['ok']}/{row['requests']}", file=sys.stderr,
                  flush=True)
    return rows


def compare(direct: list[dict], served: list[dict], ingress: str) -> list[dict]:
    """One row per (protocol, streams): TTFA p50/p95 direct, through Serve's `ingress`, and added by Serve."""
    out = []
    for d, s in zip(direct, served):
        if (d["protocol"], d["streams"]) != (s["protocol"], s["streams"]):
            raise ValueError(f"rows out of step: {d['protocol']} x{d['streams']} vs {s['protocol']} x{s['streams']}")
        row = {"ingress": ingress, "protocol": d["protocol"], "streams": d["streams"],
               "ok_direct": f"{d['ok']}/{d['requests']}", "ok_serve": f"{s['ok']}/{s['requests']}"}
        for q in ("p50", "p95"):
            a, b = d["ttfa_ms"][q], s["ttfa_ms"][q]
            row[f"direct_{q}_ms"], row[f"serve_{q}_ms"] = a, b
            row[f"added_{q}_ms"] = None if a is None or b is None else b - a
        out.append(row)
    return out


def markdown(report: dict) -> str:
    lines = [f"# Ray Serve overhead ({report['device']}, {report['date']}, commit {report['commit']})", "",
             f"{report['backend']} backend, {report['model']}; every request asks for {report['frames']} frames. "
             "Time to first audio (TTFA) = request sent to first audio byte at the client over loopback; direct = "
             "`qwen-tts-mk serve`, Serve = one replica behind one of Ray Serve's ingresses (`haproxy`: HAProxy "
             "straight to the replica's HTTP server, the default of `serve --ray`; `proxy`: Serve's Python proxy), "
             f"measured in the same run, Ray {report['ray']}. Target: at most {TARGET_ADDED_P50_MS:g} ms added at p50.",
             "", "| Serve ingress | protocol | streams | ok direct / Serve | TTFA p50 direct / Serve / added (ms) | "
             "TTFA p95 direct / Serve / added (ms) |", "|---|---|---|---|---|---|"]
    for r in report["comparison"]:
        lines.append(f"| {r['ingress']} | {r['protocol']} | {r['streams']} | {r['ok_direct']} / {r['ok_serve']} | "
                     f"{fmt(r['direct_p50_ms'])} / {fmt(r['serve_p50_ms'])} / {fmt(r['added_p50_ms'], '+.1f')} | "
                     f"{fmt(r['direct_p95_ms'])} / {fmt(r['serve_p95_ms'])} / {fmt(r['added_p95_ms'], '+.1f')} |")
    lines += ["", "Written by `qwen-tts-mk bench --serve-overhead` (src/qwen_tts_megakernel/tools/serve_overhead.py)."]
    return "\n".join(lines) + "\n"


def run_bench_serve_overhead(args) -> int:
    try:
        import ray
        from ray import serve
    except ImportError:
        print("qwen-tts-mk bench: error: --serve-overhead needs the [ray] extra: "
              "pip install 'qwen-tts-megakernel[ray]'", file=sys.stderr)
        return 2
    import torch

    from ..server.protocol import ServerSettings
    from ..server.ray_serve import INGRESSES, check_ingress_available, options_from, ray_environment, start

    model = getattr(args, "model", None) or "random:0.6b"
    backend = getattr(args, "backend", None) or ("megakernel" if torch.cuda.is_available() else "reference")
    device = getattr(args, "device", None)
    frames = getattr(args, "frames", None) or 25
    levels = tuple(getattr(args, "levels", None) or LEVELS)
    protocols = tuple(getattr(args, "protocols", None) or PROTOCOLS)
    ingresses = (args.ray_ingress,) if getattr(args, "ray_ingress", None) else INGRESSES
    max_active = max(levels)
    # 8 rounds at the top level: the first-audio times of a burst spread widely.
    kw = dict(protocols=protocols, levels=levels, frames=frames, requests=max(32, 8 * max(levels)))

    env = dict(os.environ, QWEN_TTS_MK_MAX_ACTIVE=str(max_active), QWEN_TTS_MK_MAX_QUEUE=str(max_active))
    print(f"[serve-overhead] direct server: {backend} on {model} ...", file=sys.stderr, flush=True)
    with TTSServerProcess(model, backend=backend, device=device, env=env, startup_timeout_s=900) as server:
        direct = measure(server.base_url, **kw)

    comparison, served = [], {}
    for ingress in ingresses:
        print(f"[serve-overhead] Ray Serve, one replica, {ingress} ingress ...", file=sys.stderr, flush=True)
        check_ingress_available(ingress)
        os.environ.update(ray_environment(ingress))  # read by the Ray processes ray.init() starts
        ray.init(include_dashboard=False, logging_level="WARNING")
        try:
            gpus = 1 if torch.cuda.is_available() and device != "cpu" else 0
            options = options_from(model=model, ingress=ingress, backend=backend,
                                   device=device if not gpus else None, replicas=1, gpus_per_replica=gpus,
                                   settings=ServerSettings(max_active=max_active, max_queue=max_active))
            port = free_port()
            start(options, host="127.0.0.1", port=port)
            served[ingress] = measure(f"http://127.0.0.1:{port}", **kw)
        finally:
            serve.shutdown()
            ray.shutdown()
        comparison += compare(direct, served[ingress], ingress)

    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    now = _dt.datetime.now(_dt.timezone.utc)
    report = {"benchmark": "serve_overhead", "date": now.isoformat(timespec="seconds"), "commit": git_commit(),
              "device": name, "model": model, "backend": backend, "frames": frames, "ray": ray.__version__,
              "comparison": comparison, "direct": direct, "serve": served}
    out_dir = Path(getattr(args, "output_dir", None) or "benchmarks/results")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{gpu_slug(name)}-serve-overhead"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {stem}.json and .md", file=sys.stderr)
    return 0
