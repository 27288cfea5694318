#!/usr/bin/env bash
# The GPU checks of the CUDA build, run on a GPU machine from the bundle scripts/gpu-bundle.sh
# makes (gpu/: pipe.xz, cuda-tests.xz, cifar10-jpeg.tar.gz). Each mode fits in one 10-minute
# device command; results go to $OUT (the device tool brings that folder back), else ./gpu-out.
#
#   bash scripts/gpu-check.sh quick   # nvidia-smi, `pipe devices`, the CUDA-vs-CPU tests, and
#                                     # `pipe bench pretrain` of CF-AMC-SSL (16 crops, batch 100,
#                                     # m 3, width 64; again with PIPE_KERNELS=candle and with
#                                     # PIPE_CUDA_MATH=tf32) and of
#                                     # the PGD / no-attack modes; `pipe bench nn` at 1,600
#                                     # rows (the net, one layer's conv and BN)
#   bash scripts/gpu-check.sh epoch   # one CF-AMC-SSL epoch on the whole CIFAR-10 training set
#                                     # (width 64, 16 crops, batch 100, m 3): wall time, images/s
#   bash scripts/gpu-check.sh paper   # pipelines/cf_amc_ssl.yaml for as long as the command may
#                                     # run; the store (.pipe/, kept while the machine stays
#                                     # warm) and per-epoch checkpoints let a next call go on
#   bash scripts/gpu-check.sh defense # pipelines/defense_cpu.yaml on the GPU: the test-time
#                                     # defence end to end (and its table)
#
# PIPE_GPU_LIMIT (seconds, default 540) bounds the long steps. The CUDA libraries are looked up
# in PyTorch's wheels (site-packages/nvidia/cu13/lib), then in the usual system folders.

set -uo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bundle=$root/gpu
out=${OUT:-$root/gpu-out}
limit=${PIPE_GPU_LIMIT:-540}
mode=${1:-quick}
mkdir -p "$out"
log() { printf '[%s] %s\n' "$(date +%T)" "$*" | tee -a "$out/check.log" >&2; }

[[ -f $bundle/pipe.xz ]] || { log "no $bundle/pipe.xz: run scripts/gpu-bundle.sh and carry gpu/"; exit 1; }
(cd "$bundle" && sha256sum -c --quiet SHA256SUMS) || { log "gpu/ does not match its SHA256SUMS"; exit 1; }
bin=/tmp/pipe-gpu
mkdir -p "$bin"
for f in pipe cuda-tests; do
    [[ -x $bin/$f && $bin/$f.stamp -nt $bundle/$f.xz ]] && continue
    xz -dc "$bundle/$f.xz" >"$bin/$f" && chmod +x "$bin/$f" && touch "$bin/$f.stamp"
done
pipe=$bin/pipe

# the CUDA 13 libraries: PyTorch's wheels first
libs=$(python3 - 2>/dev/null <<'EOF'
import os
try:
    import nvidia
    for p in nvidia.__path__:
        d = os.path.join(p, "cu13", "lib")
        if os.path.isdir(d):
            print(d)
            break
except ImportError:
    pass
EOF
)
[[ -n $libs ]] && export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
log "mode $mode; LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
export PIPE_DATA=$bundle/cifar10-jpeg.tar.gz
export PIPE_STORE=${PIPE_STORE:-$root/.pipe/store}

run() { # name, command...: stdout+stderr to $out/name.txt, exit code logged
    local name=$1
    shift
    local t0=$SECONDS
    "$@" >"$out/$name.txt" 2>&1
    local rc=$?
    log "$name: exit $rc after $((SECONDS - t0)) s"
    return $rc
}

