#!/usr/bin/env bash
# Every GPU check of the megakernel in one call (fits 10 minutes on an H100):
#   GPU tests -> validate (random full-size 0.6B weights) -> bench --decode; results under benchmarks/results/
#   and copied to $OUT (when set) so they come back from the device machine.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src PYTHONUNBUFFERED=1
# A prebuilt library may travel in .mkcache (same source hash); otherwise nvcc builds it at first use.
if [ -d .mkcache ]; then export QWEN_TTS_MK_CACHE="$PWD/.mkcache"; fi
OUT="${OUT:-/tmp/mk_out}"; mkdir -p "$OUT" benchmarks/results
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv 2>&1 | tee "$OUT/gpu.txt"
rc=0
timeout 300 $PY -m pytest -q -m gpu tests/test_megakernel.py --maxfail=4 ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/tests.log" || rc=1
timeout 150 $PY -m qwen_tts_megakernel.megakernel.validate --random-weights 0.6b --frames 64 \
  --output benchmarks/results/validate-random-0.6b.json 2>&1 | tee "$OUT/validate.log" || rc=1
timeout 150 $PY -m qwen_tts_megakernel.megakernel.bench --decode --random-weights 0.6b \
  --output-dir benchmarks/results 2>&1 | tee "$OUT/bench.log" || rc=1
cp benchmarks/results/*.json benchmarks/results/*.md "$OUT/" 2>/dev/null
echo "gpu_check rc=$rc"
exit $rc
