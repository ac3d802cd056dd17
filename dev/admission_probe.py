"""Watch real-time admission under open-loop load: the engine's step-time table and stream counts over time.

    PYTHONPATH=src python dev/admission_probe.py --model random:0.6b --rates 1 10 20 --frames 50 --out probe.json

Starts a fresh server in this process (megakernel by default) so that it can read the engine's state, then for
each rate drives it from a client subprocess (`bench --load`'s open-loop client: Poisson arrivals for --seconds)
while sampling, every --every seconds, the active and waiting stream counts and the step-time table. Works on the
code before issue 24 too (PYTHONPATH=<old checkout>/src), whose table was `step_times.by_bucket` (bucket -> s).
Prints one line per sample and per rate; writes everything to --out.
"""

import argparse
import json
import subprocess
import sys
import threading
import time

CLIENT = """
import asyncio, json, sys
from qwen_tts_megakernel.tools.load_bench import Fleet
r = asyncio.run(Fleet(sys.argv[1], int(sys.argv[2])).open_loop("http", float(sys.argv[3]), float(sys.argv[4])))
print(json.dumps({k: r[k] for k in ("rate", "requests", "ok", "errors", "ttfa_ms", "audio_s_per_s")}))
"""


def step_table(engine) -> dict:
    model = engine.step_times
    if hasattr(model, "table"):
        return {str(k): v["predicted_ms"] for k, v in model.table().items()}
    return {str(k): round(1000 * v, 2) for k, v in sorted(model.by_bucket.items())}  # before issue 24


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="random:0.6b")
    p.add_argument("--backend", default="megakernel")
    p.add_argument("--rates", nargs="+", type=float, default=[1, 10, 20])
    p.add_argument("--frames", type=int, default=50)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--every", type=float, default=0.25)
    p.add_argument("--max-active", type=int, default=64)
    p.add_argument("--out", default="admission_probe.json")
    args = p.parse_args()

    from qwen_tts_megakernel.engine import Synthesizer
    from qwen_tts_megakernel.server.protocol import ServerSettings
    from qwen_tts_megakernel.testing.server import running_server

    started = time.perf_counter()
    synth = Synthesizer.from_pretrained(args.model, backend=args.backend, max_streams=args.max_active)
    settings = ServerSettings(max_active=args.max_active, max_queue=4 * args.max_active)
    report = {"model": args.model, "backend": args.backend, "frames": args.frames, "rates": []}
    with running_server(synth, settings=settings) as (url, _app):
        engine = synth.engine
        report["start_s"] = time.perf_counter() - started
        print(f"server up in {report['start_s']:.1f} s (load + warm-up); table {step_table(engine)}", flush=True)
        for rate in args.rates:
            samples, stop = [], threading.Event()

            def sample(t0=time.perf_counter()):
                while not stop.is_set():
                    s = {"t": round(time.perf_counter() - t0, 2), "active": engine.active_count,
                         "waiting": engine.waiting_count, "table_ms": step_table(engine)}
                    samples.append(s)
                    print(f"  {rate:g}/s t={s['t']:5.2f} active {s['active']:3d} waiting {s['waiting']:3d} "
                          f"{s['table_ms']}", flush=True)
                    stop.wait(args.every)

            watcher = threading.Thread(target=sample, daemon=True)
            watcher.start()
            out = subprocess.run([sys.executable, "-c", CLIENT, url, str(args.frames), str(rate), str(args.seconds)],
                                 capture_output=True, text=True, timeout=900)
            stop.set()
            watcher.join()
            client = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {
                "error": out.stderr[-2000:]}
            report["rates"].append({"rate": rate, "client": client, "samples": samples,
                                    "max_active": max((s["active"] for s in samples), default=0)})
            print(f"rate {rate:g}/s: {json.dumps(client)}; most active at once {report['rates'][-1]['max_active']}",
                  flush=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
