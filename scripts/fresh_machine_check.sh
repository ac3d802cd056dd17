#!/usr/bin/env bash
# On a GPU machine, as a user without the CUDA toolkit meets it: install the wheel with prebuilt kernels (dist/, from
# `QWEN_TTS_MK_PREBUILD=all pip wheel --no-deps . -w dist`), hide nvcc, speak with the megakernel on random 0.6B
# weights (the say line reports the time from command to first chunk), validate against the reference; then the same
# validation on the PTX library alone (the path of GPUs newer than the prebuilt ones). Results under $OUT.
set -euo pipefail
out="${OUT:-$PWD/fresh-out}"
mkdir -p "$out"
wheel=$(ls dist/qwen_tts_megakernel-*-linux_x86_64.whl | tail -n 1)
site=/tmp/fresh-site
cache=/tmp/fresh-empty-cache
rm -rf "$site" "$cache"
python3 -m pip install -q --no-deps --no-index --target "$site" "$wheel"
export PYTHONPATH="$site" PATH="$site/bin:$PATH" QWEN_TTS_MK_CACHE="$cache"
unset CUDA_HOME CUDA_PATH NVCC
while nv=$(command -v nvcc); do  # take nvcc's folders off PATH, unless python3 lives there too
    dir=$(dirname "$nv")
    if [ -x "$dir/python3" ]; then echo "nvcc shares $dir with python3: left on PATH" >&2; break; fi
    PATH=$(echo "$PATH" | tr : '\n' | grep -vx "$dir" | paste -sd: -)
done
cd /tmp
echo "nvcc on PATH: $(command -v nvcc || echo none); CUDA_HOME: ${CUDA_HOME:-unset}; wheel: $wheel"
python3 -c "
import torch
from qwen_tts_megakernel.megakernel import build
arch = build.arch_for_capability(*torch.cuda.get_device_capability())
print(f'{torch.cuda.get_device_name()}: the library for sm_{arch} is {build.find_library(arch)}')"
time qwen-tts-mk say "Hello from a fresh machine without the CUDA toolkit." -o "$out/hello.wav" \
    --backend megakernel --model random:0.6b --max-new-tokens 50 --seed 1
qwen-tts-mk validate --random-weights 0.6b --output "$out/validate.json"
echo "libraries compiled into the cache: $(ls -A "$cache" 2>/dev/null | wc -l) (0: the prebuilt one ran)"

# The PTX library alone: no native library, and no nvcc even at /usr/local/cuda.
find "$site/qwen_tts_megakernel/megakernel/prebuilt" -mindepth 1 -maxdepth 1 ! -name '*-ptx' -exec rm -rf {} +
export CUDA_HOME=/nonexistent
time qwen-tts-mk validate --random-weights 0.6b --output "$out/validate-ptx.json"
