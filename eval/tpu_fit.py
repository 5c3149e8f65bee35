"""Which TPU slices fit full-size E-DiT training? Compiles the real train step for each case below
on this CPU host (libtpu; `edit-jax train --compile-only`), one at a time (one process may hold
libtpu), and writes one JSON line per case plus a Markdown table for BENCHMARKS.md.

    JAX_PLATFORMS=cpu python -m edit_jax.eval.tpu_fit --out tpu_fit.jsonl [--only flux]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from edit_jax.eval.report import run_script

# 1024 x 1024 images: 64 x 64 packed tokens; FLUX reads 512 T5 tokens, Qwen-Image about 256;
# Hunyuan3D-2: 3072 shape latent tokens, 1370 DINOv2 tokens (a 518-pixel view: 37 x 37 patches and CLS)
SIZES = {"flux-dev": ["height=64", "width=64", "num_txt=512"], "qwen-image": ["height=64", "width=64", "num_txt=256"],
         "hunyuan3d-2": ["height=1", "width=3072", "num_txt=1370"]}
COMMON = ["remat=full", "param_dtype=bfloat16", "dtype=bfloat16", "router_dtype=float32"]
CASES = [  # (model, trainable, topology, global batch)
    ("flux-dev", "routers", "v5e:4x4", 16),
    ("flux-dev", "routers", "v5e:2x4", 8),
    ("flux-dev", "routers", "v6e:2x2", 4),
    ("flux-dev", "routers", "v5p:2x2x1", 4),
    ("flux-dev", "routers+base", "v5e:4x4", 16),
    ("flux-dev", "routers+base", "v5p:2x2x2", 8),
    ("qwen-image", "routers", "v5e:4x4", 16),
    ("qwen-image", "routers", "v5e:2x4", 8),
    ("qwen-image", "routers+base", "v5p:2x2x2", 8),
    ("hunyuan3d-2", "routers", "v5e:4x4", 16),
    ("hunyuan3d-2", "routers", "v5e:2x4", 8),
]


def run_case(model: str, trainable: str, topology: str, batch: int) -> dict:
    """`edit-jax train --compile-only` of one case in a process of its own; its report.

    Args:
      model: a preset ("flux-dev", "qwen-image", "hunyuan3d-2"). trainable: "routers" or "routers+base". topology: the
        TPU slice. batch: the global batch.
    """
    args = [sys.executable, "-m", "edit_jax.cli", "train", f"preset={model}", f"trainable={trainable}",
            f"batch_size={batch}", *SIZES[model], *COMMON, "--compile-only", "--topology", topology]
    done = subprocess.run(args, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True)
    try:
        return json.loads(done.stdout[done.stdout.index("{"): done.stdout.rindex("}") + 1])
    except ValueError:
        return {"model": model, "trainable": trainable, "topology": topology, "global_batch": batch, "fits": None,
                "error": done.stderr.strip().splitlines()[-1][:300] if done.stderr.strip() else f"exit {done.returncode}"}


def table(rows: list[dict]) -> str:
    lines = ["| model | trains | slice (chips) | global batch | per chip: args + temps = total (GiB) | HBM | fits | compile |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        memory = (f"{r['arguments_gib']} + {r['temporaries_gib']} = {r['per_chip_gib']}" if "per_chip_gib" in r
                  else r.get("error", "")[:80])
        lines.append(f"| {r.get('case_model', r.get('model'))} | {r.get('trainable')} | {r.get('topology')} "
                     f"({r.get('chips', '?')}) | {r.get('global_batch')} | {memory} | {r.get('hbm_gib', '?')} | "
                     f"{r.get('fits')} | {r.get('compile_s', '?')} s |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="tpu_fit.jsonl")
    p.add_argument("--only", help="run the cases of this model only (flux-dev, qwen-image, hunyuan3d-2)")
    args = p.parse_args(argv)
    rows = []
    for model, trainable, topology, batch in CASES:
        if args.only and args.only != model:
            continue
        row = {**run_case(model, trainable, topology, batch), "case_model": model}
        rows.append(row)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    print(table(rows))
    Path(args.out).with_suffix(".md").write_text(table(rows) + "\n")


if __name__ == "__main__":
    run_script(main)
