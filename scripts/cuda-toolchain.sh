#!/usr/bin/env bash
# A pinned CUDA build toolchain for `cargo build --features cuda`, from NVIDIA's PyPI wheels:
# no root, no system CUDA, no GPU needed to build. scripts/cuda-cargo is the way to use it:
#
#   scripts/cuda-cargo build --release --features cuda
#
# (which evals this script's output and runs cargo with cudarc switched to loading the CUDA
# libraries at run time, see cudarc_loading below). `eval "$(scripts/cuda-toolchain.sh)" &&
# cargo build --release --features cuda` works too and gives a binary that links them instead.
# PIPE_CUDA_TOOLKIT=/usr/local/cuda uses a system toolkit rather than the wheels.
#
# The first call downloads about 100 MB of wheels (pip, sha256-checked) and unpacks them into
# .cuda-toolchain/ (git-ignored; PIPE_CUDA_TOOLCHAIN=DIR puts it elsewhere); later calls only
# print the environment. Everything the script says goes to stderr; stdout is only the
# `export` lines for eval:
#
#   PATH (nvcc first), CUDA_ROOT / CUDA_PATH / CUDA_HOME (cudarc's and candle-kernels' build
#   scripts look there for nvcc, headers and libraries), CUDARC_CUDA_VERSION=13000,
#   CUDA_COMPUTE_CAP (default 90 = H100 / H200; set it before calling to build for another GPU,
#   e.g. CUDA_COMPUTE_CAP=80 for an A100), LIBRARY_PATH (the link stubs below),
#   PIPE_CUDARC_LOADING (the switched cudarc copy, for scripts/cuda-cargo).
#
# What the build needs (read off candle-kernels 0.11.1 / cudaforge 0.1.6 and cudarc 0.19.10):
#   - candle-kernels runs `nvcc` (found on PATH) on its .cu files: PTX for the element-wise,
#     reduction, conv and matmul-helper kernels, and a static library (libmoe.a) for the MoE /
#     GGUF kernels, for the one architecture CUDA_COMPUTE_CAP names (90 becomes sm_90a). It needs
#     nvcc, cudafe++, ptxas, fatbinary, nvlink (nvidia-cuda-nvcc), cicc + libdevice
#     (nvidia-nvvm), the runtime and math headers (nvidia-cuda-runtime, nvidia-cuda-crt), CCCL
#     (nvidia-cuda-cccl), a host C++ compiler (g++ <= 14) and links `-lcudart`.
#   - cudarc's build script runs `nvcc --version` to pick its bindings (CUDA 13.0 here) and, in
#     the `dynamic-linking` mode candle-core 0.11.1 selects, links -lcuda -lcublas -lcublasLt
#     -lcurand -lnvrtc (and -lcudnn with `--features cudnn`).
#
# Why CUDA 13.0 (13.0.88), not 12.x and not the newest 13.x:
#   - candle loads its kernels as PTX that the *driver* compiles when a device is opened; a
#     driver only accepts PTX from a toolkit no newer than itself. The H100 / H200 machines this
#     targets run driver 580.159 = CUDA 13.0, so 13.1+ PTX would fail to load there
#     (CUDA_ERROR_UNSUPPORTED_PTX_VERSION); 13.0 and every 12.x load.
#   - PyPI has no 12.x nvcc: nvidia-cuda-nvcc-cu12 12.9.86 (the newest) ships only ptxas and
#     libnvvm, no `nvcc` driver, cudafe++ or cicc. 13.0 is the one line that is both buildable from wheels
#     and loadable on a 580 driver.
#   - The binary needs cuBLAS and cuRAND by SONAME (libcublas.so.13, libcurand.so.10; see
#     below), which the 13.x libraries on those machines provide (PyTorch cu130's nvidia-*
#     packages, /usr/local/cuda); a 12.x build would need the .so.12 libraries at run time.
#   - sm_90a code loads only on sm_90 GPUs (H100 / H200); any other GPU needs its own
#     CUDA_COMPUTE_CAP at build time (`pipe devices` says when the two differ).
#
# Linking or loading the libraries: candle-core 0.11.1 turns on cudarc's `dynamic-linking`
# feature, and cudarc's build script refuses `dynamic-loading` next to it ("Both ... are
# active"). Built that way (plain cargo after eval) the libraries are NEEDED entries of the
# binary, resolved by the dynamic loader when pipe starts: it starts only where libcuda.so.1
# (the driver), libcublas.so.13 (which loads libcublasLt.so.13) and libcurand.so.10 can be found
# (LD_LIBRARY_PATH or ldconfig), even to run on the CPU; -lnvrtc and -lcublasLt are dropped by
# the linker's --as-needed (candle 0.11 calls neither). To link here without downloading those
# libraries (~800 MB of wheels), the script compiles link stubs, as NVIDIA's own lib/stubs/ do:
# one small shared object per library, with the real SONAME and one empty function for every
# symbol cudarc's bindings declare. They exist only at link time (LIBRARY_PATH, never
# LD_LIBRARY_PATH); the binary carries no RPATH to them. scripts/cuda-cargo builds against a
# copy of cudarc switched to its loading mode instead (cudarc_loading below): no CUDA library is
# NEEDED, cudarc dlopens each when a device is first opened, and pipe checks beforehand that
# each can be found (stages/src/device.rs), so one binary runs pipelines on the CPU anywhere and
# on the GPU where the libraries are. Either way the CUDA runtime that candle-kernels links is
# linked statically (lib/libcudart.a is the wheel's libcudart_static.a), so no libcudart.so is
# needed at run time.

