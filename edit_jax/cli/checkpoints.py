"""`edit-jax convert`, `export`, `inspect` and `order-channels`: checkpoints in and out."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from edit_jax import load
from edit_jax.checkpoint import (ROUTERS_DIR, CheckpointError, check_destination, flatten, load_config,
                                 missing_array_files, params_metadata, read_metadata, resolve, save, tree_names,
                                 verify_arrays)
from edit_jax.checkpoints_convert import convert_checkpoint
from edit_jax.checkpoints_convert.export import export_checkpoint
from edit_jax.cli.common import at_least
from edit_jax.config import DTYPES, PRESETS, ConfigError, from_diffusers_config, preset
from edit_jax.elastic.channel_order import order_mlp_channels
from edit_jax.models.registry import example_inputs
from edit_jax.sampling.embeddings import read_arrays
from edit_jax.train.calibration import dataset_calibration
from edit_jax.train.run_dir import run_status


def resolve_config(value: str | None, family: str):
    """--config: a preset name or a path to a diffusers config.json (or its folder)."""
    if value is None:
        return None
    if value in PRESETS:
        config = preset(value)
        if config.family != family:
            raise ConfigError(f"preset {value!r} is a {config.family} config, not {family}")
        return config
    if Path(value).exists():
        return from_diffusers_config(value, family)
    raise ConfigError(f"--config {value!r} is neither a preset ({', '.join(PRESETS)}) nor an existing path")


def cmd_convert(args) -> int:
    path = convert_checkpoint(
        args.family,
        args.src,
        args.dst,
        fmt=args.format,
        dtype=args.dtype,
        config=resolve_config(args.config, args.family),
        width_groups=args.width_groups,
        overwrite=args.overwrite,
    )
    print(f"wrote {path}")
    return 0


def cmd_export(args) -> int:
    path = export_checkpoint(args.ckpt, args.out, args.format, dtype=args.dtype, overwrite=args.overwrite,
                             shard_bytes=int(args.shard_gb * 2**30), allow_activation_change=args.allow_activation_change)
    print(f"wrote {path}")
    return 0


def describe_run(args) -> bool:
    """Prints where a training run stands when `args.ckpt` is a run's folder; whether it was one."""

    status = run_status(resolve(args.ckpt))
    if status is None:
        return False
    if args.json:
        print(json.dumps(status, indent=2))
        return True
    last = status["last_metrics"]
    saved = status["saved_steps"]
    print(f"{status['run_dir']}: a training run ({status['trainable']} from {status['checkpoint'] or 'a preset'}, "
          f"data {status['data']})")
    print(f"  saved at step {saved[-1] if saved else 0} of {status['steps']}"
          + (f" (checkpoints: {', '.join(map(str, saved))})" if saved else ""))
    if last:
        print("  last logged: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in last.items())
              + (f" (at {status['last_logged_at']})" if status["last_logged_at"] else ""))
    print(f"  trained checkpoint: {status['trained_checkpoint'] or 'not yet (written at the last step)'}")
    return True


def cmd_inspect(args) -> int:
    import numpy as np

    if describe_run(args):
        return 0
    meta = read_metadata(args.ckpt)
    problems = missing_array_files(args.ckpt)
    if not problems and args.verify:
        problems = verify_arrays(args.ckpt, progress=not args.json)
    if problems:
        listed = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise CheckpointError(f"{args.ckpt} is incomplete or damaged:\n  {listed}")
    trees = {tree: [{"path": p, "shape": list(shape), "dtype": str(dtype), "count": int(np.prod(shape))}
                    for p, (shape, dtype) in sorted(flatten(params_metadata(args.ckpt, tree)).items())]
             for tree in tree_names(args.ckpt)}
    counts = {f"{tree}_count" if tree != "params" else "param_count": sum(r["count"] for r in rows)
              for tree, rows in trees.items()}
    if args.json:
        print(json.dumps({**meta, **{k: v for k, v in trees.items()}, **counts,
                          "checked": "every array read" if args.verify else "every array file present"}, indent=2))
        return 0
    print(f"{args.ckpt}: {meta['family']} checkpoint")
    if "converted_from" in meta:
        print(f"converted from {meta['converted_from']['path']} ({meta['converted_from']['format']})")
    print("config:")
    for k, v in meta["config"].items():
        print(f"  {k}: {v}")
    for tree, rows in trees.items():
        width = max(len(r["path"]) for r in rows)
        print(f"{tree} ({len(rows)} arrays):")
        for r in rows:
            print(f"  {r['path']:<{width}}  {str(tuple(r['shape'])):<22} {r['dtype']:<9} {r['count']:>14,}")
    print(f"total: {counts['param_count']:,} base params" +
          (f", {counts['routers_count']:,} router params" if "routers_count" in counts else " (no routers)"))
    print("every array read and finite (--verify)" if args.verify
          else "every array's data file present (read them all with --verify)")
    return 0


