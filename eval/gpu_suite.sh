#!/usr/bin/env bash
# The full-size GPU checks in one run (for a session lent the device machine): FLUX.1-dev and
# Qwen-Image at 1024^2 (64x64 latent tokens) in bfloat16 with cuDNN attention, E-DiT patterns
# against the dense forward, then our dense forwards against diffusers' (eager and torch.compile'd:
# each at batch 1 and at batch 2 as true CFG runs it). A tiny Qwen-Image
# run first checks the installed JAX/Flax and the cuDNN path in seconds; if it fails and a Flax
# wheel was carried in .whl_flax/, that Flax is used instead. Wheels in .whl/ (diffusers and what
# it needs; for the tokamax stage tokamax, einshape, qwix, immutabledict, typeguard==2.13.3 and
# jaxtyping; `bash eval/gpu_wheels.sh` fetches them all) are installed first. Everything is logged to $OUT/suite.log; each benchmark's JSON is
# appended, as it ends, to $OUT/results.jsonl ({"name", "result"} a line). The benchmarks share one
# time budget so that the suite ends before its caller's limit.
# Usage: [STAGES="elastic profile flags forward"] bash eval/gpu_suite.sh [total seconds, default 520]
#
# Dry run on a CPU machine (tiny presets, same code paths but cuDNN): GPU_SUITE_DRY=1 bash eval/gpu_suite.sh
set -u
out=${OUT:-$(mktemp -d -t gpu_suite.XXXXXX)}  # never inside the repository
budget=${1:-520}
mkdir -p "$out"
echo "results in $out"
exec > >(tee -a "$out/suite.log") 2>&1
export PYTHONUNBUFFERED=1
# edit_jax as pip installs it, without installing (the device machine has no network): its package
# tree of links to this checkout's files, with train/, eval/, pipelines/ and checkpoints_convert/
# linked in as its subpackages (pyproject.toml's package-dir)
shadow=$(mktemp -d -t edit_jax_src.XXXXXX)
trap 'rm -rf "$shadow"' EXIT
cp -rs "$PWD/edit_jax" "$shadow/edit_jax"
for package in train eval pipelines checkpoints_convert; do ln -s "$PWD/$package" "$shadow/edit_jax/$package"; done
export PYTHONPATH=$shadow${PYTHONPATH:+:$PYTHONPATH}

