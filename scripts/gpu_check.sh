#!/usr/bin/env bash
# Every GPU check of the batched megakernel, most important first (validate: 32 frames per stream, prompts to 1500
# rows; all steps take about 10 minutes on an H200, more than one device call, so the deadline skips the tail):
#   validate --batch (0.6B, 1.7B) -> GPU tests -> bench --decode --batch (0.6B) -> stage breakdown (dev/)
#   -> bench --decode --batch (1.7B). A step that could end past the deadline ($DEADLINE s, default 540) is skipped.
# Results land in benchmarks/results/; with $OUT set (the device machine), logs and this run's result files are
# packed into $OUT/gpu_check.tgz, because only a few files come back from there.
#   run(command="cd .wt-mk && bash scripts/gpu_check.sh", carry=[".wt-mk"])
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src PYTHONUNBUFFERED=1
# Prebuilt libraries may travel in .mkcache (scripts/mk_prebuild.py, same source hash); otherwise nvcc builds them.
if [ -d .mkcache ]; then export QWEN_TTS_MK_CACHE="$PWD/.mkcache"; fi
LOG="${OUT:-/tmp/mk_out}/logs"; mkdir -p "$LOG" benchmarks/results
PY=${PYTHON:-python3}
DEADLINE=${DEADLINE:-540}
touch /tmp/gpu_check_start
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv 2>&1 | tee "$LOG/gpu.txt"
rc=0
step() {  # step NAME SECONDS CMD...: run with a time limit, log to $LOG/NAME.log, remember a failure
  local name=$1 secs=$2; shift 2
  if [ $((SECONDS + secs)) -gt "$DEADLINE" ]; then echo "== $name: skipped (deadline)"; return; fi
  echo "== $name"
  local t0=$SECONDS
  timeout "$secs" "$@" 2>&1 | tee "$LOG/$name.log"
  local st=${PIPESTATUS[0]}
  echo "== $name: exit $st, $((SECONDS - t0)) s"
  [ "$st" -eq 0 ] || rc=1
}
step validate 240 $PY -m qwen_tts_megakernel.tools.validate --random-weights 0.6b --batch 1,2,7,16,64 \
  --output benchmarks/results/validate-random-0.6b-batch.json
step validate17 300 $PY -m qwen_tts_megakernel.tools.validate --random-weights 1.7b --batch 1,2,7,16,64 \
  --output benchmarks/results/validate-random-1.7b-batch.json
step tests 170 $PY -m pytest -q -m gpu tests/test_megakernel.py --maxfail=4 ${PYTEST_K:+-k "$PYTEST_K"}
step bench 60 $PY -m qwen_tts_megakernel.tools.mk_bench --decode --random-weights 0.6b --batch 1,2,4,8,16,32,64 \
  --frames 50 --output-dir benchmarks/results
step breakdown 45 env QWEN_TTS_MK_DEFINES=MK_DEV_TIMING=1 $PY dev/mk_breakdown.py --batch 1,16,64 \
  --out benchmarks/results/breakdown-random-0.6b.json
step bench17 50 $PY -m qwen_tts_megakernel.tools.mk_bench --decode --random-weights 1.7b --batch 1,16,64 \
  --frames 30 --output-dir benchmarks/results
echo "gpu_check rc=$rc"
if [ -n "${OUT:-}" ]; then
  find benchmarks/results -maxdepth 1 -type f -newer /tmp/gpu_check_start > /tmp/gpu_check_files
  tar czf "$OUT/gpu_check.tgz" -C "$OUT" logs -C "$PWD" -T /tmp/gpu_check_files
fi
exit $rc
