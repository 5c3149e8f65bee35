"""The `edit-jax` command line: demo, convert, inspect.

    edit-jax demo [--preset flux-small] [--out DIR]
    edit-jax convert flux|qwen-image SRC DST [--format auto|diffusers|bfl|edit-release] [--dtype ...]
                     [--config PRESET_OR_CONFIG_JSON] [--overwrite]
    edit-jax order-channels CKPT OUT [--calibration FILE.npz] [--overwrite]
    edit-jax inspect CKPT [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edit_jax.config import DTYPES, PRESETS, ConfigError, from_diffusers_config, preset


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
    from checkpoints_convert import convert_checkpoint

    path = convert_checkpoint(
        args.family,
        args.src,
        args.dst,
        fmt=args.format,
        dtype=args.dtype,
        config=resolve_config(args.config, args.family),
        overwrite=args.overwrite,
    )
    print(f"wrote {path}")
    return 0


def cmd_inspect(args) -> int:
    import numpy as np

    from edit_jax.checkpoint import flatten, params_metadata, read_metadata, tree_names

    meta = read_metadata(args.ckpt)
    rows = [
        {"path": f"{tree}/{p}" if tree != "params" else p, "shape": list(shape), "dtype": str(dtype),
         "count": int(np.prod(shape))}
        for tree in tree_names(args.ckpt)
        for p, (shape, dtype) in sorted(flatten(params_metadata(args.ckpt, tree)).items())
    ]
    total = sum(r["count"] for r in rows)
    if args.json:
        print(json.dumps({**meta, "params": rows, "param_count": total}, indent=2))
        return 0
    print(f"{args.ckpt}: {meta['family']} checkpoint")
    if "converted_from" in meta:
        print(f"converted from {meta['converted_from']['path']} ({meta['converted_from']['format']})")
    print("config:")
    for k, v in meta["config"].items():
        print(f"  {k}: {v}")
    width = max(len(r["path"]) for r in rows)
    print(f"params ({len(rows)} arrays):")
    for r in rows:
        print(f"  {r['path']:<{width}}  {str(tuple(r['shape'])):<22} {r['dtype']:<9} {r['count']:>14,}")
    print(f"total: {total:,} params")
    return 0


def load_calibration(path: str | None, config, batches: int, seed: int) -> list[dict]:
    """Calibration inputs: an .npz of model inputs (Qwen-Image: img_shapes as 3 ints), or random
    example inputs when no file is given."""
    import jax.numpy as jnp
    import numpy as np

    from edit_jax.models import example_inputs

    if path is None:
        print("order-channels: no --calibration given, using random inputs; real latents and "
              "prompt embeddings rank channels better", file=sys.stderr)
        return [example_inputs(config, batch=2, height=8, width=8, num_txt=16, seed=seed + i) for i in range(batches)]
    data = dict(np.load(path))
    inputs = {k: jnp.asarray(v) for k, v in data.items() if k != "img_shapes"}
    if "img_shapes" in data:
        inputs["img_shapes"] = tuple(int(x) for x in data["img_shapes"])
    return [inputs]


def cmd_order_channels(args) -> int:
    from edit_jax import load
    from edit_jax.channel_order import order_mlp_channels
    from edit_jax.checkpoint import CheckpointError, ROUTERS_DIR, save, tree_names

    if ROUTERS_DIR in tree_names(args.ckpt):
        raise CheckpointError(
            f"{args.ckpt} holds trained routers: they learned the original MLP channel order, so "
            "reordering would break them (SPEC section 3). Reorder a base checkpoint before router training."
        )
    model, params = load(args.ckpt)
    calibration = load_calibration(args.calibration, model.config, args.batches, args.seed)
    ordered, scores = order_mlp_channels(model.config, params, calibration)
    path = save(args.out, model.config, ordered, overwrite=args.overwrite)
    kept = [float((lambda s: (s[:, : s.shape[1] // 2].sum() / s.sum()))(s)) for s in scores]
    print(json.dumps({"checkpoint": str(path), "importance_kept_at_half_width": kept}, indent=2))
    return 0


def cmd_demo(args) -> int:
    from eval.demo import run_demo

    summary = run_demo(args.preset, Path(args.out), seed=args.seed)
    print(json.dumps(summary, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edit-jax", description="Elastic Diffusion Transformers in JAX")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="random-weight model: forward, save, reload, compare (no downloads)")
    demo.add_argument("--preset", default="flux-small", choices=sorted(PRESETS))
    demo.add_argument("--out", default="edit-jax-demo", help="folder for the checkpoint and demo.json")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=cmd_demo)

    convert = sub.add_parser("convert", help="PyTorch weights -> edit-jax orbax checkpoint")
    convert.add_argument("family", choices=["flux", "qwen-image"])
    convert.add_argument("src", help="weight file, or folder (diffusers transformer/ or pipeline root)")
    convert.add_argument("dst", help="checkpoint folder to create")
    convert.add_argument(
        "--format", default="auto", choices=["auto", "diffusers", "bfl", "edit-release"],
        help="bfl: original FLUX single file; edit-release: the released E-DiT Qwen-Image file",
    )
    convert.add_argument("--dtype", default="bfloat16", choices=[d for d in DTYPES])
    convert.add_argument("--config", help="preset name or diffusers config.json (default: the source's own)")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    convert.set_defaults(run=cmd_convert)

    order = sub.add_parser("order-channels", help="sort elastic MLP channels by importance (before router training)")
    order.add_argument("ckpt", help="a converted base checkpoint (without routers)")
    order.add_argument("out", help="checkpoint folder to create")
    order.add_argument("--calibration", help=".npz of model inputs (default: random inputs)")
    order.add_argument("--batches", type=int, default=4, help="random calibration batches")
    order.add_argument("--seed", type=int, default=0)
    order.add_argument("--overwrite", action="store_true")
    order.set_defaults(run=cmd_order_channels)

    inspect = sub.add_parser("inspect", help="print a checkpoint's config and params")
    inspect.add_argument("ckpt")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.set_defaults(run=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    from checkpoints_convert.engine import ConversionError
    from checkpoints_convert.sources import SourceError
    from edit_jax.checkpoint import CheckpointError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ConfigError, ConversionError, SourceError, CheckpointError, ValueError) as e:
        print(f"edit-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
