"""The `edit-jax` command line: demo, convert, inspect.

    edit-jax demo [--preset flux-small] [--out DIR]
    edit-jax convert flux|qwen-image SRC DST [--format auto|diffusers|bfl|edit-release] [--dtype ...]
                     [--config PRESET_OR_CONFIG_JSON] [--overwrite]
    edit-jax sample CKPT --embeddings FILE --out DIR [--steps 28] [--elastic infer --cache] ...
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
    kept = [float(s[:, : s.shape[1] // 2].sum() / s.sum()) for s in scores]
    print(json.dumps({"checkpoint": str(path), "importance_kept_at_half_width": kept}, indent=2))
    return 0


def read_embeddings(path: str) -> dict:
    """Prompt embeddings from .npz or .safetensors: prompt_embeds [B, T, D] and, as the model
    needs, pooled_prompt_embeds [B, P] (FLUX), prompt_embeds_mask [B, T] (Qwen-Image) and the
    negative_* counterparts for true CFG."""
    import numpy as np

    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        data = load_file(path)
    else:
        data = dict(np.load(path))
    if "prompt_embeds" not in data:
        raise ValueError(f"{path} has no 'prompt_embeds' (found: {sorted(data)})")
    return data


def conditions(config, data: dict, height: int, width: int, prefix: str = "") -> dict | None:
    """The sampler's cond from an embeddings file ("negative_" prefix: the CFG negative); None
    when the file has no such prompt."""
    from edit_jax.sampler import make_conditions

    if f"{prefix}prompt_embeds" not in data:
        return None
    return make_conditions(config, data[f"{prefix}prompt_embeds"], height, width,
                           data.get(f"{prefix}pooled_prompt_embeds"), data.get(f"{prefix}prompt_embeds_mask"))


def cmd_sample(args) -> int:
    import jax
    import numpy as np
    from tqdm.auto import tqdm

    from edit_jax import load
    from edit_jax.checkpoint import CheckpointError, load_routers
    from edit_jax.elastic import ElasticConfig
    from edit_jax.latents import initial_noise, packed_grid, unpack_latents
    from edit_jax.sampler import SamplerConfig, sample

    model, params = load(args.ckpt)
    config = model.config
    data = read_embeddings(args.embeddings)
    cond = conditions(config, data, args.height, args.width)
    negative = conditions(config, data, args.height, args.width, "negative_")
    batch = cond["encoder_hidden_states"].shape[0]
    elastic, routers = None, None
    if args.elastic != "dense":
        routers = load_routers(args.ckpt)
        if routers is None:
            raise CheckpointError(f"{args.ckpt} has no routers: use --elastic dense, or a checkpoint with routers")
        elastic = ElasticConfig(mode="infer", tau=args.tau, decision=args.decision, cache=args.cache,
                                cache_start=args.cache_start, delta_margin=args.delta_margin, max_reuse=args.max_reuse)
    sampler = SamplerConfig(num_steps=args.steps, guidance_scale=args.guidance, true_cfg_scale=args.true_cfg, cfg_mode=args.cfg_mode)
    channels = config.in_channels // 4
    noise = initial_noise(jax.random.key(args.seed), batch, channels, args.height, args.width)
    rows, cols = packed_grid(args.height, args.width)
    print(f"sampling {batch} x {args.height}x{args.width} ({rows * cols} tokens), {args.steps} steps, "
          f"elastic {args.elastic}{' + cache' if args.cache else ''}", file=sys.stderr)
    with tqdm(total=args.steps, desc="sample", unit="step") as bar:
        latents, records = sample(model, params, noise, cond, sampler, routers=routers, elastic=elastic,
                                  negative_cond=negative, progress=lambda i: bar.update(1))
        latents = jax.block_until_ready(latents)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "latents.npy", np.asarray(unpack_latents(latents, args.height, args.width)))
    records = jax.tree.map(np.asarray, records)
    np.savez(out / "records.npz", **records)
    summary = {"latents": str(out / "latents.npy"), "shape": list(unpack_latents(latents, args.height, args.width).shape),
               "steps": args.steps, "elastic": args.elastic}
    if records:
        summary["executed_fraction_per_step"] = records["executed"].mean(axis=(1, 2)).round(4).tolist()
        summary["cache_hit_rate"] = float(records["cache_hit"].mean())
        summary["tflops_total"] = float(records["flops_total"].sum() / 1e12)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
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

    smp = sub.add_parser("sample", help="sample latents from prompt embeddings (Euler flow matching, E-DiT optional)")
    smp.add_argument("ckpt")
    smp.add_argument("--embeddings", required=True, help=".npz/.safetensors with prompt_embeds (+ pooled / mask / negative_*)")
    smp.add_argument("--out", required=True, help="folder for latents.npy, records.npz, summary.json")
    smp.add_argument("--height", type=int, default=1024)
    smp.add_argument("--width", type=int, default=1024)
    smp.add_argument("--steps", type=int, default=28)
    smp.add_argument("--seed", type=int, default=0)
    smp.add_argument("--guidance", type=float, default=3.5, help="FLUX.1-dev embedded guidance")
    smp.add_argument("--true-cfg", type=float, default=1.0, help="> 1: true CFG with negative_* embeddings")
    smp.add_argument("--cfg-mode", default="batched", choices=["batched", "sequential"])
    smp.add_argument("--elastic", default="dense", choices=["dense", "infer"])
    smp.add_argument("--decision", default="batch", choices=["batch", "sample"])
    smp.add_argument("--tau", type=float, default=0.5)
    smp.add_argument("--cache", action="store_true", help="router-guided block cache")
    smp.add_argument("--cache-start", type=int, default=15)
    smp.add_argument("--delta-margin", type=float, default=0.015)
    smp.add_argument("--max-reuse", type=int, default=10)
    smp.set_defaults(run=cmd_sample)

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