def load_calibration(path: str | None, config, batches: int, seed: int) -> list[dict]:
    """Calibration inputs: a prepared training dataset (`prepare-data`: its latents noised, its
    text embeddings), an .npz of model inputs named as the model's arguments (Qwen-Image:
    img_shapes as 3 ints), or random example inputs when none is given.

    Args:
      path: --calibration (None: random inputs). config: the model config. batches: how many.
      seed: of the random inputs and of the dataset's noise.
    """
    import jax.numpy as jnp

    if path is None:
        print("order-channels: no --calibration given, using random inputs; real latents and prompt embeddings rank "
              "channels better: give the dataset `edit-jax prepare-data` wrote (--calibration DATA)", file=sys.stderr)
        return [example_inputs(config, batch=2, height=8, width=8, num_txt=16, seed=seed + i) for i in range(batches)]
    if Path(path).is_dir():
        return dataset_calibration(path, config, batches, seed=seed)
    data = read_arrays(path, "--calibration")
    expected = set(example_inputs(config))
    optional = {"encoder_hidden_states_mask"}
    missing, unexpected = sorted(expected - optional - set(data)), sorted(set(data) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{path} does not hold {config.family} model inputs: missing {missing}, unexpected {unexpected} "
            f"(a {config.family} calibration file holds {sorted(expected)})"
        )
    inputs = {k: jnp.asarray(v) for k, v in data.items() if k != "img_shapes"}
    if "img_shapes" in data:
        inputs["img_shapes"] = tuple(int(x) for x in data["img_shapes"])
    return [inputs]


