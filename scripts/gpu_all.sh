#!/usr/bin/env bash
# Every GPU check of the whole system in one device call, most important first, each step under a deadline:
#   engine on the GPU (fault isolation, server limits) -> bench --load (megakernel, graphed reference) -> codec
#   (batch invariance, SNR, timing) -> megakernel long-run tests -> voice cloning -> a fresh-machine `say` with the
#   prebuilt kernel and no nvcc. The megakernel's own validate/bench steps are scripts/gpu_check.sh.
#   run(command="QWEN_TTS_MK_COMMIT=<sha> bash scripts/gpu_all.sh", carry=[".whl/server", ".whl/av", ".mkcache", "dist"])
#   (STEPS="engine load_mk": some steps). Write the sha of this checkout into the command here: the copy on the device
#   machine may carry a stale .git, and the results files record whatever commit the tools find.
#   Wheels the GPU image lacks travel in .whl/: server/ (FastAPI and friends), av/ (PyAV, 36 MB: only the compressed
#   formats need it), ray/ (bash scripts/carry_ray.sh: Ray Serve, for the serve_overhead step). 64 MiB per call in
#   all, so carry the folders the chosen STEPS need.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1
if compgen -G ".whl/*/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/server-site .whl/*/*.whl
  export PYTHONPATH="/tmp/server-site:$PYTHONPATH"
fi
if compgen -G ".whl/ray/ray-*.tar.xz" >/dev/null; then
  mkdir -p /tmp/server-site && tar -C /tmp/server-site -xJf .whl/ray/ray-*.tar.xz
fi
if [ -d .mkcache ]; then export QWEN_TTS_MK_CACHE="$PWD/.mkcache"; fi
LOG="${OUT:-/tmp/gpu_all}/logs"; mkdir -p "$LOG" benchmarks/results
DEADLINE=${DEADLINE:-570}
touch /tmp/gpu_all_start
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv 2>&1 | tee "$LOG/gpu.txt"
rc=0
step() {  # step NAME SECONDS CMD...: run with a time limit, log to $LOG/NAME.log; skipped if it could pass DEADLINE
  local name=$1 secs=$2; shift 2
  if [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $name "* ]]; then return; fi  # STEPS="a b": only these
  if [ $((SECONDS + secs)) -gt "$DEADLINE" ]; then echo "== $name: skipped (deadline)"; return; fi
  echo "== $name"
  local t0=$SECONDS
  timeout "$secs" "$@" 2>&1 | tee "$LOG/$name.log" | tail -40
  local st=${PIPESTATUS[0]}
  echo "== $name: exit $st, $((SECONDS - t0)) s"
  [ "$st" -eq 0 ] || rc=1
}
LOAD="python3 -m qwen_tts_megakernel.cli bench --load --frames 100 --output-dir benchmarks/results"
step engine 150 python3 -m pytest -q -m gpu tests/test_engine_faults_real.py tests/test_server_gpu.py -x
step load_mk 200 $LOAD --backends megakernel --levels 1 16 64 128 --rates 10 20 40
mv benchmarks/results/nvidia-h200-load.json benchmarks/results/nvidia-h200-load-megakernel.json 2>/dev/null
mv benchmarks/results/nvidia-h200-load.md benchmarks/results/nvidia-h200-load-megakernel.md 2>/dev/null
mv benchmarks/results/nvidia-h200-load.png benchmarks/results/nvidia-h200-load-megakernel.png 2>/dev/null
step load_graphed 110 $LOAD --backends graphed --protocols http --levels 1 16 64 --rates 10 20
step codec_tests 90 python3 -m pytest -q -m gpu tests/test_codec_batch.py tests/test_codec_graph.py -x
step codec_timing 90 python3 -m qwen_tts_megakernel.tools.codec_timing --runs 5
step mk_long 100 python3 -m pytest -q -m gpu tests/test_megakernel.py -k "ten_thousand or ties"
step clone 60 python3 -m pytest -q -s -m gpu tests/test_clone_gpu.py
step graphed 60 python3 -m pytest -q -m gpu tests/test_graphed.py
if python3 -c "import ray.serve" 2>/dev/null; then
  step serve_overhead 420 env RAY_USAGE_STATS_ENABLED=0 python3 -m qwen_tts_megakernel.cli bench --serve-overhead \
    --backend megakernel --model random:0.6b --output-dir benchmarks/results
fi
if compgen -G "dist/*.whl" >/dev/null; then
  step fresh_say 70 bash -c 'rm -rf /tmp/fresh-site; python3 -m pip install -q --no-deps --no-index --target /tmp/fresh-site dist/*.whl \
    && unset CUDA_HOME CUDA_PATH && export PATH=$(echo "$PATH" | tr : "\n" | grep -v cuda | paste -sd:) \
    && cd /tmp && echo "nvcc: $(command -v nvcc || echo none)" \
    && PYTHONPATH=/tmp/fresh-site:/tmp/server-site QWEN_TTS_MK_CACHE=/tmp/empty-cache python3 -m qwen_tts_megakernel.cli say \
       "Hello from a fresh machine without the CUDA toolkit." -o /tmp/hello.wav --backend megakernel --model random:0.6b \
       --max-new-tokens 50 --seed 1 && echo "compiled into the cache: $(ls -A /tmp/empty-cache 2>/dev/null | wc -l)"'
fi
echo "gpu_all rc=$rc"
if [ -n "${OUT:-}" ]; then
  find benchmarks/results -type f -newer /tmp/gpu_all_start > /tmp/gpu_all_files
  tar czf "$OUT/gpu_all.tgz" -C "$OUT" logs -C "$PWD" -T /tmp/gpu_all_files
fi
exit $rc
