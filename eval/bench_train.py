"""Router training step time and per-device memory: the same run on one device and sharded over
simulated devices (each a fresh process: the device count is fixed when JAX starts); with
--on-devices, one run on this machine's own devices (a GPU: stage `train` of eval/gpu_suite.sh).

    python -m edit_jax.eval.bench_train --preset flux-small --steps 30 --out bench_train.json
    python -m edit_jax.eval.bench_train --on-devices --preset flux-dev --height 64 --width 64 --txt 512 --batch 2 \
        --steps 8 --skip 3 --set remat=full attention=cudnn

Step times are the median over the steps after the first few (compile excluded); the memory is
the compiled step's per-device arguments and temporaries as the trainer prints them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from edit_jax.eval.report import emit, environment, run_script

MEMORY = re.compile(r"per device: arguments ([\d.]+) MiB, temporaries ([\d.]+) MiB")
DTYPES_LINE = re.compile(r"dtypes: (.*)")


def run(devices: int | None, mesh: dict, args) -> dict:
    """One training run in a fresh process: on `devices` simulated CPU devices, or on the machine's
    own (None). It stops after args.steps (--max-steps), before the trained checkpoint is written."""
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"run_dir={tmp}/run", f"preset={args.preset}", f"steps={args.steps + 1}", f"batch_size={args.batch}",
                     f"height={args.height}", f"width={args.width}", f"num_txt={args.txt}", "log_every=1",
                     f"save_every={args.steps + 1}", *[f"mesh.{k}={v}" for k, v in mesh.items()], *args.set]
        env = dict(os.environ)
        if devices is not None:
            flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
            env.update(XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
        done = subprocess.run([sys.executable, "-m", "edit_jax.cli", "train", *overrides, "--max-steps", str(args.steps),
                               "--quiet"], env=env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(done.stderr[-3000:])
        rows = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_time_s"] for r in rows[args.skip:]]
    memory = MEMORY.search(done.stderr)
    dtypes = DTYPES_LINE.search(done.stderr)
    return {"devices": devices or "this machine's", "mesh": mesh, "dtypes": dtypes[1] if dtypes else None,
            "median_step_ms": round(1000 * float(np.median(times)), 2),
            "model_tflops_per_s": round(float(np.median([r["model_tflops_per_s"] for r in rows[args.skip:]])), 4),
            "arguments_mib": float(memory[1]) if memory else None, "temporaries_mib": float(memory[2]) if memory else None,
            "final_loss": rows[-1]["loss"]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="flux-small")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--skip", type=int, default=5, help="first steps left out of the median")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--height", type=int, default=16, help="packed tokens")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--txt", type=int, default=32)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more TrainConfig fields for every run")
    p.add_argument("--on-devices", action="store_true",
                   help="one run on this machine's devices (all on fsdp) instead of the CPU comparison")
    p.add_argument("--out")
    args = p.parse_args(argv)
    if args.on_devices:
        result = {**environment(), "preset": args.preset, "batch": args.batch,
                  "tokens": [args.height * args.width, args.txt], "settings": args.set, "run": run(None, {}, args)}
        return emit(result, args.out)
    one = run(1, {"data": 1, "fsdp": 1}, args)
    sharded = run(8, {"data": 2, "fsdp": 4}, args)
    result = {**environment(), "preset": args.preset, "batch": args.batch, "tokens": [args.height * args.width, args.txt],
              "one_device": one, "sharded": sharded,
              "step_time_ratio_sharded_over_one": round(sharded["median_step_ms"] / one["median_step_ms"], 3),
              "temporaries_ratio_sharded_over_one": round(sharded["temporaries_mib"] / one["temporaries_mib"], 3)}
    return emit(result, args.out)


if __name__ == "__main__":
    run_script(main)
