"""`qwen-tts-mk bench --load`: a fleet of voice-agent calls against a server over loopback, heard like a listener.

For each backend (and model) it starts `qwen-tts-mk serve` in a subprocess and drives it with two load shapes,
over HTTP (/tts/stream) and WebSocket (/v1/audio/speech/stream):

  closed loop   N calls always in flight (N = 1, 8, 16, 32, 64, 128): each client sends its next request as
                soon as the previous one ends;
  open loop     Poisson arrivals at R requests per second, R increasing until p95 time to first audio passes
                the bound (200 ms by default).

By default the open loop runs first, each protocol's rates against a freshly started server, because that is what
a deployment sees (only the engine's own start-up warm-up ran before); the closed-loop levels run on another
server. `--open-loop-after-closed` keeps one server and runs the open loop after the closed loop had warmed it
(the order of results committed before issue 24). The report says which (`open_loop_server`, and each open-loop
row's `server`), with each server's start-up time. `--server-logs DIR` keeps every server's log; with
QWEN_TTS_MK_STEP_LOG=N in the environment those logs hold the engine's step-time table and stream counts every N
steps.

Every request asks for a fixed number of frames (random weights never stop on EOS: the report says so). Each
simulated listener starts playing at its first audio byte (after a jitter buffer of 0 or 200 ms) and plays in real
time; an underrun is any moment it has nothing to play (playback then waits for the next bytes). Reported per
level: p50/p95/p99 time to first audio (request sent -> first audio byte), per-stream RTF (request sent -> last
byte, over the audio duration), underrun count and seconds for each buffer, aggregate seconds of audio per second,
GPU memory in use. JSON, Markdown and a plot of p95 time to first audio against load are written by this command.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..engine.step_profile import StepProfile
from ..testing.server import TTSServerProcess
from .common import git_commit, gpu_slug

TEXT = ("Thanks for calling. I can help you change your booking, check the status of an order, or connect you with "
        "someone from our team. What would you like to do today?")
BYTES_PER_SECOND = 24000 * 2
JITTER_BUFFERS_S = (0.0, 0.2)
CLOSED_LEVELS = (1, 8, 16, 32, 64, 128)
OPEN_RATES = (2, 5, 10, 20, 40, 60, 80, 120)


@dataclass
class Heard:
    """One request as its client saw it: when it was sent and when each piece of audio arrived."""

    sent: float
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (time, bytes) per received piece
    error: str | None = None
    server_first_chunk_ms: dict[str, float] = field(default_factory=dict)  # WS audio_done: the server's stages

    @property
    def audio_s(self) -> float:
        return sum(n for _, n in self.arrivals) / BYTES_PER_SECOND

    @property
    def first_audio_s(self) -> float | None:
        return self.arrivals[0][0] - self.sent if self.arrivals else None


def underruns(arrivals: list[tuple[float, int]], buffer_s: float) -> tuple[int, float]:
    """Play the arrivals in real time from the first byte + buffer_s; return (underrun count, seconds silent).

    `play_end` is when the player runs dry if nothing more arrives. An arrival after that moment is one underrun
    lasting until the arrival; playback resumes with it at once. The end of the stream is not an underrun."""
    if not arrivals:
        return 0, 0.0
    count, silent = 0, 0.0
    t0, n0 = arrivals[0]
    play_end = t0 + buffer_s + n0 / BYTES_PER_SECOND
    for t, n in arrivals[1:]:
        if t > play_end:
            count += 1
            silent += t - play_end
            play_end = t
        play_end += n / BYTES_PER_SECOND
    return count, silent


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize(heard: list[Heard], wall_s: float) -> dict:
    ok = [h for h in heard if h.error is None and h.arrivals]
    ttfa = [1000 * h.first_audio_s for h in ok]
    rtf = [(h.arrivals[-1][0] - h.sent) / h.audio_s for h in ok if h.audio_s > 0]
    result = {"requests": len(heard), "ok": len(ok), "errors": sorted({h.error for h in heard if h.error})[:5],
              "ttfa_ms": {"p50": percentile(ttfa, 50), "p95": percentile(ttfa, 95), "p99": percentile(ttfa, 99)},
              "rtf": {"p50": percentile(rtf, 50), "p95": percentile(rtf, 95)},
              "audio_s": sum(h.audio_s for h in ok), "wall_s": wall_s,
              "audio_s_per_s": sum(h.audio_s for h in ok) / wall_s if wall_s > 0 else None}
    staged = [h for h in ok if h.server_first_chunk_ms]
    if staged:  # WebSocket: where the first chunk's time went in the server, then the rest until the client had it
        stages = {name: percentile([h.server_first_chunk_ms[name] for h in staged if name in h.server_first_chunk_ms],
                                   50) for name in staged[0].server_first_chunk_ms}
        stages["to_client"] = percentile([1000 * h.first_audio_s - sum(h.server_first_chunk_ms.values())
                                          for h in staged], 50)
        result["first_chunk_ms_p50"] = stages
    for buffer_s in JITTER_BUFFERS_S:
        counts = [underruns(h.arrivals, buffer_s) for h in ok]
        result[f"underruns_{int(buffer_s * 1000)}ms"] = {"count": sum(c for c, _ in counts),
                                                         "seconds": sum(s for _, s in counts),
                                                         "streams_with_any": sum(1 for c, _ in counts if c)}
    return result


# Clients ---------------------------------------------------------------------------------------------------------


async def http_request(client, url: str, body: dict) -> Heard:
    heard = Heard(sent=time.perf_counter())
    try:
        async with client.stream("POST", f"{url}/tts/stream", json=body) as r:
            if r.status_code != 200:
                heard.error = f"HTTP {r.status_code}"
                return heard
            async for piece in r.aiter_raw():
                if piece:
                    heard.arrivals.append((time.perf_counter(), len(piece)))
    except Exception as exc:  # noqa: BLE001 - a failed request is counted, the run goes on
        heard.error = type(exc).__name__
    return heard


async def ws_request(ws_url: str, cid: str, body: dict) -> Heard:
    import websockets

    heard = Heard(sent=time.perf_counter())
    try:
        async with websockets.connect(ws_url, max_size=None) as conn:
            config = {"type": "config", "context_id": cid, "seed": body["seed"],
                      "max_new_tokens": body["max_new_tokens"], "language": body.get("language")}
            await conn.send(json.dumps(config))
            await conn.send(json.dumps({"type": "text", "context_id": cid, "text": body["text"]}))
            await conn.send(json.dumps({"type": "flush", "context_id": cid}))
            while True:
                msg = await conn.recv()
                if isinstance(msg, bytes):
                    heard.arrivals.append((time.perf_counter(), len(msg) - 1 - msg[0]))
                    continue
                event = json.loads(msg)
                if event["type"] == "error":
                    heard.error = "ws error: " + event.get("message", "")[:60]
                    return heard
                if event["type"] == "audio_done":
                    heard.server_first_chunk_ms = event.get("first_chunk_ms") or {}
                    return heard
    except Exception as exc:  # noqa: BLE001
        heard.error = type(exc).__name__
    return heard


class Fleet:
    """Requests against one server: a shared HTTP client, WebSocket connections per request."""

    def __init__(self, url: str, frames: int):
        self.url, self.frames = url, frames
        self.ws_url = url.replace("http://", "ws://") + "/v1/audio/speech/stream"
        self.counter = 0

    def body(self) -> dict:
        self.counter += 1
        return {"text": TEXT, "language": "english", "max_new_tokens": self.frames, "seed": self.counter}

    async def one(self, client, protocol: str) -> Heard:
        if protocol == "http":
            return await http_request(client, self.url, self.body())
        return await ws_request(self.ws_url, f"c{self.counter}", self.body())

    async def closed_loop(self, protocol: str, streams: int, requests_per_stream: int) -> dict:
        import httpx

        heard: list[Heard] = []
        limits = httpx.Limits(max_connections=streams + 8, max_keepalive_connections=streams + 8)
        async with httpx.AsyncClient(timeout=600, limits=limits) as client:
            async def caller():
                for _ in range(requests_per_stream):
                    heard.append(await self.one(client, protocol))

            before = await self.engine_steps(client)
            start = time.perf_counter()
            await asyncio.gather(*[caller() for _ in range(streams)])
            wall = time.perf_counter() - start
            steps = StepProfile.between(before, await self.engine_steps(client))
        # The engine's step split at this level's full batch (its largest bucket): GPU waits, prefill, host work.
        full = max(steps, key=int) if steps else None
        return {"shape": "closed", "protocol": protocol, "streams": streams, **summarize(heard, wall),
                "engine_step": steps.get(full), "engine_steps_by_bucket": steps}

    async def engine_steps(self, client) -> dict:
        """The server's running step totals (GET /health's engine_steps; {} from a server without them)."""
        try:
            return (await client.get(f"{self.url}/health")).json().get("engine_steps") or {}
        except Exception:  # noqa: BLE001 - the split is extra information; the run goes on without it
            return {}

    async def open_loop(self, protocol: str, rate: float, duration_s: float, seed: int = 0) -> dict:
        import httpx

        rng = random.Random(seed)
        heard: list[Heard] = []
        tasks = []
        async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=1024)) as client:
            async def one():
                heard.append(await self.one(client, protocol))

            start = time.perf_counter()
            t = 0.0
            while True:
                t += rng.expovariate(rate)
                if t > duration_s:
                    break
                await asyncio.sleep(max(0.0, start + t - time.perf_counter()))
                tasks.append(asyncio.create_task(one()))
            await asyncio.gather(*tasks)
            wall = time.perf_counter() - start
        return {"shape": "open", "protocol": protocol, "rate": rate, **summarize(heard, wall)}


def gpu_memory_mib() -> int | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout.split()
        return int(out[0]) if out else None
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


# The command -----------------------------------------------------------------------------------------------------


class StartedServer:
    """`qwen-tts-mk serve` in a subprocess for one phase of the benchmark: its start-up time (model load and the
    engine's warm-up) is measured; its log goes to `log_dir` when one is given."""

    def __init__(self, model: str, backend: str, device: str | None, args, phase: str):
        env = dict(os.environ, QWEN_TTS_MK_MAX_ACTIVE=str(args.max_active),
                   QWEN_TTS_MK_MAX_QUEUE=str(args.max_queue))
        log_dir = getattr(args, "server_logs", None)
        log_path = None
        if log_dir:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            log_path = Path(log_dir) / f"{model.replace(':', '-').replace('/', '-')}-{backend}-{phase}.log"
        self.server = TTSServerProcess(model, backend=backend, device=device, env=env, startup_timeout_s=900,
                                       log_path=log_path)
        self.label, self.start_s = f"{backend} on {model} ({phase})", None

    def __enter__(self) -> "StartedServer":
        print(f"[load] starting {self.label} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        self.server.__enter__()
        self.start_s = time.perf_counter() - started
        print(f"[load] {self.label} up in {self.start_s:.1f} s", file=sys.stderr, flush=True)
        return self

    def __exit__(self, *exc) -> None:
        self.server.__exit__(*exc)


def open_rates(fleet: Fleet, backend: str, protocol: str, args, server: str) -> list[dict]:
    """The open-loop rates in order, until p95 time to first audio passes the bound; `server` says what ran on
    the server before ("fresh" or "after closed loop")."""
    rows = []
    for rate in args.rates:
        r = asyncio.run(fleet.open_loop(protocol, rate, args.open_seconds))
        r.update(server=server, gpu_memory_mib=gpu_memory_mib())
        rows.append(r)
        print(f"[load] {backend} {protocol} open {rate}/s ({server} server): p95 TTFA {fmt(r['ttfa_ms']['p95'])} "
              f"ms, ok {r['ok']}/{r['requests']}", file=sys.stderr, flush=True)
        if (r["ttfa_ms"]["p95"] or 0) > args.ttfa_bound_ms:
            break
    return rows


def run_backend(model: str, backend: str, device: str | None, args) -> dict:
    """By default each protocol's open-loop rates run first, against a freshly started server (what a deployment
    sees: nothing warmed the engine but its own start-up); the closed-loop levels then run on another server,
    after a warm-up request. `--open-loop-after-closed` runs everything on one server, open loop last."""
    rows, starts = [], {}
    fresh_open = not getattr(args, "open_loop_after_closed", False)
    if fresh_open:
        for protocol in args.protocols:
            with StartedServer(model, backend, device, args, f"open-{protocol}") as started:
                starts[f"open-{protocol}"] = started.start_s
                rows += open_rates(Fleet(started.server.base_url, args.frames), backend, protocol, args, "fresh")
    with StartedServer(model, backend, device, args, "closed") as started:
        starts["closed"] = started.start_s
        fleet = Fleet(started.server.base_url, args.frames)
        asyncio.run(fleet.closed_loop("http", 2, 1))  # warm-up: graphs, allocator
        for protocol in args.protocols:
            for streams in args.levels:
                r = asyncio.run(fleet.closed_loop(protocol, streams, args.requests_per_stream))
                r["gpu_memory_mib"] = gpu_memory_mib()
                rows.append(r)
                step = r["engine_step"] or {}
                print(f"[load] {backend} {protocol} closed x{streams}: p95 TTFA {fmt(r['ttfa_ms']['p95'])} ms, "
                      f"{fmt(r['audio_s_per_s'])} audio-s/s, underruns@200ms {r['underruns_200ms']['count']}, "
                      f"ok {r['ok']}/{r['requests']}; engine step {fmt(step.get('step_ms'), '.2f')} ms, host "
                      f"{fmt(step.get('host_ms'), '.3f')} ms", file=sys.stderr, flush=True)
            if not fresh_open:
                rows += open_rates(fleet, backend, protocol, args, "after closed loop")
    return {"model": model, "backend": backend, "results": rows,
            "open_loop_server": "fresh" if fresh_open else "after closed loop", "server_start_s": starts}


def fmt(v, spec=".1f") -> str:
    return "-" if v is None else format(v, spec)


def markdown(report: dict) -> str:
    lines = [f"# Load benchmark ({report['device']}, {report['date']}, commit {report['commit']})", "",
             f"Every request asks for {report['frames']} frames ({report['frames'] * 0.08:.1f} s of audio) of random "
             "weights of the real shapes, which never stop on EOS. Time to first audio (TTFA) = request sent to "
             "first audio byte at the client; RTF = request sent to last byte / audio duration; underruns = times "
             "a real-time listener ran dry after its first byte (0 and 200 ms jitter buffers).", ""]
    for run in report["runs"]:
        order = ("Open-loop rates ran first, each protocol's against a freshly started server (nothing but its own "
                 "start-up warmed it); the closed-loop levels ran on another server after a warm-up request."
                 if run.get("open_loop_server") == "fresh" else
                 "Open-loop rates ran on the same server after the closed-loop levels (which had warmed it).")
        starts = ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in run.get("server_start_s", {}).items())
        lines += [f"## {run['backend']}, {run['model']}", "", order + (f" Server start-up: {starts}." if starts
                                                                       else ""), "",
                  "| shape | protocol | load | ok | TTFA p50 / p95 / p99 ms | RTF p50 / p95 | underruns 0 ms "
                  "(count / s) | underruns 200 ms (count / s) | audio s per s | GPU MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in run["results"]:
            load = (f"{r['streams']} streams" if r["shape"] == "closed" else
                    f"{r['rate']}/s" + (f" ({r['server']} server)" if r.get("server") else ""))
            t, u0, u2 = r["ttfa_ms"], r["underruns_0ms"], r["underruns_200ms"]
            lines.append(f"| {r['shape']} | {r['protocol']} | {load} | {r['ok']}/{r['requests']} | "
                         f"{fmt(t['p50'])} / {fmt(t['p95'])} / {fmt(t['p99'])} | {fmt(r['rtf']['p50'], '.3f')} / "
                         f"{fmt(r['rtf']['p95'], '.3f')} | {u0['count']} / {u0['seconds']:.2f} | "
                         f"{u2['count']} / {u2['seconds']:.2f} | {fmt(r['audio_s_per_s'])} | "
                         f"{r.get('gpu_memory_mib') or '-'} |")
        lines.append("")
        split = [r for r in run["results"] if r.get("engine_step")]
        if split:
            lines += ["Engine step at each closed-loop level's full batch (means; host = the step's wall time "
                      "minus its GPU waits and prefill, what no GPU speed hides):", "",
                      "| protocol | load | streams stepped | steps | step ms | GPU wait ms | prefill ms | host ms |",
                      "|---|---|---|---|---|---|---|---|"]
            for r in split:
                e = r["engine_step"]
                bucket = max(r["engine_steps_by_bucket"], key=int)
                lines.append(f"| {r['protocol']} | {r['streams']} streams | <= {bucket} | {e['steps']} | "
                             f"{e['step_ms']:.2f} | {e['gpu_wait_ms']:.2f} | {e['prefill_ms']:.2f} | "
                             f"{e['host_ms']:.3f} |")
            lines.append("")
        staged = [r for r in run["results"] if r.get("first_chunk_ms_p50")]
        if staged:
            names = list(staged[0]["first_chunk_ms_p50"])
            lines += ["First chunk, stage by stage (WebSocket; p50 ms; the server's stages from its audio_done, "
                      "to_client = the client's time to first audio minus them):", "",
                      "| shape | load | " + " | ".join(n.replace("_", " ") for n in names) + " |",
                      "|---|---|" + "---|" * len(names)]
            for r in staged:
                load = f"{r['streams']} streams" if r["shape"] == "closed" else f"{r['rate']}/s"
                lines.append(f"| {r['shape']} | {load} | "
                             + " | ".join(fmt(r["first_chunk_ms_p50"].get(n), ".2f") for n in names) + " |")
            lines.append("")
    lines.append("Written by `qwen-tts-mk bench --load` (src/qwen_tts_megakernel/tools/load_bench.py).")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (closed, opened) = plt.subplots(1, 2, figsize=(11, 4))
    for run in report["runs"]:
        for protocol in ("http", "ws"):
            c = [r for r in run["results"] if r["shape"] == "closed" and r["protocol"] == protocol]
            o = [r for r in run["results"] if r["shape"] == "open" and r["protocol"] == protocol]
            label = f"{run['backend']} {run['model']} {protocol}"
            if c:
                closed.plot([r["streams"] for r in c], [r["ttfa_ms"]["p95"] for r in c], marker="o", label=label)
            if o:
                opened.plot([r["rate"] for r in o], [r["ttfa_ms"]["p95"] for r in o], marker="o", label=label)
    closed.set(xscale="log", xlabel="concurrent streams (closed loop)", ylabel="p95 time to first audio (ms)")
    opened.set(xlabel="requests per second (open loop, Poisson)", ylabel="p95 time to first audio (ms)")
    for ax in (closed, opened):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{report['device']}: time to first audio under load")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def result_stem(device: str, models: list[str], backends: list[str]) -> str:
    """The result files' name: `<gpu>-load-<backends>`, plus the model sizes other than the default 0.6B
    (`nvidia-h200-load-megakernel-1.7b`), so that a 1.7B run does not overwrite the 0.6B one."""
    sizes = [m.removeprefix("random:") if m.startswith("random:") else Path(m).name for m in models]
    extra = [s for s in sizes if s != "0.6b"]
    return "-".join([gpu_slug(device), "load", *backends, *extra])


def run_bench_load(args) -> int:
    import torch

    args.levels = tuple(getattr(args, "levels", None) or CLOSED_LEVELS)
    args.rates = tuple(getattr(args, "rates", None) or OPEN_RATES)
    args.protocols = tuple(getattr(args, "protocols", None) or ("http", "ws"))
    args.frames = getattr(args, "frames", None) or 100
    args.requests_per_stream = getattr(args, "requests_per_stream", None) or 2
    args.open_seconds = getattr(args, "open_seconds", None) or 5.0
    args.ttfa_bound_ms = getattr(args, "ttfa_bound_ms", None) or 200.0
    args.max_active = getattr(args, "max_active", None) or min(64, max(args.levels))  # the kernel steps <= 64
    args.max_queue = getattr(args, "max_queue", None) or 4 * max(args.levels)
    models = getattr(args, "models", None) or [getattr(args, "model", None) or "random:0.6b"]
    backends = getattr(args, "backends", None) or [getattr(args, "backend", None) or "megakernel"]
    device = getattr(args, "device", None)
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    now = _dt.datetime.now(_dt.timezone.utc)
    report = {"benchmark": "load", "date": now.isoformat(timespec="seconds"), "commit": git_commit(),
              "device": name, "frames": args.frames, "text": TEXT, "runs": []}
    out_dir = Path(getattr(args, "output_dir", None) or "benchmarks/results")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / result_stem(name, models, backends)
    for model in models:
        for backend in backends:
            report["runs"].append(run_backend(model, backend, device, args))
            stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")  # partial results survive
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    plotted = plot(report, Path(f"{stem}.png"))
    print(markdown(report))
    print(f"wrote {stem}.json, .md{' and .png' if plotted else ''}", file=sys.stderr)
    return 0
