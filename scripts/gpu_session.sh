#!/usr/bin/env bash
# One device call: an A/B of two kernel trees, then every acceptance check on the faster correct one.
#   ab        - frame ms at B=1,16,64 (0.6B) of CAND (a src dir, e.g. this tree) and ALT (e.g. .wt-head/src)
#   quickval  - validate --batch 1,7,64 (8 frames) of CAND; CAND is kept when it passes and is not slower at B=64
#   validate  - validate --batch 1,2,7,16,64 (32 frames per stream, positions to 1500), 0.6B then 1.7B (end)
#   decode    - bench --decode --batch 1,2,4,8,16,32,64, both sizes
#   tests     - the megakernel GPU tests (10,000 launches with joins and leaves, batch invariance, faults)
#   load      - bench --load, 0.6B megakernel: open loop 10 and 20 req/s on a fresh server, closed loop 1 and 64 (ws)
#   trace     - dev/mk_trace.py section trace of the kept tree at B=1 and 64 (0.6B)
# Logs and new result files come back as $OUT/session.tgz.
#   run(command="CAND=src ALT=.wt-head/src bash scripts/gpu_session.sh", carry=[".mkcache", ".wt-head", ".whl/server"])
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
[ -d .mkcache ] && export QWEN_TTS_MK_CACHE="$PWD/.mkcache"
SITE=/tmp/server-site
compgen -G ".whl/server/*.whl" >/dev/null && \
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $SITE .whl/server/*.whl
LOG="${OUT:-/tmp/gpu_session}/logs"; mkdir -p "$LOG" benchmarks/results
touch /tmp/session_start
DEADLINE=${DEADLINE:-560}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv 2>&1 | tee "$LOG/gpu.txt"
rc=0
step() {  # step NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  local left=$((DEADLINE - SECONDS)); [ "$left" -lt 20 ] && { echo "== $name: skipped (deadline)"; return; }
  [ "$secs" -gt "$left" ] && secs=$left
  echo "== $name"; local t0=$SECONDS
  timeout "$secs" "$@" > "$LOG/$name.log" 2>&1; local st=$?
  tail -${TAIL:-12} "$LOG/$name.log"; echo "== $name: exit $st, $((SECONDS - t0)) s"; [ "$st" -eq 0 ] || rc=1
}
CAND=${CAND:-src}; ALT=${ALT:-}
FRAME_MS="import json; from dev.mk_trace import _frame_ms; print('RESULT', json.dumps(_frame_ms('0.6b', [int(b) for b in '${ABATCH:-1,16,64}'.split(',')])))"
TREE=$CAND
if [ -n "$ALT" ]; then
  step ab_alt 90 env PYTHONPATH="$ALT" python3 -c "$FRAME_MS"
  step ab_cand 90 env PYTHONPATH="$CAND" python3 -c "$FRAME_MS"
  step quickval 120 env PYTHONPATH="$CAND" python3 -m qwen_tts_megakernel.cli validate --random-weights 0.6b \
    --batch 1,7,64 --frames 8 --max-pos 800 --output /tmp/quickval.json
  keep=$(python3 - "$LOG" <<'PY'
import json, sys
def ms(name):
    for line in open(f"{sys.argv[1]}/{name}.log"):
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return None
alt, cand = ms("ab_alt"), ms("ab_cand")
ok = "overall: PASS" in open(f"{sys.argv[1]}/quickval.log").read()
print("cand" if ok and alt and cand and cand["64"] <= 1.03 * alt["64"] else "alt")
PY
)
  [ "$keep" = alt ] && TREE=$ALT
  echo "== kept: $TREE ($keep)" | tee "$LOG/kept.txt"
fi
export PYTHONPATH="$SITE:$PWD/$TREE"
CLI="python3 -m qwen_tts_megakernel.cli"
step validate06 200 $CLI validate --random-weights 0.6b --batch 1,2,7,16,64 \
  --output benchmarks/results/validate-random-0.6b-batch.json
step decode 200 bash -c "for s in ${DSIZES:-0.6b 1.7b}; do $CLI bench --decode --random-weights \$s --batch 1,2,4,8,16,32,64 --frames 30 --output-dir benchmarks/results; done"
step tests 150 python3 -m pytest -q -m gpu tests/test_megakernel.py -x
step load 150 $CLI bench --load --models random:0.6b --backends megakernel --levels 1 64 --rates 10 20 --frames 50 \
  --protocols ws --output-dir benchmarks/results
step validate17 200 $CLI validate --random-weights 1.7b --batch 1,2,7,16,64 \
  --output benchmarks/results/validate-random-1.7b-batch.json
step trace 120 python3 dev/mk_trace.py --size 0.6b --batch 1,64 --tag final --out-dir benchmarks/results
echo "gpu_session rc=$rc"
if [ -n "${OUT:-}" ]; then
  find benchmarks/results -type f -newer /tmp/session_start > /tmp/session_files
  tar czf "$OUT/session.tgz" -C "$OUT" logs -C "$PWD" -T /tmp/session_files
  rm -rf "$OUT/logs"
fi
exit $rc