install_wheels() {  # folder target
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$2" "$1"/*.whl \
        && export PYTHONPATH=$2:$PYTHONPATH
}
if ls .whl/*.whl >/dev/null 2>&1; then install_wheels .whl /tmp/site || echo "wheels in .whl did not install"; fi

if [ -n "${GPU_SUITE_DRY:-}" ]; then
    size="--height 4 --width 4 --dtype bfloat16" runs="--runs 2" pixels="--height 32 --width 32 --dtype bfloat16" steps=2
    train_size="--height 4 --width 4 --batch 2 --steps 4 --skip 1"
    flux_name=flux_tiny qwen_name=qwen_image_tiny
    flux="flux-tiny --txt 8" qwen="qwen-image-tiny --txt 8" attention=xla compile=""  # torch.compile: a minute on CPU
else
    size="--height 64 --width 64 --dtype bfloat16" runs="--runs 10" pixels="--height 1024 --width 1024 --dtype bfloat16" steps=28
    train_size="--height 64 --width 64 --batch 2 --steps 8 --skip 3"
    flux_name=flux_dev qwen_name=qwen_image
    flux="flux-dev --txt 512" qwen="qwen-image --txt 256" attention=cudnn compile="--compile regional"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
fi
python3 - <<'EOF'
import importlib.metadata as m, platform, jax
print("python", platform.python_version(), "| devices", jax.devices())
for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "torch", "diffusers", "tokamax"):
    try:
        print(f"  {name} {m.version(name)}")
    except m.PackageNotFoundError:
        print(f"  {name} not installed")
EOF

left() { echo $((budget - SECONDS)); }
bench() {  # name seconds module args...
    local name=$1 limit=$2
    shift 2
    [ "$(left)" -lt "$limit" ] && limit=$(left)
    if [ "$limit" -lt 30 ]; then echo "== $name: not run, $(left) s left of the budget"; return 1; fi
    echo "== $name (at most $limit s; $SECONDS s into the suite)"
    timeout "$limit" python3 -m "$@" --out "$out/$name.json"
    local rc=$?
    if [ -f "$out/$name.json" ]; then  # one file for all stages: the device tool brings back 8 files at most
        { printf '{"name": "%s", "result": ' "$name"; tr -d '\n' <"$out/$name.json"; echo '}'; } >>"$out/results.jsonl"
        rm "$out/$name.json"
    fi
    echo "== $name: exit $rc after $SECONDS s"
    return "$rc"
}

check="edit_jax.eval.bench_elastic --preset qwen-image-tiny --txt 8 --height 4 --width 4 --dtype bfloat16 --attention $attention --runs 2"
if ! bench check_tiny 90 $check; then
    if ls .whl_flax/*.whl >/dev/null 2>&1; then
        install_wheels .whl_flax /tmp/flax_site && python3 -c "import flax; print('now flax', flax.__version__)"
        bench check_tiny_carried_flax 90 $check || exit 1
    else
        exit 1
    fi
fi

# STAGES picks and orders what runs after the check (default: all, in this order)
for stage in ${STAGES:-elastic profile flags forward}; do
    case $stage in
    elastic)
        XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 bench elastic_$flux_name 170 edit_jax.eval.bench_elastic --preset $flux $size --attention $attention $runs
        XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 bench elastic_$qwen_name 190 edit_jax.eval.bench_elastic --preset $qwen $size --attention $attention $runs --no-ideal ;;
    profile)  # where a step's device time goes, by scope (router, block, the rest); command buffers off to see each op.
        # Each compiled program comes back too (hlo_NAME.txt.gz), to trace an op in the profile to its source offline
        for run in "$flux_name dense" "$qwen_name dense" "$flux_name infer"; do
            set -- $run
            [ "$1" = "$flux_name" ] && model=$flux || model=$qwen
            XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 bench profile_$1_$2 120 edit_jax.eval.profile_step --preset $model $size \
                --attention $attention --mode $2 --top 60 --hlo-out "$out/hlo_$1_$2.txt.gz"
        done ;;
    cfg)  # Qwen-Image as it samples, with true CFG: batch 2 (not in the default stages)
        XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 bench elastic_${qwen_name}_batch2 190 edit_jax.eval.bench_elastic --preset $qwen $size --attention $attention $runs --batch 2 --no-ideal ;;
    compile)  # trace, lower and compile times at full size without weights (not in the default stages)
        bench compile_$flux_name 150 edit_jax.eval.bench_compile --preset $flux $size --attention $attention
        bench compile_$qwen_name 150 edit_jax.eval.bench_compile --preset $qwen $size --attention $attention ;;
    sample)  # whole 28-step sampling runs: dense, the forced pattern, the cache (not in the default stages)
        XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 bench sample_$flux_name 240 edit_jax.eval.bench_sample --preset $flux $pixels --attention $attention --steps $steps ;;
    forward|forward-flux|forward-qwen)  # against diffusers eager and torch.compile'd (block by block, as diffusers
        # recommends: the whole model's compile takes minutes); torch shares the GPU, so JAX allocates as it goes
        [ "$stage" != forward-qwen ] && XLA_PYTHON_CLIENT_PREALLOCATE=false \
            bench forward_$flux_name 360 edit_jax.eval.bench_forward --preset $flux $size --attention $attention $runs $compile --batch 1 2
        [ "$stage" != forward-flux ] && XLA_PYTHON_CLIENT_PREALLOCATE=false \
            bench forward_$qwen_name 360 edit_jax.eval.bench_forward --preset $qwen $size --attention $attention $runs $compile --batch 1 2 ;;
    tokamax)  # tokamax's attention (on Hopper: Pallas Mosaic flash attention) beside the cuDNN runs of `elastic`
        # (not in the default stages; carry tokamax and its pure-Python dependencies in .whl/)
        XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 bench elastic_${flux_name}_tokamax 170 edit_jax.eval.bench_elastic --preset $flux $size --attention tokamax $runs --no-ideal ;;
    flags)  # the per-block conditionals (and the loops) inside command buffers (CUDA graphs), so that a block's
        # switch needs no round trip to the host: whole sampling runs, the routers' cost included. (jax 0.11's
        # default buffers hold fusions, GEMMs and cuDNN calls; --xla_gpu_enable_dynamic_slice_fusion=true was
        # measured on 2026-11-30 and changed nothing.)
        [ -n "${GPU_SUITE_DRY:-}" ] && continue
        XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,WHILE" XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 \
            bench sample_${flux_name}_conditional_command_buffers 240 edit_jax.eval.bench_sample --preset $flux $pixels --attention $attention --steps $steps
        # GEMMs through Triton, so that XLA may fuse the elementwise work around them (the AdaLN modulation,
        # activations, gates) into them, as torch.compile does: our dense forward alone (the `ours` stage's beside it)
        XLA_FLAGS="--xla_gpu_triton_gemm_any=true" XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 \
            bench forward_${flux_name}_ours_triton_gemm_any 90 edit_jax.eval.bench_forward --preset $flux $size --attention $attention $runs --no-torch ;;
    kernels)  # candidate rewrites timed apart, at FLUX.1-dev's single-block shapes: the q/k RMSNorm and RoPE as one
        # pass; the router's token mean as a sum fused with its ReLU
        tiny=${GPU_SUITE_DRY:+--tokens 64 --layers 2}
        bench qk_norm_rope 60 edit_jax.eval.bench_qk_norm_rope $tiny ${GPU_SUITE_DRY:+--heads 2}
        bench router_pool 60 edit_jax.eval.bench_router_pool $tiny ${GPU_SUITE_DRY:+--dim 64 --hidden 16} ;;
    hunyuan3d)  # Hunyuan3D-2's shape DiT (3072 latents, 1370 image tokens): dense against the forced pattern (the paper's
        # 1.94x on Hunyuan3D-3.0), and its volume decode at octree resolution 256 and 384 (not in the default stages)
        if [ -n "${GPU_SUITE_DRY:-}" ]; then h3="hunyuan3d-tiny --height 1 --width 12 --txt 5 --dtype float32"; vol="--resolutions 8 --measure 8 --set width=32 --set heads=2 --set num_decoder_layers=1"
        else h3="hunyuan3d-2 --height 1 --width 3072 --txt 1370 --dtype bfloat16"; vol="--resolutions 256,384 --measure 256,384"; fi
        XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 bench elastic_hunyuan3d 170 edit_jax.eval.bench_elastic --preset $h3 --attention $attention $runs
        bench volume_hunyuan3d 200 edit_jax.eval.bench_volume $vol ;;
    train)  # router training on the GPU, never run on one before (not in the default stages): FLUX.1-dev with random
        # weights, the base bfloat16 (auto), full remat, the attention kernel's backward pass; step time and memory
        XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 bench train_$flux_name 300 edit_jax.eval.bench_train --on-devices --preset $flux \
            $train_size --set remat=full attention=$attention ;;
    ours)  # our dense forwards alone, no diffusers (a minute each: no weight conversion)
        XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 bench forward_${flux_name}_ours 90 edit_jax.eval.bench_forward --preset $flux $size --attention $attention $runs --no-torch
        XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 bench forward_${qwen_name}_ours 90 edit_jax.eval.bench_forward --preset $qwen $size --attention $attention $runs --no-torch ;;
    *) echo "unknown stage $stage (elastic, profile, flags, ours, kernels, forward, forward-flux, forward-qwen, cfg, sample, compile, tokamax, train, hunyuan3d)"; exit 2 ;;
    esac
done
echo "suite done in $SECONDS s"
