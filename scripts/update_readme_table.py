#!/usr/bin/env python3
"""Regenerate the README's performance table from a `qwen-tts-mk bench --all` result file, and optionally from
later partial runs (`bench --all --only ...`), each shown as its own table after the full one.

    python scripts/update_readme_table.py benchmarks/results/nvidia-h200.json \
        [benchmarks/results/nvidia-h200-only-streaming-ttfc_breakdown.json ...]

Replaces the lines between <!-- bench:start --> and <!-- bench:end --> in README.md; never typed by hand.
"""

import json
import sys
from pathlib import Path

START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def fmt(value, digits=1):
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "n/a"


def table(r: dict, source: str) -> str:
    s = r["sections"]
    what = (f"A later partial run (`bench --all --only {' '.join(r['only'])}`)" if r.get("only")
            else "Measured")
    lines = [f"{what} on {r['device']} ({r['date'][:10]}, commit {r['commit']}), {r['model']}, "
             f"fixed frame counts (random weights never stop). Source: `{source}`, written by "
             "`qwen-tts-mk bench --all`.", ""]
    dec = s.get("decode")
    if dec:
        g = dec.get("reference_graphs") or {}
        batches = list(dec["megakernel"])
        ref = [g.get(b) if isinstance(g.get(b), dict) else {} for b in batches]
        lines += ["| per frame, streams | " + " | ".join(batches) + " |", "|---" * (len(batches) + 1) + "|",
                  "| megakernel frame (ms) | " + " | ".join(fmt(dec["megakernel"][b]["frame_ms"], 3) for b in batches)
                  + " |",
                  "| megakernel talker step (ms) | "
                  + " | ".join(fmt(dec["megakernel"][b]["talker_step_ms"], 3) for b in batches) + " |",
                  "| floor, weight ring (ms) | "
                  + " | ".join(fmt(dec["megakernel"][b]["floor_ring_ms"], 3) for b in batches) + " |",
                  "| reference + CUDA graphs frame (ms) | " + " | ".join(fmt(r.get("frame_ms"), 3) for r in ref) + " |",
                  "| megakernel audio s/s | " + " | ".join(fmt(dec["megakernel"][b]["audio_s_per_s"]) for b in batches)
                  + " |", ""]
    st = s.get("streaming")
    off = {v.get("text"): v for v in (s.get("official") or {}).get("results", [])}
    if st:
        backends = list(st)
        lines += ["| text (frames) | " + " | ".join(f"{b}: first chunk ms / RTF" for b in backends)
                  + " | official qwen-tts: complete audio ms / RTF |",
                  "|---" * (len(backends) + 2) + "|"]
        for label in st[backends[0]]:
            cells = [f"{fmt(st[b][label]['ttfc_ms']['median'])} / {fmt(st[b][label]['rtf']['median'], 4)}"
                     if label in st[b] else "not run" for b in backends]
            o = off.get(label)
            official = (f"{fmt(o['time_to_complete_audio_ms']['median'], 0)} / {fmt(o['rtf_median'], 3)}"
                        if o else "n/a")
            frames = st[backends[0]][label]["fixed_frames"]
            lines.append(f"| {label} ({frames}) | " + " | ".join(cells) + f" | {official} |")
        lines.append("")
    srv = s.get("server")
    if srv:
        lines += ["| server, loopback | " + " | ".join(f"{v['protocol']} x{v['clients']}" for v in srv["results"])
                  + " |", "|---" * (len(srv["results"]) + 1) + "|",
                  "| first chunk, median ms | " + " | ".join(fmt(v["ttfc_ms_median"]) for v in srv["results"])
                  + " |", ""]
    pc = s.get("pipecat")
    if pc:
        lines += ["| Pipecat TTFB (its own metrics), median ms | " + " | ".join(
            f"{v['service']}: {fmt(v['ttfb_ms_median'])}" for k, v in pc.items() if isinstance(v, dict)) + " |",
            "|---|---|---|", ""]
    if r.get("errors"):
        lines += ["Sections that failed in that run: " + "; ".join(f"{k} ({v})" for k, v in r["errors"].items()),
                  ""]
    return "\n".join(lines)


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    sources = [Path(a) for a in argv[1:]]
    readme = Path(__file__).resolve().parent.parent / "README.md"
    text = readme.read_text()
    if START not in text or END not in text:
        print(f"README.md has no {START} ... {END} block", file=sys.stderr)
        return 1
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    tables = [table(json.loads(src.read_text()), src.as_posix()) for src in sources]
    readme.write_text(head + START + "\n" + "\n".join(tables) + END + tail)
    print(f"README.md table updated from {', '.join(map(str, sources))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
