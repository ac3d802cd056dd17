#!/usr/bin/env bash
# Every GPU check of the megakernel in one call (fits 10 minutes on an H100/H200):
#   GPU tests (megakernel, codec graphs) -> validate (random full-size 0.6B weights) -> bench --decode
#   -> kernel variants side by side, when given as arguments (NAME:DEFINES, see scripts/mk_variants.sh)
#   -> section trace of one frame (MK_TRACE=1 build) -> codec push timing (eager vs graphs).
# Results land in benchmarks/results/; with $OUT set (the device machine), logs and this run's result files are
# packed into $OUT/gpu_check.tgz, because only a few files come back from there.
#   run(command="bash scripts/gpu_check.sh base: ring5:MK_RING=5", carry=[".mkcache"])
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src PYTHONUNBUFFERED=1
# Prebuilt libraries may travel in .mkcache (scripts/mk_prebuild.py, same source hash); otherwise nvcc builds them.
if [ -d .mkcache ]; then export QWEN_TTS_MK_CACHE="$PWD/.mkcache"; fi
LOG="${OUT:-/tmp/mk_out}/logs"; mkdir -p "$LOG" benchmarks/results
PY=${PYTHON:-python3}
touch /tmp/gpu_check_start
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv 2>&1 | tee "$LOG/gpu.txt"
rc=0
step() {  # step NAME SECONDS CMD...: run with a time limit, log to $LOG/NAME.log, remember a failure
  local name=$1 secs=$2; shift 2
  echo "== $name"
  local t0=$SECONDS
  timeout "$secs" "$@" 2>&1 | tee "$LOG/$name.log"
  local st=${PIPESTATUS[0]}
  echo "== $name: exit $st, $((SECONDS - t0)) s"
  [ "$st" -eq 0 ] || rc=1
}
step tests 240 $PY -m pytest -q -m gpu tests/test_megakernel.py tests/test_codec_graph.py --maxfail=6 ${PYTEST_ARGS:-}
step validate 150 $PY -m qwen_tts_megakernel.tools.validate --random-weights 0.6b --frames 64 \
  --output benchmarks/results/validate-random-0.6b.json
step bench 150 $PY -m qwen_tts_megakernel.tools.mk_bench --decode --random-weights 0.6b \
  --output-dir benchmarks/results
if [ $# -gt 0 ]; then
  OUT="$LOG" step variants 400 bash scripts/mk_variants.sh "$@"
fi
step trace 120 $PY -m qwen_tts_megakernel.tools.mk_trace --output benchmarks/results/trace-random-0.6b.json
step codec_timing 120 $PY -m qwen_tts_megakernel.tools.codec_timing --out benchmarks/results/codec-timing.json
echo "gpu_check rc=$rc"
if [ -n "${OUT:-}" ]; then
  find benchmarks/results -maxdepth 1 -type f -newer /tmp/gpu_check_start > /tmp/gpu_check_files
  tar czf "$OUT/gpu_check.tgz" -C "$OUT" logs -C "$PWD" -T /tmp/gpu_check_files
fi
exit $rc
