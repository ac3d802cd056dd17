#!/usr/bin/env bash
# Megakernel experiments in one device call, most important first, each step under a time limit and skipped when it
# could pass DEADLINE (s); logs and results come back under $OUT:
#   decode_base / decode - bench --decode (BATCH, DSIZES) of BASE=<src dir> (when given) and of this tree
#   validate             - validate --batch (VBATCH, VSIZE) of this tree
#   trace_base / trace   - dev/mk_trace.py section trace (TBATCH, TSIZES) of BASE and of this tree
#   ring                 - dev/ring_ab.py weight-ring floor A/B against 4c58a06 (.wt-old/src: git archive 4c58a06 src)
#   probe_base / probe   - dev/admission_probe.py (needs .whl/server) on BASE and on this tree
# Logs and the result files this run wrote come back as $OUT/gpu_kernel.tgz.
#   run(command="BASE=.wt-base/src STEPS='decode_base decode' bash scripts/gpu_kernel.sh", carry=[".mkcache", ".wt-base"])
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1
if [ -d .mkcache ]; then export QWEN_TTS_MK_CACHE="$PWD/.mkcache"; fi
SITE=""
if compgen -G ".whl/server/*.whl" >/dev/null; then  # the server's wheels, for the admission probe
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/server-site .whl/server/*.whl
  SITE=/tmp/server-site
fi
LOG="${OUT:-/tmp/gpu_kernel}/logs"; mkdir -p "$LOG" benchmarks/results
DEADLINE=${DEADLINE:-580}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv 2>&1 | tee "$LOG/gpu.txt"
rc=0
step() {  # step NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  if [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $name "* ]]; then return; fi
  local left=$((DEADLINE - SECONDS)); [ "$left" -lt 20 ] && { echo "== $name: skipped (deadline)"; return; }
  [ "$secs" -gt "$left" ] && secs=$left
  echo "== $name"; local t0=$SECONDS
  timeout "$secs" "$@" 2>&1 | tee "$LOG/$name.log" | tail -${TAIL:-30}
  local st=${PIPESTATUS[0]}; echo "== $name: exit $st, $((SECONDS - t0)) s"; [ "$st" -eq 0 ] || rc=1
}
DEC="python3 -m qwen_tts_megakernel.cli bench --decode --batch ${BATCH:-1,2,4,8,16,32,64} --frames ${DFRAMES:-50}"
if [ -n "${BASE:-}" ]; then
  step decode_base 240 bash -c "mkdir -p $LOG/base && for s in ${DSIZES_BASE:-0.6b 1.7b}; do PYTHONPATH=$BASE $DEC --random-weights \$s --output-dir $LOG/base; done"
fi
step decode 240 bash -c "for s in ${DSIZES:-0.6b 1.7b}; do $DEC --random-weights \$s --output-dir benchmarks/results; done"
VAL="python3 -m qwen_tts_megakernel.cli validate --random-weights ${VSIZE:-0.6b} --batch ${VBATCH:-1,2,7,16,64} ${VARGS:-}"
step validate 300 $VAL
if [ -n "${VFALLBACK:-}" ] && ! grep -q "overall: PASS" "$LOG/validate.log" 2>/dev/null; then  # e.g. VFALLBACK=MK_KV_BITS=32
  step validate_fallback 300 env QWEN_TTS_MK_DEFINES="$VFALLBACK" $VAL
fi
TRACE="python3 dev/mk_trace.py --batch ${TBATCH:-1,64} --out-dir benchmarks/results"
if [ -n "${BASE:-}" ]; then
  step trace_base 150 bash -c "for s in ${TSIZES:-0.6b}; do PYTHONPATH=$BASE $TRACE --size \$s --tag before; done"
fi
step trace 150 bash -c "for s in ${TSIZES:-0.6b}; do $TRACE --size \$s ${BASE:+--tag after}; done"
step ring 200 python3 dev/ring_ab.py --old .wt-old/src --rounds ${RING_ROUNDS:-2} --out benchmarks/results/ring-ab.json
# admission under open-loop load, the code before issue 24 (BASE) and this tree (issue 24's diagnosis)
PROBE="python3 dev/admission_probe.py --rates ${PRATES:-1 10 20} --frames 50 --seconds ${PSECONDS:-8}"
if [ -n "${BASE:-}" ] && [ -n "$SITE" ]; then
  step probe_base 150 env PYTHONPATH="$SITE:$BASE" $PROBE --out benchmarks/results/admission-probe-before.json
fi
[ -n "$SITE" ] && step probe 150 env PYTHONPATH="$SITE:$PWD/src" $PROBE --out benchmarks/results/admission-probe-after.json
echo "gpu_kernel rc=$rc"
if [ -n "${OUT:-}" ]; then  # one archive: only a few files come back from a device call, and a later call's
  # checkout replaces files this run wrote
  find benchmarks/results -type f -newer "$LOG/gpu.txt" > /tmp/gpu_kernel_files
  tar czf "$OUT/gpu_kernel.tgz" -C "$OUT" logs -C "$PWD" -T /tmp/gpu_kernel_files && rm -rf "$LOG"
fi
exit $rc
