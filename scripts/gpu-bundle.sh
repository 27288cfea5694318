#!/usr/bin/env bash
# Packs what the GPU checks need into gpu/ (git-ignored), for a GPU machine that has the NVIDIA
# driver and the CUDA libraries but no Rust toolchain and no network:
#
#   scripts/gpu-bundle.sh                 # here: build (scripts/cuda-cargo) and pack
#   bash scripts/gpu-check.sh quick       # there, with gpu/ carried along (see that script)
#
# gpu/ holds pipe.xz (the release binary, CUDA build, stripped), cuda-tests.xz (pipe-stages'
# unit-test binary of the same build, stripped; `cuda-tests cuda_vs_cpu` runs the CUDA-vs-CPU
# tests), cifar10-jpeg.tar.gz (from $PIPE_DATA or ../shared/data) and SHA256SUMS. xz keeps the
# whole folder under the 64 MiB a device call carries (the binaries are mostly PTX text).

set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=$root/gpu
data=${PIPE_DATA:-$root/../shared/data}
archive=$data/cifar10-jpeg.tar.gz
[[ -f $archive ]] || { echo "gpu-bundle: no $archive (set PIPE_DATA to the folder that holds it)" >&2; exit 1; }
command -v xz >/dev/null || { echo "gpu-bundle: xz is needed" >&2; exit 1; }

cd "$root"
scripts/cuda-cargo build --release --features cuda
tests=$(scripts/cuda-cargo test --release --features cuda -p pipe-stages --lib --no-run \
    --message-format=json | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "pipe_stages":
        print(m["executable"])
' | tail -n 1)
[[ -n $tests && -x $tests ]] || { echo "gpu-bundle: no pipe-stages test binary found" >&2; exit 1; }

target=${CARGO_TARGET_DIR:-$root/target-cuda}
rm -rf "$out.tmp"
mkdir -p "$out.tmp"
strip -o "$out.tmp/pipe" "$target/release/pipe"
strip -o "$out.tmp/cuda-tests" "$tests"
xz -T0 -6 "$out.tmp/pipe" "$out.tmp/cuda-tests"
cp "$archive" "$out.tmp/"
(cd "$out.tmp" && sha256sum pipe.xz cuda-tests.xz cifar10-jpeg.tar.gz >SHA256SUMS)
rm -rf "$out"
mv "$out.tmp" "$out"
du -ab "$out" | sort -n >&2
total=$(du -sb "$out" | cut -f1)
if (( total > 60 * 1024 * 1024 )); then
    echo "gpu-bundle: gpu/ is $total bytes: close to the 64 MiB a device call carries" >&2
fi
echo "gpu-bundle: ready; on the GPU machine (carry gpu/): bash scripts/gpu-check.sh quick" >&2
