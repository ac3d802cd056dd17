#!/usr/bin/env bash
# Nsight Compute profile of one full megakernel frame (H100, random 0.6B weights): the details page (speed of
# light, memory, warp states, scheduler) and per-SASS-instruction stall samples, written to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/ncu_out}"; mkdir -p "$OUT"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
timeout 400 "$NCU" --clock-control none -k regex:frame_kernel --launch-skip 3 --launch-count 1 --set full \
  --import-source no -f -o /tmp/frame python3 scripts/ncu_frame.py 2>&1 | tail -20
"$NCU" --import /tmp/frame.ncu-rep --page details > "$OUT/ncu_details.txt" 2>&1
"$NCU" --import /tmp/frame.ncu-rep --page source --print-source sass --csv 2>/dev/null | gzip > "$OUT/ncu_sass.csv.gz"
ls -la "$OUT"