case $mode in
quick)
    run nvidia-smi nvidia-smi
    run devices "$pipe" devices
    "$pipe" devices --json >"$out/devices.json" 2>/dev/null
    run cuda-tests "$bin/cuda-tests" cuda_vs_cpu --nocapture --test-threads 1
    run bench-cf-amc-ssl timeout "$limit" "$pipe" bench pretrain --device cuda:0 --widths 64 \
        --batch 100 --views 16 --m 3 --methods emp_ssl --attacks free --steps 5 --json
    # TF32 tensor cores for the f32 matmuls and convolutions (PIPE_CUDA_MATH=tf32)
    run bench-cf-amc-ssl-tf32 env PIPE_CUDA_MATH=tf32 timeout "$limit" "$pipe" bench pretrain \
        --device cuda:0 --widths 64 --batch 100 --views 16 --m 3 --methods emp_ssl \
        --attacks free --steps 3 --json
    # where a step's time goes: the whole net and one layer's conv and BN + ReLU at 1,600 rows
    # (a CF-AMC-SSL batch), in f32 and in TF32
    run bench-nn timeout "$limit" "$pipe" bench nn --device cuda:0 --widths 64 --batch 1600 \
        --reps 3 --json
    run bench-nn-tf32 env PIPE_CUDA_MATH=tf32 timeout "$limit" "$pipe" bench nn --device cuda:0 \
        --widths 64 --batch 1600 --reps 3 --json
    # the same with candle's own batch norm and conv backward: what the fused CUDA batch norm
    # (stages/cuda/batch_norm.cu) gains per layer
    run bench-nn-candle env PIPE_KERNELS=candle timeout "$limit" "$pipe" bench nn \
        --device cuda:0 --widths 64 --batch 1600 --reps 3 --json
    run bench-all timeout "$limit" "$pipe" bench pretrain --device cuda:0 --widths 64 \
        --batch 100 --views 16 --m 3 --steps 3 --json
    run bench-defense timeout "$limit" "$pipe" bench defense --device cuda:0 --batch 512 --json
    # the same with candle's own conv backward (its naive CUDA `conv_transpose2d`) and batch
    # norm, to measure what conv2d_composed and the fused batch norm gain together
    run bench-cf-amc-ssl-candle-conv env PIPE_KERNELS=candle timeout "$limit" "$pipe" bench \
        pretrain --device cuda:0 --widths 64 --batch 100 --views 16 --m 3 --methods emp_ssl \
        --attacks free --steps 3 --json
    ;;
epoch)
    cat >"$out/one_epoch.yaml" <<'EOF'
# One CF-AMC-SSL epoch at the paper's scale: the whole CIFAR-10 training set, ResNet-18 width
# 64, 16 crops, batch 100, m = 3 (pipelines/cf_amc_ssl.yaml's cf_amc_ssl row, 1 epoch).
name: cf_amc_ssl_one_epoch
stages:
  data:
    kind: dataset
    params: {source: auto, root: "${PIPE_DATA}"}
  pretrain:
    kind: pretrain
    inputs: {dataset: data}
    params: {method: emp_ssl, attack: free, views: crop, n_views: 16, epochs: 1, batch_size: 100,
             m: 3, width: 64, eps: 8/255, alpha: 0.01, seed: 0, device: "cuda:0"}
EOF
    run epoch timeout "$limit" "$pipe" run "$out/one_epoch.yaml" --no-progress -v --json
    "$pipe" show "$out/one_epoch.yaml" pretrain >"$out/epoch-show.txt" 2>&1
    ;;
paper)
    run paper timeout "$limit" "$pipe" run "$root/pipelines/cf_amc_ssl.yaml" --no-progress -v
    "$pipe" plan "$root/pipelines/cf_amc_ssl.yaml" >"$out/paper-plan.txt" 2>&1
    ;;
defense)
    # the test-time defence end to end on the GPU (ACL at CPU scale, its SLF classifier, the SSL
    # head, PGD-20, R-MAO's reversal, the defence-aware attack, the noise baseline)
    run defense env PIPE_AUTO_DEVICE=cuda timeout "$limit" "$pipe" run \
        "$root/pipelines/defense_cpu.yaml" --no-progress -v
    PIPE_AUTO_DEVICE=cuda "$pipe" show "$root/pipelines/defense_cpu.yaml" table \
        >"$out/defense-table.txt" 2>&1
    ;;
*)
    log "unknown mode $mode (quick, epoch, paper or defense)"
    exit 2
    ;;
esac
exit 0