def cmd_order_channels(args) -> int:
    import numpy as np

    if ROUTERS_DIR in tree_names(args.ckpt):
        raise CheckpointError(
            f"{args.ckpt} holds trained routers: they learned the original MLP channel order, so "
            "reordering would break them (SPEC section 3). Reorder a base checkpoint before router training."
        )
    check_destination(resolve(args.out), args.overwrite, protect=[args.ckpt])
    calibration = load_calibration(args.calibration, load_config(args.ckpt), args.batches, args.seed)  # before the weights
    model, params = load(args.ckpt)
    ordered, scores = order_mlp_channels(model.config, params, calibration)
    path = save(args.out, model.config, ordered, overwrite=args.overwrite, protect=[args.ckpt])

    def kept(order_scores):  # per stack: the share of importance in the first half of the channels
        return [float(s[:, : s.shape[1] // 2].sum() / s.sum()) for s in order_scores]

    written = [-np.sort(-s, axis=-1) for s in scores]  # the order written: most important first
    print(json.dumps({"checkpoint": str(path), "importance_kept_at_half_width": kept(written),
                      "importance_kept_at_half_width_before": kept(scores)}, indent=2))
    return 0


CALIBRATION_HELP = """--calibration DATA: a training dataset (edit-jax prepare-data), the best choice; or an .npz of
the model's own inputs, one batch:
  flux        hidden_states [B, N, 64], encoder_hidden_states [B, T, 4096], pooled_projections [B, 768],
              timestep [B] in [0, 1], img_ids [N, 3], txt_ids [T, 3] (+ guidance [B] for dev)
  qwen-image  hidden_states [B, N, 64], encoder_hidden_states [B, T, 3584], encoder_hidden_states_mask
              [B, T] (optional), timestep [B] in [0, 1], img_shapes (3 ints: frames, rows, columns)"""


def add_convert(command) -> None:
    convert = command("convert", "PyTorch weights -> edit-jax orbax checkpoint")
    convert.add_argument("family", choices=["flux", "qwen-image", "hunyuan3d"])
    convert.add_argument("src", help="weight file, or folder (diffusers transformer/ or pipeline root; "
                                     "hunyuan3d: the release folder with config.yaml)")
    convert.add_argument("dst", help="checkpoint folder to create")
    convert.add_argument(
        "--format", default="auto", choices=["auto", "diffusers", "bfl", "edit-release", "release"],
        help="bfl: original FLUX single file; edit-release: the released E-DiT Qwen-Image file; release: the "
             "Hunyuan3D-2 release folder; auto: by the keys",
    )
    convert.add_argument("--dtype", default="bfloat16", choices=[d for d in DTYPES], help="dtype the params are stored in")
    convert.add_argument("--config", help="preset name or diffusers config.json (default: the source's own)")
    convert.add_argument("--width-groups", type=at_least(1), default=None,
                         help="groups the elastic MLP channels are stored in (default: 8 where it divides the widths); "
                              "a multiple of the tensor-parallel size keeps narrow widths local to each shard, 1 keeps "
                              "PyTorch's order")
    convert.add_argument("--overwrite", action="store_true",
                         help="replace DST if it is an edit-jax checkpoint (never another folder, never the source)")
    convert.set_defaults(run=cmd_convert)


def add_export(command) -> None:
    exp = command("export", "edit-jax checkpoint -> PyTorch safetensors (diffusers layout, the E-DiT release layout, "
                            "or Hunyuan3D-2's release folder)")
    exp.add_argument("ckpt", help="edit-jax checkpoint folder")
    exp.add_argument("out", help="folder to create")
    exp.add_argument("--format", choices=["diffusers", "edit-release", "release"],
                     help="diffusers: the DiT as sharded safetensors + index + config.json (and its routers as "
                          "routers.safetensors); edit-release: one model.safetensors with the DiT and the routers as "
                          "gate_mlps.{i}.*; release: Hunyuan3D-2's config.yaml and model.safetensors (default: "
                          "diffusers, release for Hunyuan3D-2)")
    exp.add_argument("--dtype", choices=list(DTYPES), help="tensor dtype (default: as stored)")
    exp.add_argument("--shard-gb", type=at_least(0, float, strict=True), default=5.0, help="diffusers shard size, GiB")
    exp.add_argument("--overwrite", action="store_true", help="replace OUT if it is an earlier export")
    exp.add_argument("--allow-activation-change", action="store_true",
                     help="export a model whose MLP activation is not the one the format's own code runs (diffusers: "
                          "tanh GELU; the Qwen-Image release: x * sigmoid(1.702 x)); the files record the true one")
    exp.set_defaults(run=cmd_export)


def add_order_channels(command) -> None:
    order = command("order-channels", "sort elastic MLP channels by importance (before router training)", CALIBRATION_HELP)
    order.add_argument("ckpt", help="a converted base checkpoint (without routers)")
    order.add_argument("out", help="checkpoint folder to create")
    order.add_argument("--calibration", help="a dataset `edit-jax prepare-data` wrote (its latents noised, its captions' "
                                              "embeddings), or an .npz of model inputs (layout below); default: random inputs")
    order.add_argument("--batches", type=at_least(1), default=4, help="calibration batches (random, or of the dataset)")
    order.add_argument("--seed", type=at_least(0), default=0, help="seed of the random calibration inputs")
    order.add_argument("--overwrite", action="store_true", help="replace OUT if it is an edit-jax checkpoint")
    order.set_defaults(run=cmd_order_channels)


def add_inspect(command) -> None:
    inspect = command("inspect", "print a checkpoint's config and arrays, after checking every array's data file is "
                                 "there; or where a training run stands")
    inspect.add_argument("ckpt", help="edit-jax checkpoint folder, or a training run's RUN_DIR (its saved steps, last "
                                      "metrics and trained checkpoint)")
    inspect.add_argument("--verify", action="store_true", help="also read every array and check it is finite")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.set_defaults(run=cmd_inspect)
