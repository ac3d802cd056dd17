#!/usr/bin/env bash
# The engine under load on the GPU machine, in one call (after scripts/gpu_check.sh, which checks correctness):
#   engine GPU tests -> bench --load (megakernel and graphed reference, 0.6B; megakernel 1.7B)
# The server needs FastAPI/uvicorn/websockets, which the GPU image lacks: they travel as wheels in .whl/server.
#   run(command="bash scripts/gpu_load.sh", carry=[".whl", ".mkcache"])
# Results land in benchmarks/results/; with $OUT set they are also copied there (logs packed in one file).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1
if compgen -G ".whl/server/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/server-site .whl/server/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/server-site"
fi
if [ -d .mkcache ]; then export QWEN_TTS_MK_CACHE="$PWD/.mkcache"; fi
LOG="${OUT:-/tmp/load_out}/logs"; mkdir -p "$LOG" benchmarks/results
touch /tmp/gpu_load_start
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
LOAD="python3 -m qwen_tts_megakernel.cli bench --load --frames 100 --levels 1 8 16 32 64 128 --rates 5 10 20 40 80"
step engine_tests 150 python3 -m pytest -q -m gpu tests/test_engine_faults_real.py tests/test_graphed.py
step load_0.6b 330 $LOAD --backends megakernel graphed --models random:0.6b --output-dir benchmarks/results
step load_1.7b 150 $LOAD --backends megakernel --models random:1.7b --levels 1 16 64 --rates 10 20 \
  --output-dir benchmarks/results/1.7b
echo "gpu_load rc=$rc"
if [ -n "${OUT:-}" ]; then
  find benchmarks/results -type f -newer /tmp/gpu_load_start > /tmp/gpu_load_files
  tar czf "$OUT/gpu_load.tgz" -C "$OUT" logs -C "$PWD" -T /tmp/gpu_load_files
fi
exit $rc
