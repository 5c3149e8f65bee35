"""Peak memory of a streaming conversion, on a synthetic Qwen-Image checkpoint with real tensor
sizes (D 3072, M 12288, bfloat16) and a few layers (a few GB).

    python -m edit_jax.eval.convert_memory --layers 4 --workdir /tmp/convmem

Writes the source once (a separate process), then converts it in a fresh process and reports
that process's peak RSS beside the largest stacked tensor and the baseline RSS of an idle
process that imported the same libraries. The project's modules are imported inside the measured
functions, so that each process loads only what its part needs.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from edit_jax.eval.report import run_script


def write_source(folder: Path, layers: int) -> None:
    import ml_dtypes
    import numpy as np
    from safetensors.numpy import save_file

    from edit_jax.checkpoints_convert.qwen_image import diffusers_table
    from edit_jax.config import preset
    from edit_jax.checkpoint import flatten
    from edit_jax.models.registry import abstract_params

    config = preset("qwen-image").replace(num_layers=layers)
    folder.mkdir(parents=True, exist_ok=True)
    table, targets = diffusers_table(config), flatten(abstract_params(config))
    rng = np.random.default_rng(0)
    tensors = {}
    for path, src in table.items():
        shape = targets[path].shape[1:] if src.stacked else targets[path].shape
        shape = shape[::-1] if path.endswith("kernel") else shape  # torch Linear weight [out, in]
        for key in src.keys(layers if src.stacked else None):
            tensors[key] = rng.standard_normal(shape, dtype=np.float32).astype(ml_dtypes.bfloat16)
    save_file(tensors, folder / "diffusion_pytorch_model.safetensors")
    raw = {"_class_name": "QwenImageTransformer2DModel", **config.architecture()}
    for k in ("mlp_ratio", "activation"):
        raw.pop(k)
    (folder / "config.json").write_text(json.dumps(raw))


def convert(src: Path, dst: Path) -> dict:
    import numpy as np

    from edit_jax.checkpoints_convert import convert_checkpoint
    from edit_jax.checkpoint import flatten
    from edit_jax.config import from_diffusers_config
    from edit_jax.models.registry import abstract_params

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    config = from_diffusers_config(src).with_runtime(param_dtype="bfloat16")
    largest = max(int(np.prod(a.shape)) * 2 for a in flatten(abstract_params(config)).values()) / 2**30
    t0 = time.perf_counter()
    convert_checkpoint("qwen-image", src, dst, dtype="bfloat16", overwrite=True, progress=False)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    source_gb = sum(f.stat().st_size for f in src.glob("*.safetensors")) / 2**30
    return {
        "source_gib": round(source_gb, 2),
        "largest_stacked_tensor_gib": round(largest, 3),
        "rss_after_imports_gib": round(baseline, 3),
        "peak_rss_gib": round(peak, 3),
        "peak_minus_imports_over_largest": round((peak - baseline) / largest, 2),
        "seconds": round(seconds, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--workdir", default="/tmp/edit-jax-convmem")
    p.add_argument("--step", choices=["all", "write", "convert"], default="all")
    args = p.parse_args()
    work = Path(args.workdir)
    if args.step == "write":
        write_source(work / "src", args.layers)
    elif args.step == "convert":
        print(json.dumps(convert(work / "src", work / "ckpt")))
    else:
        run = [sys.executable, "-m", "edit_jax.eval.convert_memory", "--layers", str(args.layers), "--workdir", str(work)]
        subprocess.run(run + ["--step", "write"], check=True)
        out = subprocess.run(run + ["--step", "convert"], check=True, capture_output=True, text=True).stdout
        result = {"layers": args.layers, **json.loads(out.strip().splitlines()[-1])}
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    run_script(main)
