"""The built-in demo: a randomly initialised model (no downloads) runs a jitted forward, is saved
as an edit-jax checkpoint, reloaded, and run again; the two outputs must agree exactly.

Writes OUT/checkpoint and OUT/demo.json. Until the sampler lands this is the project's main job.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import numpy as np

import edit_jax
from edit_jax.checkpoint import save
from edit_jax.models import example_inputs, jit_forward


def run_demo(preset_name: str, out: Path, seed: int = 0) -> dict:
    config = edit_jax.preset(preset_name)
    model = edit_jax.build_model(config)
    params = edit_jax.init_params(config, seed=seed)
    forward, inputs = jit_forward(model, example_inputs(config, batch=1, height=8, width=8, num_txt=16, seed=seed))

    t0 = time.perf_counter()
    before = jax.block_until_ready(forward(params, inputs))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(forward(params, inputs))
        times.append(time.perf_counter() - t0)

    out.mkdir(parents=True, exist_ok=True)
    ckpt = save(out / "checkpoint", config, params, overwrite=True)
    loaded_model, loaded = edit_jax.load(ckpt)
    after = jit_forward(loaded_model, example_inputs(config, 1, 8, 8, 16, seed))[0](loaded, inputs)

    summary = {
        "preset": preset_name,
        "family": config.family,
        "param_count": int(sum(np.prod(x.shape) for x in jax.tree.leaves(params))),
        "output_shape": list(before.shape),
        "output_std": float(np.std(before)),
        "compile_and_first_call_s": round(compile_s, 3),
        "forward_median_ms": round(1000 * float(np.median(times)), 3),
        "checkpoint": str(ckpt),
        "reloaded_output_identical": bool(np.array_equal(np.asarray(before), np.asarray(after))),
        "backend": jax.default_backend(),
    }
    (out / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not summary["reloaded_output_identical"]:
        raise RuntimeError("the reloaded checkpoint gives a different output")
    return summary
