"""Where one megakernel frame spends its time, section by section (timing experiment, needs a CUDA GPU).

Builds the kernel with MK_TRACE=1: thread 0 of block 0 and of block gridDim/2 stamps clock64 at section boundaries
(grid barrier, phase begin/end, each weight tile ready, RMSNorm, attention, sampling). One traced frame on random
0.6B weights; the cycles between consecutive stamps are summed per section kind, separately for the talker step
(up to the codebook-0 sample) and the code predictor, and converted to microseconds with the clock rate measured
on the same launch (cycles / CUDA-event time).

    python -m qwen_tts_megakernel.tools.mk_trace [--frames-before 8] [--output trace.json]
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import json
import os
import sys
from collections import defaultdict

TAGS = {1: "FRAME_BEGIN", 2: "FRAME_END", 3: "BAR_BEGIN", 4: "BAR_END", 5: "PHASE_BEGIN", 6: "TILE_READY",
        7: "PHASE_END", 8: "NORM_BEGIN", 9: "NORM_END", 10: "ATTN_BEGIN", 11: "ATTN_END", 12: "COMBINE_END",
        13: "SAMPLE_BEGIN", 14: "SAMPLE_END", 15: "COPY_END"}

# (tag at the start of an interval, tag at its end) -> section name; anything else is "other: A -> B".
SECTIONS = {
    ("BAR_BEGIN", "BAR_END"): "grid barrier",
    ("PHASE_BEGIN", "TILE_READY"): "first tile wait",
    ("TILE_READY", "TILE_READY"): "tile math + next tile wait",
    ("TILE_READY", "PHASE_END"): "last tile math + epilogue",
    ("NORM_BEGIN", "NORM_END"): "rmsnorm (activation load, reduce)",
    ("ATTN_BEGIN", "ATTN_END"): "attention",
    ("BAR_END", "COMBINE_END"): "attention combine",
    ("BAR_END", "COPY_END"): "mlp activation load",
    ("SAMPLE_BEGIN", "SAMPLE_END"): "sampling",
}


def section_times(records: list[int]) -> dict[str, dict[str, float]]:
    """Records (tag << 56 | clock) -> {"talker": {section: cycles}, "code_predictor": {...}}."""
    events = [(TAGS.get(r >> 56, f"TAG{r >> 56}"), r & ((1 << 56) - 1)) for r in records]
    out = {"talker": defaultdict(float), "code_predictor": defaultdict(float)}
    part = "talker"
    for (a, ta), (b, tb) in itertools.pairwise(events):
        name = SECTIONS.get((a, b), f"other: {a} -> {b}")
        out[part][name] += tb - ta
        if b == "SAMPLE_END":
            part = "code_predictor"
    return {k: dict(v) for k, v in out.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwen_tts_megakernel.tools.mk_trace")
    p.add_argument("--frames-before", type=int, default=8, help="untraced frames first (KV positions, warm-up)")
    p.add_argument("--frames", type=int, default=2, help="traced frames, launched back to back (the last is "
                   "reported section by section)")
    p.add_argument("--output", default=None)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    defines = os.environ.get("QWEN_TTS_MK_DEFINES", "")
    if "MK_TRACE=1" not in defines.split():
        os.environ["QWEN_TTS_MK_DEFINES"] = (defines + " MK_TRACE=1").strip()

    import torch

    from ..sampling import RandomStream, SamplingParams
    from ..megakernel.backend import MegakernelBackend, _check
    from .validate import random_config, random_prompt, random_weights

    config = random_config("0.6b")
    backend = MegakernelBackend(config, random_weights(config, seed=0), device="cuda", max_seq_len=1024)
    lib = backend.lib
    prefill, text, pad = random_prompt(config, n_prefill=12, n_text=64)
    stream = backend.open_stream(prefill, text, pad, SamplingParams(), RandomStream(7), lookahead=0)
    stream.struct.min_new_tokens = 1 << 40  # never stop at EOS
    k = 0
    for k in range(args.frames_before):
        backend.launch(stream.struct, k, stream.L - 1 + k)
    backend.stream.synchronize()
    _check(lib, lib.mk_trace_reset(), "mk_trace_reset")
    events = []
    for k in range(args.frames_before, args.frames_before + args.frames):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(backend.stream)
        backend.launch(stream.struct, k, stream.L - 1 + k)
        b.record(backend.stream)
        events.append((a, b))
    backend.stream.synchronize()
    stream.launched = args.frames_before + args.frames
    frames_ms = [a.elapsed_time(b) for a, b in events]
    frame_ms = frames_ms[-1]
    report = {"gpu": torch.cuda.get_device_name(), "frames_ms_event": frames_ms, "blocks": {}}
    buf = (ctypes.c_ulonglong * 16384)()
    n = ctypes.c_int(0)
    for which, label in ((0, "block 0"), (1, f"block {backend.num_blocks // 2}")):
        _check(lib, lib.mk_trace_read(which, buf, len(buf), ctypes.byref(n)), "mk_trace_read")
        records = list(buf[: n.value])
        stamp = {1: [], 2: []}  # FRAME_BEGIN / FRAME_END clocks of every traced frame
        for r in records:
            if r >> 56 in stamp:
                stamp[r >> 56].append(r & ((1 << 56) - 1))
        per_frame = [e - b for b, e in zip(stamp[1], stamp[2])]
        last_begin = max(i for i, r in enumerate(records) if r >> 56 == 1)
        records = records[last_begin:]  # the last frame, section by section
        clocks = [r & ((1 << 56) - 1) for r in records]
        cycles = clocks[-1] - clocks[0] if records else 0
        mhz = cycles / (frame_ms * 1e3) if frame_ms > 0 else float("nan")  # cycles per microsecond
        times = section_times(records)
        report["blocks"][label] = {
            "records": n.value, "cycles": cycles, "cycles_per_us": mhz, "frame_cycles": per_frame,
            "us": {part: {k2: v / mhz for k2, v in sorted(sec.items(), key=lambda kv: -kv[1])}
                   for part, sec in times.items()}}
    stream.close()
    for label, rep in report["blocks"].items():
        print(f"== {label}: {rep['records']} records; last frame {rep['cycles']} cycles, {frame_ms:.3f} ms "
              f"(CUDA events), {rep['cycles_per_us']:.0f} cycles/us; every traced frame (ms, events): "
              f"{', '.join(f'{t:.3f}' for t in frames_ms)}; cycles: {rep['frame_cycles']}")
        for part, sec in rep["us"].items():
            total = sum(sec.values())
            print(f"  {part}: {total:.1f} us")
            for name, us in sec.items():
                if us >= 0.005 * total:
                    print(f"    {name:45s} {us:9.1f} us  {100 * us / total:5.1f} %")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
