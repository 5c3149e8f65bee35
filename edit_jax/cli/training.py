"""`edit-jax train`: router training, one or several processes, or compile-only for a TPU slice."""

from __future__ import annotations

import json
from pathlib import Path

from edit_jax.cli.common import at_least
from edit_jax.train.compile_only import compile_only
from edit_jax.train.config import load_train_config
from edit_jax.train.distributed import initialize
from edit_jax.train.loop import train


def cmd_train(args) -> int:
    path, overrides = args.config, list(args.overrides)
    if path is not None and "=" in path and not Path(path).exists():  # no file given: only overrides
        path, overrides = None, [path] + overrides
    if args.topology and not args.compile_only:
        raise ValueError(f"--topology {args.topology} only acts with --compile-only (a run trains on the devices this "
                         "host has): add --compile-only, or leave --topology out")
    config = load_train_config(path, overrides)
    if args.compile_only:
        if not args.topology:
            raise ValueError("--compile-only needs --topology (e.g. v5e:4x4 or v5litepod-16, v5p:2x2x2 or v5p-16, "
                             "v6e:2x4 or v6e-8)")
        return 0 if compile_only(config, args.topology)["fits"] is not False else 1
    initialize(args.coordinator, args.num_processes, args.process_id, auto=args.distributed)
    metrics = train(config, progress=not args.quiet, max_steps=args.max_steps)
    print(json.dumps({k: float(v) for k, v in metrics.items() if getattr(v, "ndim", 1) == 0}, indent=2))
    return 0


def add_train(command) -> None:
    trn = command("train", "train E-DiT routers (and optionally the base) on a device mesh",
                  "fields and defaults: train/config.py (TrainConfig); e.g. edit-jax train run.yaml steps=100 mesh.fsdp=8")
    trn.add_argument("config", nargs="?", help="YAML or JSON file of TrainConfig fields (default: all defaults)")
    trn.add_argument("overrides", nargs="*", help="key=value field overrides, mesh.AXIS=N for one mesh axis")
    trn.add_argument("--quiet", action="store_true", help="no progress bar")
    trn.add_argument("--max-steps", type=at_least(1),
                     help="stop after this many steps of this call, with a checkpoint saved there (a job with a "
                          "wall-clock limit; rerunning the same command continues the run)")
    trn.add_argument("--compile-only", action="store_true",
                     help="compile the real step for --topology on this host (libtpu) and report per-chip memory")
    trn.add_argument("--topology", help="TPU slice for --compile-only: libtpu's name (v5e:4x4, v5p:2x2x2, v6e:2x4) or "
                                        "the cloud's (v5litepod-16, v5p-16, v6e-8)")
    trn.add_argument("--distributed", action="store_true",
                     help="join a multi-process run JAX detects itself (TPU pod slices, SLURM, Open MPI, Kubernetes)")
    trn.add_argument("--coordinator", help="HOST:PORT of process 0, for processes started by hand (or EDIT_JAX_COORDINATOR)")
    trn.add_argument("--num-processes", type=at_least(1), help="processes in the run (or EDIT_JAX_NUM_PROCESSES)")
    trn.add_argument("--process-id", type=at_least(0), help="this process's id, 0-based (or EDIT_JAX_PROCESS_ID)")
    trn.set_defaults(run=cmd_train)
