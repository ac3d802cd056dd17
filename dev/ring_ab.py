"""A/B of the weight-ring floor (FLAG_STREAM_ONLY: every weight tile through the shared-memory ring, no math, no
barrier) between the one-stream kernel of commit 4c58a06 and this tree's batched kernel, in one process pair on one GPU.

    git archive 4c58a06 src | tar -x -C .wt-old     # the old tree (ignored folder)
    PYTHONPATH=src python dev/ring_ab.py --old .wt-old/src --rounds 3

Each round runs the old tree's floor then the new one's in fresh subprocesses (one library per process), 200 launches
each, and prints per tree: blocks, weight bytes streamed per frame, tiles per block (new tree), ms and GB/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

OLD = r"""
import json, torch
from qwen_tts_megakernel.megakernel.backend import MegakernelBackend
from qwen_tts_megakernel.megakernel.validate import random_config, random_weights, random_prompt
from qwen_tts_megakernel.sampling import RandomStream, SamplingParams
config = random_config("0.6b")
be = MegakernelBackend(config, random_weights(config, seed=0), device="cuda", max_seq_len=1024)
prefill, text, pad = random_prompt(config, n_prefill=12, n_text=200)
st = be.open_stream(prefill, text, pad, SamplingParams(), RandomStream(7), lookahead=0)
st.struct.min_new_tokens = 1 << 40
s = be.stream
res = {}
for name, flags in (("frame", 4), ("talker_step", 5)):
    evs = []
    for k in range(220):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(s); be.launch(st.struct, k, st.L - 1 + k, 0.0, flags); b.record(s)
        if k >= 20: evs.append((a, b))
    s.synchronize()
    ms = sorted(a.elapsed_time(b) for a, b in evs)
    res[name] = ms[len(ms) // 2]
st.launched = 220 * 2; st.close()
wb = be.weight_bytes()
print("RESULT", json.dumps({"blocks": be.num_blocks, "frame_bytes": wb["frame"], "talker_bytes": wb["talker"],
                            "frame_ms": res["frame"], "talker_ms": res["talker_step"]}))
"""

NEW = r"""
import json, torch
from qwen_tts_megakernel.backends.base import StreamSpec
from qwen_tts_megakernel.megakernel.backend import MegakernelBackend, FLAG_STREAM_ONLY, FLAG_TALKER_ONLY
from qwen_tts_megakernel.sampling import RandomStream, SamplingParams
from qwen_tts_megakernel.tools.mk_bench import _time_launches
from qwen_tts_megakernel.tools.validate import random_config, random_weights, random_prompt
config = random_config("0.6b")
be = MegakernelBackend(config, random_weights(config, seed=0), device="cuda", max_streams=1, max_seq_len=1024,
                       prefill_graphs=False)
prefill, text, pad = random_prompt(config, n_prefill=12, n_text=200)
h = be.open([StreamSpec(prefill=prefill, text_rows=text, pad_row=pad, params=SamplingParams(), rng=RandomStream(7),
                        max_frames=100)])
L = be._entries(h)
res = {}
for name, flags in (("frame", FLAG_STREAM_ONLY), ("talker", FLAG_STREAM_ONLY | FLAG_TALKER_ONLY)):
    L.flags = flags
    res[name] = _time_launches(be, L, 200, 20)[0]
wb = be.weight_bytes()
print("RESULT", json.dumps({"blocks": be.num_blocks, "frame_bytes": wb["frame"], "talker_bytes": wb["talker"],
                            "frame_ms": res["frame"], "talker_ms": res["talker"]}))
"""


def run(code: str, src: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(Path(src).resolve()))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(out.stderr[-3000:])


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--old", default=".wt-old/src")
    p.add_argument("--new", default="src")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None, help="JSON file for the results")
    args = p.parse_args()
    rows = {"old (4c58a06)": [], "new": []}
    for r in range(args.rounds):
        rows["old (4c58a06)"].append(run(OLD, args.old))
        rows["new"].append(run(NEW, args.new))
        print(f"round {r}: old {rows['old (4c58a06)'][-1]}  new {rows['new'][-1]}", flush=True)
    summary = {}
    for name, rs in rows.items():
        f = statistics.median(x["frame_ms"] for x in rs)
        t = statistics.median(x["talker_ms"] for x in rs)
        summary[name] = {"blocks": rs[0]["blocks"], "frame_bytes": rs[0]["frame_bytes"], "frame_ms": f,
                         "frame_GBps": rs[0]["frame_bytes"] / f / 1e6, "talker_ms": t,
                         "talker_GBps": rs[0]["talker_bytes"] / t / 1e6}
        print(name, json.dumps(summary[name]))
    if args.out:
        Path(args.out).write_text(json.dumps({"rounds": rows, "summary": summary}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