set -euo pipefail

version=13.0
# name==version pins; pip checks each file against the index's sha256 and ours.
wheels=(
    "nvidia-cuda-nvcc==13.0.88 --hash=sha256:56fe502eb77625a12f25172caa3cdddb4e4c8ba2c8c17dba44b164761b380f03"
    "nvidia-nvvm==13.0.88 --hash=sha256:c5f41ffeb6466944a026dfa5317d7d85355c119bbec279205d22f1869d1054e0"
    "nvidia-cuda-crt==13.0.88 --hash=sha256:2c8043c7c9e02492716426e9919fc78d2c5b3b2a7a768a88e952676b08aa55a4"
    "nvidia-cuda-runtime==13.0.96 --hash=sha256:7f82250d7782aa23b6cfe765ecc7db554bd3c2870c43f3d1821f1d18aebf0548"
    "nvidia-cuda-cccl==13.0.85 --hash=sha256:e0da7ad981f3a8aff08241b5bfc1af868742a63e2762f53a5171c492ef242649"
)
# Link stubs: cudarc module, library name, SONAME of the CUDA 13.0 runtime library.
stubs=(
    "driver cuda libcuda.so.1"
    "cublas cublas libcublas.so.13"
    "cublaslt cublasLt libcublasLt.so.13"
    "curand curand libcurand.so.10"
    "nvrtc nvrtc libnvrtc.so.13"
    "cudnn cudnn libcudnn.so.9"
)

