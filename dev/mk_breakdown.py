"""Where a batched megakernel frame spends its time: the same launches with one stage skipped at a time.

    QWEN_TTS_MK_DEFINES=MK_DEV_TIMING=1 PYTHONPATH=src python dev/mk_breakdown.py --batch 1,64 --out breakdown.json

Needs the MK_DEV_TIMING=1 build (launch flags that skip a stage; results are garbage, timings only). For each batch
size (streams at positions 50..800, random 0.6B or 1.7B weights) the median ms per launch of: the full frame, the
talker step alone, the frame without attention, without the matrix math (tiles still streamed), without grid
barriers (block-local syncs), and the weight ring alone.
"""

import argparse
import json
import os
import sys

import torch

FLAGS = {"frame": 0, "talker_step": 1, "no_attention": 16, "no_math": 32, "no_grid_sync": 64, "stream_only": 4}


def main() -> int:
    if "MK_DEV_TIMING=1" not in os.environ.get("QWEN_TTS_MK_DEFINES", ""):
        print("set QWEN_TTS_MK_DEFINES=MK_DEV_TIMING=1 (the timing build)", file=sys.stderr)
        return 2
    from qwen_tts_megakernel.backends.base import StreamSpec
    from qwen_tts_megakernel.megakernel.backend import MegakernelBackend
    from qwen_tts_megakernel.sampling import RandomStream, SamplingParams
    from qwen_tts_megakernel.tools.mk_bench import _time_launches, bench_prompts
    from qwen_tts_megakernel.tools.validate import random_config, random_weights

    p = argparse.ArgumentParser()
    p.add_argument("--size", default="0.6b", choices=["0.6b", "1.7b"])
    p.add_argument("--batch", default="1,64")
    p.add_argument("--frames", type=int, default=30)
    p.add_argument("--out", default="breakdown.json")
    args = p.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    config = random_config(args.size)
    be = MegakernelBackend(config, random_weights(config, seed=0), device="cuda", max_streams=max(batches),
                           max_seq_len=1024, prefill_graphs=False)
    prompts = bench_prompts(config, max(batches))
    res = {"gpu": torch.cuda.get_device_name(), "size": args.size}
    for B in batches:
        idx = sorted({i * len(prompts) // B for i in range(B)})
        hs = be.open([StreamSpec(prefill=pr, text_rows=t, pad_row=pad, params=SamplingParams(), rng=RandomStream(i),
                                 max_frames=100) for i, (pr, t, pad) in enumerate(prompts[j] for j in idx)])
        launch = be._entries(hs)
        row = {}
        for name, flags in FLAGS.items():
            launch.flags = flags
            row[name + "_ms"] = _time_launches(be, launch, args.frames, 5)[0]
            be.stream.synchronize()
            be.attn_count.zero_()  # runs without grid barriers leave the combine counters undefined
        for h in hs:
            be.close(h)
        res[str(B)] = row
        print(B, json.dumps(row))
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
