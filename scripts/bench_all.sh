#!/usr/bin/env bash
# The whole-system GPU benchmark (issue 7) in one call on the GPU machine:
#   run(command="bash scripts/bench_all.sh", carry=[".whl"])
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# .whl/official: qwen-tts 0.1.1 + transformers 4.57.3 & co, seen only by the official-baseline subprocess.
# .whl/server: FastAPI/uvicorn/websockets for the server section, where the GPU image lacks them.
SITE=/tmp/official-site
args=()
if compgen -G ".whl/official/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/official/*.whl
    args+=(--official-site "$SITE")
fi
if compgen -G ".whl/server/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/server-site .whl/server/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/server-site"
fi
# GPU tests of the reference-side code (the megakernel's own run in scripts/gpu_check.sh).
python3 -m pytest -q -m gpu tests/test_graphed.py tests/test_codec.py 2>&1 | tail -15 || true
touch /tmp/bench_start
status=0
python3 -m qwen_tts_megakernel.cli bench --all --output-dir benchmarks/results "${args[@]}" "$@" || status=$?
if [ -n "${OUT:-}" ]; then
    # Only what this run wrote (the reply brings back at most 8 files).
    find benchmarks/results -maxdepth 1 -type f -newer /tmp/bench_start -exec cp {} "$OUT"/ \;
fi
exit "$status"
