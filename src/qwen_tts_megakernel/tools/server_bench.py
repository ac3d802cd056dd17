"""`qwen-tts-mk bench --server`: time to first chunk and real-time factor as a client sees them over loopback.

Starts `qwen-tts-mk serve` in a subprocess (so the clients never share the server's interpreter), then for each
protocol (HTTP /tts/stream, WS /v1/audio/speech/stream) and each concurrency level (1, 4, 16 clients) runs
`requests_per_client` requests per client, back to back. Per request:

    TTFC = request sent -> first audio bytes received
    RTF  = request sent -> last audio bytes received, divided by the audio duration

Reports median and p95 of both, aggregate audio throughput (audio seconds per wall second) and stop reasons, as
JSON and Markdown in benchmarks/results/.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from ..checkpoint import DEFAULT_MODEL
from ..testing.server import TTSServerProcess

DEFAULT_TEXT = ("Thanks for calling. I can help you change your booking, check the status of an order, or connect "
                "you with someone from our team. What would you like to do today?")
BYTES_PER_SECOND = 24000 * 2


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


async def _http_request(client, url: str, body: dict) -> dict:
    start = time.perf_counter()
    first = None
    n = 0
    async with client.stream("POST", f"{url}/tts/stream", json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
        async for piece in r.aiter_raw():
            if piece and first is None:
                first = time.perf_counter() - start
            n += len(piece)
    total = time.perf_counter() - start
    return {"ttfc_s": first, "total_s": total, "audio_s": n / BYTES_PER_SECOND, "stop_reason": None}


async def _ws_request(conn, cid: str, body: dict) -> dict:
    start = time.perf_counter()
    config = {"type": "config", "context_id": cid, "voice": body.get("speaker"), "language": body.get("language"),
              "seed": body.get("seed"), "max_new_tokens": body.get("max_new_tokens")}
    await conn.send(json.dumps(config))
    await conn.send(json.dumps({"type": "text", "context_id": cid, "text": body["text"]}))
    await conn.send(json.dumps({"type": "flush", "context_id": cid}))
    first = None
    n = 0
    while True:
        msg = await conn.recv()
        if isinstance(msg, bytes):
            k = msg[0]
            if msg[1:1 + k].decode() == cid:
                if first is None:
                    first = time.perf_counter() - start
                n += len(msg) - 1 - k
            continue
        event = json.loads(msg)
        if event.get("context_id") != cid:
            continue
        if event["type"] == "error":
            return {"error": event["message"]}
        if event["type"] == "audio_done":
            total = time.perf_counter() - start
            return {"ttfc_s": first, "total_s": total, "audio_s": n / BYTES_PER_SECOND,
                    "stop_reason": event["stop_reason"]}


async def _run_level(url: str, protocol: str, clients: int, requests_per_client: int, body: dict) -> dict:
    import httpx
    import websockets

    results: list[dict] = []

    async def http_client(i: int):
        async with httpx.AsyncClient(timeout=600) as client:
            for j in range(requests_per_client):
                results.append(await _http_request(client, url, {**body, "seed": 1000 * i + j}))

    async def ws_client(i: int):
        ws_url = url.replace("http://", "ws://") + "/v1/audio/speech/stream"
        async with websockets.connect(ws_url, max_size=None) as conn:
            for j in range(requests_per_client):
                results.append(await _ws_request(conn, f"c{i}-{j}", {**body, "seed": 1000 * i + j}))

    start = time.perf_counter()
    await asyncio.gather(*[(http_client if protocol == "http" else ws_client)(i) for i in range(clients)])
    return level_summary(protocol, clients, results, time.perf_counter() - start)


def level_summary(protocol: str, clients: int, results: list[dict], wall: float) -> dict:
    """One concurrency level's figures from its requests' results (ttfc_s, total_s, audio_s, stop_reason, error)."""
    ok = [r for r in results if "error" not in r and r["audio_s"] > 0]
    ttfc = [1000 * r["ttfc_s"] for r in ok]
    rtf = [r["total_s"] / r["audio_s"] for r in ok]
    reasons: dict[str, int] = {}
    for r in ok:
        if r["stop_reason"]:
            reasons[r["stop_reason"]] = reasons.get(r["stop_reason"], 0) + 1
    return {"protocol": protocol, "clients": clients, "requests": len(results), "ok": len(ok),
            "errors": [r["error"] for r in results if "error" in r][:5],
            "ttfc_ms_median": _pct(ttfc, 50), "ttfc_ms_p95": _pct(ttfc, 95),
            "rtf_median": _pct(rtf, 50), "rtf_p95": _pct(rtf, 95),
            "audio_s_total": sum(r["audio_s"] for r in ok), "wall_s": wall,
            "throughput_x_realtime": sum(r["audio_s"] for r in ok) / wall if wall > 0 else None,
            "stop_reasons": reasons}


def _markdown(report: dict) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = [f"# Server benchmark ({report['backend']} backend, {report['device']})", "",
             f"model `{report['model']}`, {report['max_new_tokens']} frames max per request, "
             f"{report['requests_per_client']} requests per client, measured by a client over loopback "
             f"({report['date']}).", "",
             "TTFC = request sent to first audio bytes; RTF = request sent to last audio bytes / audio duration.", "",
             "| protocol | clients | requests ok | TTFC median ms | TTFC p95 ms | RTF median | RTF p95 | "
             "throughput (x real time) | stop reasons |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(r["stop_reasons"].items())) or "-"
        lines.append(f"| {r['protocol']} | {r['clients']} | {r['ok']}/{r['requests']} | "
                     f"{f(r['ttfc_ms_median'], '.1f')} | {f(r['ttfc_ms_p95'], '.1f')} | "
                     f"{f(r['rtf_median'], '.3f')} | {f(r['rtf_p95'], '.3f')} | "
                     f"{f(r['throughput_x_realtime'], '.2f')} | {reasons} |")
    lines.append("")
    return "\n".join(lines)


def run_bench_server(args) -> int:
    import torch

    if getattr(args, "model", None) is None:
        args.model = DEFAULT_MODEL
    if getattr(args, "backend", None) is None:
        has_mk = importlib.util.find_spec("qwen_tts_megakernel.megakernel.backend") is not None
        args.backend = "megakernel" if torch.cuda.is_available() and has_mk else "reference"
    levels = tuple(getattr(args, "concurrency", None) or (1, 4, 16))
    per_client = getattr(args, "requests_per_client", None) or 3
    max_new_tokens = getattr(args, "max_new_tokens", None) or 100
    protocols = tuple(getattr(args, "protocols", None) or ("http", "ws"))
    text = getattr(args, "text", None) or DEFAULT_TEXT
    body = {"text": text, "language": "english", "max_new_tokens": max_new_tokens}

    env = dict(os.environ)
    env.setdefault("QWEN_TTS_MK_MAX_ACTIVE", "16")
    env.setdefault("QWEN_TTS_MK_MAX_QUEUE", "64")
    server = TTSServerProcess(args.model, backend=args.backend, device=args.device, env=env,
                              startup_timeout_s=float(getattr(args, "start_timeout", None) or 600))
    print(f"starting the server ({args.model}, {args.backend} backend) on {server.base_url} ...", file=sys.stderr,
          flush=True)
    with server:
        url = server.base_url
        asyncio.run(_run_level(url, "http", 1, 1, body))  # warm-up
        results = []
        for protocol in protocols:
            for clients in levels:
                r = asyncio.run(_run_level(url, protocol, clients, per_client, body))
                results.append(r)
                print(f"{protocol:4s} x{clients:<3d} TTFC median {r['ttfc_ms_median'] or 0:8.1f} ms  p95 "
                      f"{r['ttfc_ms_p95'] or 0:8.1f} ms  RTF median {r['rtf_median'] or 0:.3f}  p95 "
                      f"{r['rtf_p95'] or 0:.3f}  ok {r['ok']}/{r['requests']}", file=sys.stderr, flush=True)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and torch.cuda.is_available():
        device = f"{device} ({torch.cuda.get_device_name(0)})"
    now = _dt.datetime.now(_dt.timezone.utc)
    report = {"benchmark": "server", "date": now.isoformat(timespec="seconds"), "model": args.model,
              "model_type": server.health.get("model_type"), "backend": args.backend, "device": device,
              "host": platform.node(), "max_new_tokens": max_new_tokens, "requests_per_client": per_client,
              "text": text, "results": results}
    out_dir = Path(args.output_dir or "benchmarks/results")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"server_{args.backend}_{now.strftime('%Y%m%dT%H%M%SZ')}"
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / f"{stem}.md").write_text(_markdown(report))
    print(_markdown(report))
    print(f"wrote {out_dir / stem}.json and .md", file=sys.stderr)
    failed = sum(r["requests"] - r["ok"] for r in results)
    return 1 if failed else 0
