"""Section trace of the batched megakernel: where one frame's time goes, per section, talker and code predictor apart.

    PYTHONPATH=src python dev/mk_trace.py --size 0.6b --batch 1,64 --out-dir benchmarks/results

Builds the kernel with dev/mk_trace.cuh force-included (QWEN_TTS_MK_INCLUDE): each MK_SECTION(id) of megakernel.cu
becomes a block sync plus a clock stamp by thread 0 of every block. For each batch size (streams at positions 50..800,
random weights), a few traced launches; per block the cycles between consecutive stamps go to the section of the later
stamp, summed over the frame (28 talker layers, 15 x 5 predictor layers). The table gives per section the mean and the
max over blocks in microseconds (cycles / the SM clock measured from %globaltimer on the same launch): "bar" rows are
grid-barrier waits (the slowest block's lead), the others work. The stamps add one block sync per section, so the
traced frame is slightly slower than the production one (both printed).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

# Section ids of mk_common.cuh (enum Section).
PER_LAYER = {1: "qkv", 2: "qkv bar", 3: "attention", 4: "attention bar", 5: "o_proj", 6: "o_proj bar",
             7: "gate/up (+ norm)", 8: "gate/up bar", 9: "down", 10: "down bar", 11: "layer norm"}
SEC_CP = 16
FRAME = {40: "start", 41: "input rows", 42: "codec head", 43: "codec head bar", 44: "sample g0", 45: "sample g0 bar",
         46: "cp input", 47: "cp input bar", 48: "cp lm_head", 49: "cp lm_head bar", 50: "cp sample",
         51: "cp sample bar", 52: "end"}


def section_name(sec: int) -> tuple[str, str]:
    """(part, name): part is 'talker' or 'code predictor'."""
    if sec in FRAME:
        part = "code predictor" if FRAME[sec].startswith("cp") else "talker"
        return part, FRAME[sec]
    if sec > SEC_CP:
        return "code predictor", PER_LAYER[sec - SEC_CP]
    return "talker", PER_LAYER[sec]


def block_sections(marks: np.ndarray, count: int) -> tuple[dict[int, int], int, int]:
    """Cycles per section id of one block's marks, the frame's cycles and its ns (globaltimer) span."""
    out: dict[int, int] = {}
    sec, ns, cyc = marks["section"][:count], marks["ns_lo"][:count].astype(np.int64), marks["cycles"][:count]
    for k in range(1, count):
        out[int(sec[k])] = out.get(int(sec[k]), 0) + int(cyc[k] - cyc[k - 1])
    span_ns = int((ns[count - 1] - ns[0]) % (1 << 32))
    return out, int(cyc[count - 1] - cyc[0]), span_ns


def trace_launch(be, launch, lib, dims) -> dict:
    """One traced launch: per section id, the per-block microseconds [blocks]."""
    nb_trace, n_marks = dims
    dt = np.dtype([("section", "<u4"), ("ns_lo", "<u4"), ("cycles", "<i8")])
    marks = np.zeros((nb_trace, n_marks), dtype=dt)
    counts = np.zeros(nb_trace, dtype=np.int32)
    be.stream.synchronize()
    assert lib.mk_trace_reset() == 0
    be.launch(launch)
    be.stream.synchronize()
    assert lib.mk_trace_fetch(marks.ctypes.data_as(ctypes.c_void_p), counts.ctypes.data_as(ctypes.c_void_p)) == 0
    blocks = min(be.num_blocks, nb_trace)
    per_sec: dict[int, list[float]] = {}
    clocks = []
    for b in range(blocks):
        secs, cycles, ns = block_sections(marks[b], int(counts[b]))
        ghz = cycles / ns if ns > 0 else float("nan")
        clocks.append(ghz)
        for s, c in secs.items():
            per_sec.setdefault(s, [0.0] * blocks)[b] = c / ghz / 1e3
    return {"per_sec": per_sec, "ghz": statistics.median(clocks), "marks": int(counts[:blocks].max())}


def summarize(traces: list[dict]) -> list[dict]:
    """Rows (part, section, mean_us, max_us, share) with the median over the traced launches."""
    ids = sorted({s for t in traces for s in t["per_sec"]})
    rows = []
    for s in ids:
        means = [float(np.mean(t["per_sec"][s])) for t in traces if s in t["per_sec"]]
        maxes = [float(np.max(t["per_sec"][s])) for t in traces if s in t["per_sec"]]
        part, name = section_name(s)
        rows.append({"id": s, "part": part, "section": name, "mean_us": statistics.median(means),
                     "max_us": statistics.median(maxes)})
    total = sum(r["mean_us"] for r in rows)
    for r in rows:
        r["share"] = r["mean_us"] / total if total else 0.0
    return rows


def group_totals(rows: list[dict]) -> dict[str, float]:
    """Mean microseconds per (part, kind): products, attention, norms, heads, sampling, barriers."""
    def kind(name: str) -> str:
        if name.endswith("bar"):
            return "grid barriers"
        if name.startswith("attention"):
            return "attention"
        if name in ("qkv", "o_proj", "gate/up (+ norm)", "down", "cp input"):
            return "products"
        if "head" in name:
            return "heads"
        if "sample" in name:
            return "sampling"
        return "norms / inputs"
    out: dict[str, float] = {}
    for r in rows:
        key = f"{r['part']}: {kind(r['section'])}"
        out[key] = out.get(key, 0.0) + r["mean_us"]
    return dict(sorted(out.items()))


def format_md(res: dict) -> str:
    lines = [f"# Megakernel section trace ({res['gpu']}, random {res['size']}, {res['blocks']} blocks)", "",
             "Written by `python dev/mk_trace.py`. Per section: mean and max over blocks of the time each block spent",
             "(µs per frame, summed over layers; median of the traced launches). `bar` = waiting in a grid barrier.",
             "The traced build adds one block sync per stamp, so its frame is slower than production's.", ""]
    for B, r in res["batches"].items():
        lines += [f"## B = {B}: traced frame {r['traced_frame_ms']:.3f} ms (production {r['frame_ms']:.3f} ms), "
                  f"SM clock {r['ghz']:.2f} GHz", "", "| part: kind | µs / frame | share |", "|---|---|---|"]
        tot = sum(r["groups"].values())
        lines += [f"| {k} | {v:.0f} | {v / tot:.0%} |" for k, v in r["groups"].items()]
        lines += ["", "| part | section | mean µs | max µs | share |", "|---|---|---|---|---|"]
        lines += [f"| {x['part']} | {x['section']} | {x['mean_us']:.1f} | {x['max_us']:.1f} | {x['share']:.1%} |"
                  for x in r["rows"]]
        lines.append("")
    return "\n".join(lines) + "\n"


def production_frame_ms(size: str, batches: list[int]) -> dict[int, float]:
    """Median ms per frame of the production build at each batch size (a subprocess: one library per process)."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "QWEN_TTS_MK_INCLUDE"}
    code = ("import json,sys; from dev.mk_trace import _frame_ms; "
            f"print('RESULT', json.dumps(_frame_ms({size!r}, {batches!r})))")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=HERE.parent, capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return {int(k): v for k, v in json.loads(line[7:]).items()}
    raise RuntimeError(f"production timing failed: {out.stderr[-2000:]}")


