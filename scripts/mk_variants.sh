#!/usr/bin/env bash
# Kernel variants side by side, one process each (validate on random 0.6B weights + decode timings), one JSON line
# per variant in $OUT/variants.jsonl. Each argument is NAME:DEFINES (compile-time switches of mk_common.cuh):
#   bash scripts/mk_variants.sh "base:" "ring5:MK_RING=5" "no_tma:MK_TMA=0"
# Prebuilt libraries travel in .mkcache (scripts/mk_prebuild.py) so the device spends no time in nvcc.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src PYTHONUNBUFFERED=1
if [ -d .mkcache ]; then export QWEN_TTS_MK_CACHE="$PWD/.mkcache"; fi
OUT="${OUT:-/tmp/mk_out}"; mkdir -p "$OUT"
for spec in "$@"; do
  name="${spec%%:*}"; defs="${spec#*:}"
  QWEN_TTS_MK_DEFINES="$defs" timeout 240 python3 -m qwen_tts_megakernel.tools.mk_variants --name "$name" \
    --out "$OUT/variants.jsonl" 2>&1 | grep -E "VARIANT|Error|error" || echo "variant $name failed"
done