say() { printf 'cuda-toolchain: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dest=${PIPE_CUDA_TOOLCHAIN:-$root/.cuda-toolchain}
cuda=$dest/cuda-$version
cap=${CUDA_COMPUTE_CAP:-90}
[[ $cap =~ ^[0-9]+[af]?$ ]] || die "CUDA_COMPUTE_CAP must look like 90, 80 or 90a, got '$cap'"

stamp="$version ${wheels[*]} ${stubs[*]}"

install() {
    command -v python3 >/dev/null || die "python3 (with pip) is needed to download the wheels"
    command -v cc >/dev/null || die "a C compiler (cc) is needed for the link stubs"
    command -v g++ >/dev/null || die "g++ is needed: nvcc uses it as the host compiler"
    tmp=$(mktemp -d "$dest/tmp.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    printf '%s\n' "${wheels[@]}" >"$tmp/requirements.txt"
    say "downloading the CUDA $version wheels into $dest/wheels"
    python3 -m pip download --quiet --no-deps --only-binary=:all: --require-hashes \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64 \
        --python-version 3.12 --implementation py \
        -r "$tmp/requirements.txt" -d "$dest/wheels" >&2
    rm -rf "$cuda"
    mkdir -p "$tmp/unpacked" "$cuda"
    local w name
    for w in "${wheels[@]}"; do
        name=${w%%==*}
        name=${name//-/_}
        w=${w#*==}
        w=${w%% *}
        set -- "$dest/wheels/${name}-${w}-"*.whl
        [[ -f $1 ]] || die "no wheel for $name $w in $dest/wheels"
        python3 -m zipfile -e "$1" "$tmp/unpacked"
    done
    # every CUDA 13 wheel installs under nvidia/cu13/: together they are one CUDA root
    cp -a "$tmp/unpacked/nvidia/cu13/." "$cuda/"
    rm -rf "$cuda/.metadata"
    chmod +x "$cuda"/bin/* "$cuda"/nvvm/bin/*
    # the layout a system toolkit has: lib64/, targets/x86_64-linux/{include,lib}
    ln -sfn lib "$cuda/lib64"
    mkdir -p "$cuda/targets/x86_64-linux"
    ln -sfn ../../include "$cuda/targets/x86_64-linux/include"
    ln -sfn ../../lib "$cuda/targets/x86_64-linux/lib"
    # `-lcudart` (candle-kernels) links the static runtime: no libcudart.so at run time
    ln -sfn libcudart_static.a "$cuda/lib/libcudart.a"
    make_stubs "$tmp"
    "$cuda/bin/nvcc" --version >/dev/null || die "the unpacked nvcc does not run"
    printf '%s\n' "$stamp" >"$cuda/.complete"
    say "CUDA $version toolchain ready in $cuda"
}

# Where cargo keeps the cudarc sources that Cargo.lock names (fetched if missing).
cudarc_src() {
    local ver dir
    ver=$(awk '/^name = "cudarc"$/ { getline; gsub(/[^0-9.]/, ""); print; exit }' "$root/Cargo.lock")
    [[ -n $ver ]] || die "no cudarc in $root/Cargo.lock"
    local reg=${CARGO_HOME:-$HOME/.cargo}/registry/src
    dir=$(ls -d "$reg"/*/"cudarc-$ver" 2>/dev/null | head -n 1 || true)
    if [[ -z $dir ]]; then
        say "fetching the crate sources (cargo fetch) for cudarc $ver"
        cargo fetch --locked --manifest-path "$root/Cargo.toml" >&2
        dir=$(ls -d "$reg"/*/"cudarc-$ver" 2>/dev/null | head -n 1 || true)
    fi
    [[ -n $dir ]] || die "cudarc $ver sources not found under $reg"
    printf '%s\n' "$dir"
}

# One shared object per library with the real SONAME and an empty function for every symbol
# cudarc's linked bindings declare (`extern "C" { fn NAME(...` in src/<module>/sys/mod.rs).
make_stubs() {
    local tmp=$1 src entry module lib soname
    src=$(cudarc_src) || exit 1
    mkdir -p "$cuda/lib/stubs"
    for entry in "${stubs[@]}"; do
        read -r module lib soname <<<"$entry"
        grep -A1 'extern "C" {' "$src/src/$module/sys/mod.rs" |
            grep -oE '^[[:space:]]*(pub )?fn [A-Za-z_][A-Za-z0-9_]*' |
            awk '{ print "void " $NF "(void) {}" }' | sort -u >"$tmp/$lib.c"
        [[ -s $tmp/$lib.c ]] || die "no symbols found for $lib in $src/src/$module/sys/mod.rs"
        cc -shared -fPIC -O0 -Wl,-soname,"$soname" -o "$cuda/lib/stubs/lib$lib.so" "$tmp/$lib.c"
    done
}

# cudarc switched from linking the CUDA libraries to loading them when first used.
# candle-core 0.11.1 asks for cudarc's `dynamic-linking`, cudarc's build script refuses
# `dynamic-loading` next to it, and cargo features only add up, so the switch is made in a copy
# of the crate that cargo already downloaded (cargo's registry, the version Cargo.lock pins):
# every `cfg(feature = "dynamic-linking")` in its sources and build script is renamed to a
# feature nobody enables, and the `dynamic-linking` feature is made to enable
# `fallback-dynamic-loading`, which is cudarc's own loading mode (the one its default features
# select). No line of cudarc's code changes otherwise. `scripts/cuda-cargo` puts the copy in
# place of the registry's with `--config patch.crates-io.cudarc.path=...`.
cudarc_loading() {
    local src out n
    src=$(cudarc_src) || exit 1
    out=$dest/$(basename "$src")-loading
    if [[ -f $out/.complete ]] && [[ $(cat "$out/.complete") == "$src" ]]; then
        printf '%s\n' "$out"
        return
    fi
    rm -rf "$out" "$out.tmp"
    cp -a "$src" "$out.tmp"
    rm -f "$out.tmp/.cargo-checksum.json" "$out.tmp/.cargo-ok"
    n=$(grep -rl 'feature = "dynamic-linking"' "$out.tmp/src" "$out.tmp/build.rs" | wc -l)
    [[ $n -gt 0 ]] || die "cudarc in $src has no cfg(feature = \"dynamic-linking\"): the patch no longer applies"
    grep -rl 'feature = "dynamic-linking"' "$out.tmp/src" "$out.tmp/build.rs" |
        xargs sed -i 's/feature = "dynamic-linking"/feature = "dynamic-linking-replaced-by-pipe"/g'
    grep -q '^dynamic-linking = \[\]$' "$out.tmp/Cargo.toml" ||
        die "cudarc's Cargo.toml in $src has no plain 'dynamic-linking = []' feature: the patch no longer applies"
    sed -i 's/^dynamic-linking = \[\]$/dynamic-linking = ["fallback-dynamic-loading"]/' "$out.tmp/Cargo.toml"
    printf '%s\n' "$src" >"$out.tmp/.complete"
    mv "$out.tmp" "$out"
    say "cudarc switched to loading the CUDA libraries at run time in $out ($n files)"
    printf '%s\n' "$out"
}

# A system toolkit: its nvcc and headers; its static CUDA runtime, so that the binary needs no
# libcudart.so either (candle-kernels links `-lcudart`; the linker takes the first libcudart it
# finds on the search path, and link/ holds only the static one).
system_toolkit() {
    cuda=$(cd "$PIPE_CUDA_TOOLKIT" && pwd) || die "PIPE_CUDA_TOOLKIT=$PIPE_CUDA_TOOLKIT is not a folder"
    [[ -x $cuda/bin/nvcc ]] || die "no bin/nvcc in PIPE_CUDA_TOOLKIT=$cuda"
    local static
    static=$(ls "$cuda"/lib64/libcudart_static.a "$cuda"/lib/libcudart_static.a \
        "$cuda"/targets/*/lib/libcudart_static.a 2>/dev/null | head -n 1 || true)
    [[ -n $static ]] || die "no libcudart_static.a under $cuda"
    mkdir -p "$dest/link"
    ln -sfn "$static" "$dest/link/libcudart.a"
}

mkdir -p "$dest"
if [[ -n ${PIPE_CUDA_TOOLKIT:-} ]]; then
    system_toolkit
elif [[ ! -f $cuda/.complete ]] || [[ $(cat "$cuda/.complete") != "$stamp" ]]; then
    install
fi
loading=$(cudarc_loading)

q() { printf '%q' "$1"; }
if [[ -n ${PIPE_CUDA_TOOLKIT:-} ]]; then
    libs=$dest/link
    cudarc_version=  # cudarc's build script asks the toolkit's nvcc
else
    libs=$cuda/lib/stubs:$cuda/lib
    cudarc_version=13000
fi
cat <<EOF
export CUDA_ROOT=$(q "$cuda") CUDA_PATH=$(q "$cuda") CUDA_HOME=$(q "$cuda")
export PATH=$(q "$cuda/bin"):"\$PATH"
${cudarc_version:+export CUDARC_CUDA_VERSION=$cudarc_version}
export CUDA_COMPUTE_CAP=$(q "$cap")
export LIBRARY_PATH=$(q "$libs")"\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
export PIPE_CUDARC_LOADING=$(q "$loading")
EOF
say "CUDA toolkit $cuda, kernels for compute capability $cap; now: scripts/cuda-cargo build --release --features cuda"