def _backend(size: str, batches: list[int]):
    from qwen_tts_megakernel.backends.base import StreamSpec
    from qwen_tts_megakernel.megakernel.backend import MegakernelBackend
    from qwen_tts_megakernel.sampling import RandomStream, SamplingParams
    from qwen_tts_megakernel.tools.mk_bench import bench_prompts
    from qwen_tts_megakernel.tools.validate import random_config, random_weights

    config = random_config(size)
    be = MegakernelBackend(config, random_weights(config, seed=0), device="cuda", max_streams=max(batches),
                           max_seq_len=1024, prefill_graphs=False)
    prompts = bench_prompts(config, max(batches))

    def open_batch(B):
        idx = sorted({i * len(prompts) // B for i in range(B)})
        return be.open([StreamSpec(prefill=pr, text_rows=t, pad_row=pad, params=SamplingParams(), rng=RandomStream(i),
                                   max_frames=100) for i, (pr, t, pad) in enumerate(prompts[j] for j in idx)])
    return be, open_batch


def _frame_ms(size: str, batches: list[int]) -> dict[int, float]:
    from qwen_tts_megakernel.tools.mk_bench import _time_launches

    be, open_batch = _backend(size, batches)
    out = {}
    for B in batches:
        hs = open_batch(B)
        out[B] = _time_launches(be, be._entries(hs), 20, 5)[0]
        for h in hs:
            be.close(h)
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="0.6b", choices=["0.6b", "1.7b"])
    p.add_argument("--batch", default="1,64")
    p.add_argument("--launches", type=int, default=5, help="traced launches per batch size (median)")
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--tag", default="", help="suffix of the result files (e.g. 'before')")
    args = p.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    sys.path.insert(0, str(HERE.parent))
    prod = production_frame_ms(args.size, batches)
    os.environ["QWEN_TTS_MK_INCLUDE"] = str(HERE / "mk_trace.cuh")
    import torch

    from qwen_tts_megakernel.megakernel.build import load_library
    from qwen_tts_megakernel.tools.common import gpu_slug
    from qwen_tts_megakernel.tools.mk_bench import _time_launches

    be, open_batch = _backend(args.size, batches)
    lib = load_library()
    for fn in ("mk_trace_reset", "mk_trace_fetch", "mk_trace_dims"):
        getattr(lib, fn).restype = ctypes.c_int
    nbt, nm = ctypes.c_int(), ctypes.c_int()
    lib.mk_trace_dims(ctypes.byref(nbt), ctypes.byref(nm))
    res = {"gpu": torch.cuda.get_device_name(), "size": args.size, "blocks": be.num_blocks, "batches": {}}
    for B in batches:
        hs = open_batch(B)
        launch = be._entries(hs)
        traced_ms = _time_launches(be, launch, 10, 3)[0]
        traces = [trace_launch(be, launch, lib, (nbt.value, nm.value)) for _ in range(args.launches)]
        for h in hs:
            be.close(h)
        rows = summarize(traces)
        res["batches"][str(B)] = {"frame_ms": prod[B], "traced_frame_ms": traced_ms,
                                  "ghz": statistics.median(t["ghz"] for t in traces),
                                  "marks_per_block": traces[0]["marks"], "groups": group_totals(rows), "rows": rows}
        print(f"B={B}: production {prod[B]:.3f} ms, traced {traced_ms:.3f} ms", flush=True)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{gpu_slug(res['gpu'])}-mk-trace-{args.size}" + (f"-{args.tag}" if args.tag else "")
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / f"{stem}.md").write_text(format_md(res))
    print(format_md(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
