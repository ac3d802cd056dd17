"""Side-by-side check of one kernel variant (selected by $QWEN_TTS_MK_DEFINES, see build.py): validate on random
0.6B weights, then the megakernel timings of bench --decode next to the torch.mv floor, as one JSON line.

    QWEN_TTS_MK_DEFINES="MK_RING=6" python -m qwen_tts_megakernel.tools.mk_variants --name ring6 --out r.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--name", required=True)
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--out", required=True)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    from ..megakernel.backend import MegakernelBackend
    from .mk_bench import bench_megakernel, matvec_bandwidth
    from .validate import random_config, random_weights, run_validation

    dev = torch.device("cuda")
    config = random_config("0.6b")
    weights = random_weights(config, seed=0)
    res = {"name": args.name, "defines": os.environ.get("QWEN_TTS_MK_DEFINES", "")}
    try:
        rep = run_validation(config, weights, frames=args.frames)
        res["validate_pass"] = bool(rep["pass"])
        res["validate"] = {k: v for k, v in rep.items() if isinstance(v, (int, float, bool, str))}
    except Exception as e:  # a failing variant must not stop the others
        res["validate_pass"] = False
        res["validate_error"] = repr(e)
    torch.cuda.empty_cache()
    try:
        bw = matvec_bandwidth(dev)
        be = MegakernelBackend(config, weights, device=dev, max_seq_len=1024)
        wb = be.weight_bytes()
        mk = bench_megakernel(be, config)
        mk2 = bench_megakernel(be, config)  # second pass: run-to-run spread
        res.update(matvec_GBps=bw, weight_bytes=wb, mk=mk, mk_repeat=mk2,
                   talker_GBps=wb["talker"] / (mk["talker_step_ms"] * 1e-3) / 1e9,
                   frame_GBps=wb["frame"] / (mk["frame_ms"] * 1e-3) / 1e9,
                   floor_talker_ms=wb["talker"] / bw / 1e6, floor_frame_ms=wb["frame"] / bw / 1e6)
        del be
    except Exception as e:
        res["bench_error"] = repr(e)
    with open(args.out, "a") as f:
        f.write(json.dumps(res) + "\n")
    mk = res.get("mk", {})
    print(f"VARIANT {args.name:10s} valid={res['validate_pass']} talker={mk.get('talker_step_ms', -1):.3f} "
          f"frame={mk.get('frame_ms', -1):.3f} talker_nosync={mk.get('talker_step_nosync_ms', -1):.3f} "
          f"frame_nosync={mk.get('frame_nosync_ms', -1):.3f} rep_talker={res.get('mk_repeat', {}).get('talker_step_ms', -1):.3f} "
          f"rep_frame={res.get('mk_repeat', {}).get('frame_ms', -1):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
