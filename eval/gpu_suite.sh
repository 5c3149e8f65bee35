#!/usr/bin/env bash
# The full-size GPU checks in one run (for a session lent the device machine): FLUX.1-dev and
# Qwen-Image at 1024^2 in bfloat16 with cuDNN attention. Each benchmark writes JSON and a log into
# $OUT (default ./gpu_results); the diffusers baseline of bench_forward needs diffusers importable
# (carry it as a wheel). Usage: bash eval/gpu_suite.sh [seconds per benchmark, default 170]
set -u
out=${OUT:-gpu_results}
limit=${1:-170}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import jax; print('jax', jax.__version__, jax.devices())"

bench() {
    local name=$1
    shift
    echo "== $name"
    timeout "$limit" python -m "$@" --out "$out/$name.json" >"$out/$name.log" 2>&1
    echo "exit $?"
    tail -n 4 "$out/$name.log"
}

full="--height 64 --width 64 --dtype bfloat16 --attention cudnn --runs 10"
bench elastic_flux_dev eval.bench_elastic --preset flux-dev --txt 512 $full
bench forward_flux_dev eval.bench_forward --preset flux-dev --txt 512 $full
bench elastic_qwen_image eval.bench_elastic --preset qwen-image --txt 256 $full
