"""The `edit-jax` command line (docs/cli.md has every command; `edit-jax COMMAND --help` every flag).

    edit-jax demo [--full] [--out DIR]              the fidelity demo on real digits
    edit-jax eval CKPT --embeddings FILE            dense vs E-DiT vs the cache on a real checkpoint
    edit-jax generate --model DIR --prompt TEXT     prompts to PNGs (FLUX.1 / Qwen-Image pipeline folder)
    edit-jax encode-prompts --model DIR --prompts FILE --out FILE.npz   prompts to sample's and eval's embeddings
    edit-jax prepare-data IMAGES OUT --model DIR    captioned images to a training dataset
    edit-jax convert | export | inspect | order-channels | sample | train | smoke
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from edit_jax import load, load_routers
from edit_jax.batches import rows_conditions, sample_in_batches
from edit_jax.channel_order import order_mlp_channels
from edit_jax.checkpoint import (ROUTERS_DIR, CheckpointError, check_destination, flatten, load_config, missing_array_files,
                                 params_metadata, read_metadata, resolve, save, tree_names, verify_arrays)
from edit_jax.config import (ATTENTION_IMPLEMENTATIONS, DTYPES, PRESETS, ConfigError, from_diffusers_config, preset,
                             resolve_attention, resolve_dtype)
from edit_jax.elastic import ElasticConfig
from edit_jax.embeddings import check_embeddings, embedding_conditions, existing_file, read_arrays, read_embeddings
from edit_jax.latents import initial_noise, packed_grid, unpack_latents
from edit_jax.models import example_inputs, init_routers
from edit_jax.sampler import SamplerConfig, check_sampling_inputs, concat_records
from edit_jax.sharding import MESH_AXES, make_mesh
from edit_jax.vae import check_tile_size


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


def cmd_export(args) -> int:
    from edit_jax.checkpoints_convert.export import export_checkpoint

    path = export_checkpoint(args.ckpt, args.out, args.format, dtype=args.dtype, overwrite=args.overwrite,
                             shard_bytes=int(args.shard_gb * 2**30), allow_activation_change=args.allow_activation_change)
    print(f"wrote {path}")
    return 0


def cmd_convert(args) -> int:
    from edit_jax.checkpoints_convert import convert_checkpoint

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


def describe_run(args) -> bool:
    """Prints where a training run stands when `args.ckpt` is a run's folder; whether it was one."""
    from edit_jax.train.run_dir import run_status

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
    img_shapes as 3 ints), or random example inputs when none is given."""
    import jax.numpy as jnp

    if path is None:
        print("order-channels: no --calibration given, using random inputs; real latents and prompt embeddings rank "
              "channels better: give the dataset `edit-jax prepare-data` wrote (--calibration DATA)", file=sys.stderr)
        return [example_inputs(config, batch=2, height=8, width=8, num_txt=16, seed=seed + i) for i in range(batches)]
    if Path(path).is_dir():
        from edit_jax.train.calibration import dataset_calibration

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


def at_least(low: float, kind=int, strict: bool = False):
    """An argparse type: a `kind` number >= low (> low with strict); else argparse names the
    flag and exits with 2."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not (value > low if strict else value >= low):  # NaN fails too
            raise argparse.ArgumentTypeError(f"{text} must be {'>' if strict else '>='} {low}")
        return value

    return parse


def mesh_shape(text: str) -> dict[str, int]:
    """--mesh AXIS=N[,AXIS=N...] (axes data, fsdp, tensor; one N may be -1: the rest of the devices)."""
    shape = {}
    for part in text.split(","):
        axis, _, size = part.partition("=")
        if axis.strip() not in MESH_AXES or not size.strip().lstrip("-").isdigit():
            raise argparse.ArgumentTypeError(f"{text!r}: give AXIS=N pairs, e.g. data=-1,tensor=2 (axes: {', '.join(MESH_AXES)})")
        shape[axis.strip()] = int(size)
    return shape


def add_mesh_argument(parser) -> None:
    parser.add_argument("--mesh", type=mesh_shape, default=None,
                        help="run on a device mesh, e.g. data=-1 (the batch over every device) or data=-1,tensor=2 "
                             "(params placed by the logical-axis rules); default: one device")


def add_dtype_argument(parser) -> None:
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="the transformer's params and compute (routers keep their stored dtype; latents are "
                             "updated in float32): auto is bfloat16 on a GPU or TPU, float32 on CPU")


def add_attention_argument(parser) -> None:
    parser.add_argument("--attention", default="auto", choices=ATTENTION_IMPLEMENTATIONS,
                        help="the transformer's softmax attention: auto is cuDNN's kernels on an NVIDIA GPU in "
                             "bfloat16/float16, XLA's elsewhere; splash (TPU) and tokamax on request")


def add_encoders_dtype_argument(parser) -> None:
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="the text encoders' torch dtype on a CUDA device (auto: bfloat16); elsewhere float32")


def mesh_of(args):
    """The device mesh --mesh asks for (checked against the devices there are), or None."""
    return make_mesh(args.mesh) if args.mesh else None


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


OUTPUTS = {  # what each command writes into its --out folder (a full-match pattern of names)
    "sample": r"latents\.npy|records\.npz|summary\.json|router_map\.png",
    "eval": r"eval\.json|router_map\.png|fidelity_vs_flops\.png|(dense|e-dit|e-dit-cache)-\d+\.png",
    "generate": r"image-\d+\.png|generate\.json|router_map\.png",
    "smoke": r"checkpoint|\.checkpoint\..+|smoke\.json|router_map\.png",
    "demo": r"data|runs|samples|results\.(json|md)|(quality|fd)_vs_flops\.png|router_map\.png",
}


def check_output_folder(out: str, command: str) -> Path:
    """The --out folder, checked before any work: new, empty, or holding only what `command`
    writes there (an earlier run's, which it replaces); never a file, never a folder of other
    files, whose same-named files it would overwrite."""
    import re

    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {out} is an existing file, not a folder")
    others = sorted(p.name for p in path.iterdir() if not re.fullmatch(OUTPUTS[command], p.name)) if path.is_dir() else []
    if others:
        raise ValueError(f"--out {out} holds {', '.join(others[:5])}{' ...' if len(others) > 5 else ''}, which "
                         f"`edit-jax {command}` does not write: use a new or empty folder, or an earlier {command} output")
    return path


def earlier_outputs(out: Path, command: str) -> dict[str, tuple[int, int]]:
    """The files an earlier `command` run left in `out`: name -> their `_stamp`."""
    import re

    files = [p for p in out.iterdir() if p.is_file() and re.fullmatch(OUTPUTS[command], p.name)] if out.is_dir() else []
    return {p.name: _stamp(p) for p in files}


def _stamp(path: Path) -> tuple[int, int]:
    """(inode, mtime in ns): changed by any rewrite of the file."""
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns


def remove_stale_outputs(out: Path, earlier: dict[str, tuple[int, int]]) -> list[str]:
    """After a successful run: removes the `earlier_outputs` that this run did not rewrite (e.g.
    the records of an E-DiT sample beside a later dense one's latents); returns their names."""
    stale = [name for name, stamp in earlier.items() if (out / name).is_file() and _stamp(out / name) == stamp]
    for name in stale:
        (out / name).unlink()
    return stale


def cmd_sample(args) -> int:
    import jax
    import numpy as np
    from tqdm.auto import tqdm

    out = check_output_folder(args.out, "sample")
    earlier = earlier_outputs(out, "sample")
    rows, cols = packed_grid(args.height, args.width)
    elastic, routers = None, None
    if args.elastic == "dense" and (args.cache or args.fresh_routers):
        raise ValueError(f"--{'cache' if args.cache else 'fresh-routers'} acts on E-DiT's routers: add --elastic infer")
    if args.elastic != "dense":  # its flags checked before any weights are read
        elastic = ElasticConfig(mode="infer", tau=args.tau, decision=args.decision, cache=args.cache,
                                cache_start=args.cache_start, delta_margin=args.delta_margin, max_reuse=args.max_reuse)
    mesh = mesh_of(args)
    data = read_embeddings(args.embeddings)
    dtype = resolve_dtype(args.dtype)
    model, params = load(args.ckpt, mesh=mesh, param_dtype=dtype, dtype=dtype, attention=args.attention)
    config = model.config
    check_embeddings(config, data, args.embeddings)
    cond = embedding_conditions(config, data, args.height, args.width)
    negative = embedding_conditions(config, data, args.height, args.width, "negative_")
    batch = cond["encoder_hidden_states"].shape[0]
    if elastic is not None:
        routers = load_routers(args.ckpt, mesh=mesh)
        if routers is None and args.fresh_routers:
            print("sample: no routers in the checkpoint: fresh full-capacity routers (every block runs at full "
                  "width; this measures the routers' cost, not their savings)", file=sys.stderr)
            routers = init_routers(config, seed=args.seed)
        if routers is None:
            raise CheckpointError(
                f"{args.ckpt} has no routers: use --elastic dense, a checkpoint with trained routers "
                "(`edit-jax train`, or a converted E-DiT release), or --fresh-routers to run fresh full-capacity ones"
            )
    sampler = SamplerConfig(num_steps=args.steps, guidance_scale=args.guidance, true_cfg_scale=args.true_cfg, cfg_mode=args.cfg_mode)
    channels = config.in_channels // 4
    noise = initial_noise(jax.random.key(args.seed), batch, channels, args.height, args.width)
    print(f"sampling {batch} x {args.height}x{args.width} ({rows * cols} tokens), {args.steps} steps, "
          f"elastic {args.elastic}{' + cache' if args.cache else ''}", file=sys.stderr)
    check_sampling_inputs(config, noise, cond, negative, sampler)  # the whole file, before it is cut into batches
    size = args.batch_size or batch
    parts = []
    with (tqdm(total=args.steps * -(-batch // size), desc="sample", unit="step") as bar,
          jax.set_mesh(mesh) if mesh else contextlib.nullcontext()):
        for part in sample_in_batches(model, params, noise, rows_conditions(cond, negative), sampler, size,
                                      routers=routers, elastic=elastic, progress=lambda i: bar.update(1)):
            parts.append((np.asarray(unpack_latents(part.latents[: len(part.ids)], args.height, args.width)), part.records,
                          len(part.ids)))
    out.mkdir(parents=True, exist_ok=True)
    unpacked = np.concatenate([latents for latents, _, _ in parts])
    np.save(out / "latents.npy", unpacked)
    summary = {"latents": str(out / "latents.npy"), "shape": list(unpacked.shape), "steps": args.steps, "elastic": args.elastic,
               "dtype": dtype, "attention": resolve_attention(args.attention, dtype), "batch_size": min(size, batch)}
    records = concat_records([(records, count) for _, records, count in parts])
    if records:  # dense sampling makes no routing decisions, so it has no records
        np.savez(out / "records.npz", **records)
        summary["records"] = str(out / "records.npz")
        summary["executed_fraction_per_step"] = records["executed"].mean(axis=(1, 2)).round(4).tolist()
        summary["cache_hit_rate"] = float(records["cache_hit"].mean())
        summary["tflops_total"] = float(records["flops_total"].sum() / 1e12)
        from edit_jax.eval.pictures import block_groups, plot_router_map

        summary["router_map"] = str(plot_router_map(
            out / "router_map.png", records["executed"][:, 0], records["bucket"][:, 0], records["cache_hit"][:, 0],
            title=f"E-DiT routing of sample 0: {config.family}, {args.height}x{args.width}, {args.steps} steps, "
                  f"tau {args.tau}{', cache from step %d' % args.cache_start if args.cache else ''}",
            block_groups=block_groups(config)))
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    remove_stale_outputs(out, earlier)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_train(args) -> int:
    from edit_jax.train.config import load_train_config
    from edit_jax.train.distributed import initialize
    from edit_jax.train.loop import train

    path, overrides = args.config, list(args.overrides)
    if path is not None and "=" in path and not Path(path).exists():  # no file given: only overrides
        path, overrides = None, [path] + overrides
    if args.topology and not args.compile_only:
        raise ValueError(f"--topology {args.topology} only acts with --compile-only (a run trains on the devices this "
                         "host has): add --compile-only, or leave --topology out")
    config = load_train_config(path, overrides)
    if args.compile_only:
        from edit_jax.train.compile_only import compile_only

        if not args.topology:
            raise ValueError("--compile-only needs --topology (e.g. v5e:4x4 or v5litepod-16, v5p:2x2x2 or v5p-16, "
                             "v6e:2x4 or v6e-8)")
        return 0 if compile_only(config, args.topology)["fits"] is not False else 1
    initialize(args.coordinator, args.num_processes, args.process_id, auto=args.distributed)
    metrics = train(config, progress=not args.quiet, max_steps=args.max_steps)
    print(json.dumps({k: float(v) for k, v in metrics.items() if getattr(v, "ndim", 1) == 0}, indent=2))
    return 0


def cmd_smoke(args) -> int:
    from edit_jax.eval.smoke import run_smoke

    summary = run_smoke(args.preset, check_output_folder(args.out, "smoke"), seed=args.seed)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_demo(args) -> int:
    import dataclasses

    from edit_jax.eval.demo import EXPECTED, SETTINGS, markdown_table, run_demo, with_overrides

    name = "full" if args.full else args.settings
    settings = with_overrides(SETTINGS[name], args.set)
    out = check_output_folder(args.out, "demo")
    print(f"edit-jax demo ({name} settings{', changed' if args.set else ''}): {EXPECTED[name]} on 2 CPU cores; "
          f"a rerun reuses what {out}/ already holds", file=sys.stderr)
    summary = run_demo(dataclasses.replace(settings, seed=args.seed), out, progress=not args.quiet)
    print(markdown_table(summary["methods"]))
    print(f"\n{summary['seconds'] / 60:.1f} minutes; table, JSON and pictures in {out}/ (results.md, results.json, "
          "quality_vs_flops.png, fd_vs_flops.png, router_map.png, samples/)")
    return 0


def read_prompts(args) -> list[str]:
    """--prompt TEXT (repeatable) and --prompts FILE (one per line, or JSONL with a "prompt" field)."""
    prompts = list(args.prompt or [])
    if args.prompts:
        try:
            lines = Path(existing_file(args.prompts, "--prompts")).read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise ValueError(f"--prompts {args.prompts} is not UTF-8 text: {e}") from e
        for line in lines:
            line = line.strip()
            if line.startswith("{"):
                try:
                    prompt = json.loads(line)["prompt"]
                except (ValueError, KeyError) as e:
                    raise ValueError(f"--prompts {args.prompts}: a JSON line without a \"prompt\" field: {line[:80]}") from e
                if not isinstance(prompt, str):
                    raise ValueError(f"--prompts {args.prompts}: a \"prompt\" that is not text: {line[:80]}")
                line = prompt
            if line:
                prompts.append(line)
    if not prompts:
        raise ValueError("no prompts: give --prompt TEXT or --prompts FILE")
    return prompts


def cmd_generate(args) -> int:
    from edit_jax.pipelines.generate import generate

    prompts = read_prompts(args)
    out = check_output_folder(args.out, "generate")
    earlier = earlier_outputs(out, "generate")
    result = generate(args.model, prompts, args.out, steps=args.steps, guidance=args.guidance, true_cfg=args.true_cfg,
                      negative_prompt=args.negative_prompt, height=args.height, width=args.width, seed=args.seed,
                      max_sequence_length=args.max_sequence_length, elastic=args.elastic, cache=args.cache,
                      cache_start=args.cache_start, tile_size=args.tile_size, decision=args.decision, tau=args.tau,
                      delta_margin=args.delta_margin, max_reuse=args.max_reuse,
                      embeddings_cache=None if args.embeddings_cache == "none" else args.embeddings_cache,
                      progress=not args.quiet, mesh=mesh_of(args), dtype=args.dtype, batch_size=args.batch_size,
                      transformer=args.transformer, attention=args.attention)
    remove_stale_outputs(out, earlier)
    print(json.dumps(result["summary"], indent=2))
    return 0


def cmd_encode_prompts(args) -> int:
    from edit_jax.pipelines.encode_prompts import encode_prompts

    summary = encode_prompts(args.model, read_prompts(args), args.out, negative_prompt=args.negative_prompt,
                             max_sequence_length=args.max_sequence_length, batch_size=args.batch_size,
                             embeddings_cache=None if args.embeddings_cache == "none" else args.embeddings_cache,
                             overwrite=args.overwrite, progress=not args.quiet, dtype=args.dtype)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_prepare_data(args) -> int:
    from edit_jax.pipelines.prepare_data import prepare_data

    report = prepare_data(args.images, args.out, args.model, captions=args.captions, resolution=args.resolution,
                          max_sequence_length=args.max_sequence_length, overwrite=args.overwrite,
                          progress=not args.quiet, dtype=args.dtype)
    for row in report["skipped"]:
        print(f"skipped {row['file']}: {row['reason']}", file=sys.stderr)
    print(json.dumps({k: v for k, v in report.items() if k != "skipped"} | {"skipped": len(report["skipped"])}, indent=2))
    return 0


def cmd_eval(args) -> int:
    from edit_jax.eval.sampling_eval import evaluate_checkpoint

    out = check_output_folder(args.out, "eval")
    earlier = earlier_outputs(out, "eval")
    existing_file(args.embeddings, "--embeddings")
    check_tile_size(args.tile_size)
    elastic = ElasticConfig(mode="infer", tau=args.tau, decision=args.decision,
                            cache_start=args.steps // 3 if args.cache_start is None else args.cache_start,
                            delta_margin=args.delta_margin, max_reuse=args.max_reuse)
    summary = evaluate_checkpoint(args.ckpt, args.embeddings, out, args.height, args.width, args.steps, args.seed,
                                  elastic, args.guidance, args.repeats, args.vae, args.tile_size, mesh_of(args),
                                  resolve_dtype(args.dtype), args.true_cfg, args.batch_size, args.attention)
    remove_stale_outputs(out, earlier)
    print(json.dumps(summary, indent=2))
    return 0


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every default that says something (once: a help text that names its default
    keeps its own; an unset flag's None or False is left out) and keeps the epilogs' line breaks."""

    def _get_help_string(self, action):
        if "default" in (action.help or "") or action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


DEMO_HELP = """writes OUT/results.md and results.json (one row per method: blocks run, FLOPs vs dense,
wall-clock, class accuracy, Frechet distance, PSNR/SSIM vs dense), quality_vs_flops.png,
fd_vs_flops.png, router_map.png and samples/*.png; trained checkpoints in OUT/runs."""

EMBEDDINGS_HELP = """embeddings file (.npz or .safetensors), by model family:
  flux        prompt_embeds [B, T, 4096] (T5 tokens), pooled_prompt_embeds [B, 768] (CLIP)
  qwen-image  prompt_embeds [B, T, 3584], prompt_embeds_mask [B, T] (1 = valid; optional, all valid)
  with --true-cfg > 1 also negative_prompt_embeds (+ negative_pooled_prompt_embeds or
  negative_prompt_embeds_mask). Widths are those of the real models; a checkpoint of another size
  needs its own joint_attention_dim / pooled_projection_dim."""

CALIBRATION_HELP = """--calibration DATA: a training dataset (edit-jax prepare-data), the best choice; or an .npz of
the model's own inputs, one batch:
  flux        hidden_states [B, N, 64], encoder_hidden_states [B, T, 4096], pooled_projections [B, 768],
              timestep [B] in [0, 1], img_ids [N, 3], txt_ids [T, 3] (+ guidance [B] for dev)
  qwen-image  hidden_states [B, N, 64], encoder_hidden_states [B, T, 3584], encoder_hidden_states_mask
              [B, T] (optional), timestep [B] in [0, 1], img_shapes (3 ints: frames, rows, columns)"""


def add_sampling_arguments(parser, seed_help: str = "seed of the initial noise") -> None:
    parser.add_argument("--height", type=at_least(1), default=1024, help="pixels, a multiple of 16")
    parser.add_argument("--width", type=at_least(1), default=1024, help="pixels, a multiple of 16")
    parser.add_argument("--steps", type=at_least(1), default=28, help="denoising steps")
    parser.add_argument("--seed", type=at_least(0), default=0, help=seed_help)
    parser.add_argument("--guidance", type=float, default=3.5, help="FLUX.1-dev embedded guidance (ignored by other models)")


def add_elastic_arguments(parser, cache_start: int | None, decision: str = "batch") -> None:
    """E-DiT's decision flags: tau, one decision per batch or per sample, and the cache's settings."""
    parser.add_argument("--decision", default=decision, choices=["batch", "sample"],
                        help="one skip/width decision per block for the batch (as the release) or one per sample")
    parser.add_argument("--tau", type=float, default=0.5, help="gate threshold: a block runs when its router's p >= tau")
    parser.add_argument("--cache-start", type=at_least(0), default=cache_start,
                        help="first step (0-based) at which the cache stores and reuses" +
                             (" (default: a third of --steps)" if cache_start is None else ""))
    parser.add_argument("--delta-margin", type=float, default=0.015, help="borderline: tau <= p <= tau + delta-margin")
    parser.add_argument("--max-reuse", type=at_least(0), default=10, help="reuses of one stored residual before the block runs again")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edit-jax", description="Elastic Diffusion Transformers in JAX")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, help, epilog=None):
        return sub.add_parser(name, help=help, description=help, epilog=epilog, formatter_class=_HelpFormatter)

    demo = command("demo", "train a small DiT and E-DiT routers on real digits; judge them against dense, static "
                           "pruning, a per-step schedule and the cache at equal FLOPs (no downloads)", DEMO_HELP)
    demo.add_argument("--full", action="store_true",
                      help="28x28 MNIST, 10 blocks, a sweep of three gate budgets (about 30 minutes on 2 cores)")
    demo.add_argument("--settings", default="default", choices=["default", "tiny"],
                      help="default: 8x8 digits, 6 blocks, one budget (3.5 to 4.5 minutes); tiny: about a minute, for tests")
    demo.add_argument("--out", default="edit-jax-demo", help="output folder; a rerun reuses its trained checkpoints")
    demo.add_argument("--seed", type=at_least(0), default=0, help="seed of the data split, weights, training and noise")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="change one setting (eval/demo.py DemoSettings), e.g. --set rho_g=[0.6,0.4] "
                           "--set rho_schedule=linear; give another --out for other settings")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(run=cmd_demo)

    gen = command("generate", "prompts -> PNG images with a FLUX.1 or Qwen-Image pipeline folder (text encoders, "
                              "transformer, VAE)")
    gen.add_argument("--model", required=True, help="diffusers pipeline folder: model_index.json, transformer/ "
                                                      "(diffusers weights or an edit-jax checkpoint), vae/, scheduler/, "
                                                      "text encoders and tokenizers")
    gen.add_argument("--transformer", help="weights to use instead of the folder's transformer/: an edit-jax checkpoint "
                                            "(a training run's RUN_DIR/edit-jax for --elastic infer), or diffusers, "
                                            "BFL or E-DiT release weights")
    gen.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    gen.add_argument("--prompts", help="a file of prompts: one per line, or JSONL with a \"prompt\" field")
    gen.add_argument("--negative-prompt", help="the negative prompt of true CFG (with --true-cfg > 1)")
    gen.add_argument("--true-cfg", type=float, default=1.0,
                     help="> 1: true classifier-free guidance with --negative-prompt (Qwen-Image: typically 4)")
    gen.add_argument("--max-sequence-length", type=at_least(1), default=512, help="text tokens (FLUX: T5's; Qwen-Image: at most)")
    gen.add_argument("--out", default="edit-jax-images", help="folder for image-N.png, generate.json, router_map.png")
    add_sampling_arguments(gen)
    gen.add_argument("--elastic", default="dense", choices=["dense", "infer"],
                     help="infer: E-DiT with the routers of transformer/ (or of --transformer)")
    gen.add_argument("--cache", action="store_true", help="router-guided block cache (with --elastic infer)")
    add_elastic_arguments(gen, cache_start=None, decision="sample")  # an image depends on its prompt alone
    gen.add_argument("--tile-size", type=at_least(1), default=1024, help="VAE decode tile, pixels (larger images decode in tiles)")
    gen.add_argument("--batch-size", type=at_least(1), default=4,
                     help="prompts encoded, denoised and decoded together (with per-image decisions, the images "
                          "do not depend on it)")
    gen.add_argument("--embeddings-cache", default="~/.cache/edit-jax/prompt-embeddings",
                     help="folder of cached prompt embeddings ('none': no cache)")
    add_mesh_argument(gen)
    add_dtype_argument(gen)
    add_attention_argument(gen)
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.set_defaults(run=cmd_generate)

    enc = command("encode-prompts", "prompts -> an embeddings .npz for `sample` and `eval` (the text encoders of a "
                                    "FLUX.1 or Qwen-Image pipeline folder)")
    enc.add_argument("--model", required=True, help="diffusers pipeline folder: model_index.json, the text encoders and "
                                                      "their tokenizers (transformer/ and vae/ are not read)")
    enc.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    enc.add_argument("--prompts", help="a file of prompts: one per line, or JSONL with a \"prompt\" field")
    enc.add_argument("--negative-prompt", help="also store negative_* embeddings of this prompt, for true CFG")
    enc.add_argument("--out", required=True, help="the .npz to write")
    enc.add_argument("--max-sequence-length", type=at_least(1), default=512, help="text tokens (FLUX: T5's; Qwen-Image: at most)")
    enc.add_argument("--batch-size", type=at_least(1), default=8, help="prompts encoded at once")
    enc.add_argument("--embeddings-cache", default="~/.cache/edit-jax/prompt-embeddings",
                     help="folder of cached prompt embeddings ('none': no cache)")
    enc.add_argument("--overwrite", action="store_true", help="replace an earlier embeddings file at --out")
    add_encoders_dtype_argument(enc)
    enc.add_argument("--quiet", action="store_true", help="no progress bars")
    enc.set_defaults(run=cmd_encode_prompts)

    prep = command("prepare-data", "a folder of captioned images -> a training dataset (VAE latents and text "
                                    "embeddings in ArrayRecord files with a manifest)")
    prep.add_argument("images", help="folder of images (.png .jpg .jpeg .webp .bmp), captions in NAME.txt beside each "
                                     "or in its metadata.jsonl or metadata.csv (Hugging Face's imagefolder layout)")
    prep.add_argument("out", help="dataset folder to create")
    prep.add_argument("--model", required=True, help="FLUX.1 or Qwen-Image pipeline folder (its vae/ and text encoders are used)")
    prep.add_argument("--captions", help="JSONL of {\"file\": PATH, \"caption\": TEXT} (or \"file_name\", \"text\"), or a "
                                         "CSV with those columns, PATH relative to IMAGES: instead of IMAGES/metadata.jsonl "
                                         "or .csv or sidecar .txt files")
    prep.add_argument("--resolution", type=at_least(1), default=1024,
                      help="bucket size: about RESOLUTION^2 pixels at aspect ratios 1:1, 4:3, 3:2, 16:9 and their inverses")
    prep.add_argument("--max-sequence-length", type=at_least(1), default=512, help="text tokens per caption (FLUX: T5; Qwen-Image: at most, padded with a mask)")
    prep.add_argument("--overwrite", action="store_true", help="replace OUT if it is an edit-jax dataset")
    add_encoders_dtype_argument(prep)
    prep.add_argument("--quiet", action="store_true", help="no progress bar")
    prep.set_defaults(run=cmd_prepare_data)

    smoke = command("smoke", "random-weight model: forward, save, reload, compare, sample dense and with E-DiT (no downloads)")
    smoke.add_argument("--preset", default="flux-small", choices=sorted(PRESETS), help="model size (see docs/model.md: Presets)")
    smoke.add_argument("--out", default="edit-jax-smoke", help="folder for the checkpoint, demo.json and router_map.png")
    smoke.add_argument("--seed", type=at_least(0), default=0, help="seed of the random weights, inputs and noise")
    smoke.set_defaults(run=cmd_smoke)

    ev = command("eval", "dense vs E-DiT vs E-DiT + cache on a checkpoint with routers and your prompt embeddings: "
                         "FLOPs, wall-clock, routing, PSNR/SSIM to dense from the same noise", EMBEDDINGS_HELP)
    ev.add_argument("ckpt", help="edit-jax checkpoint folder with routers")
    ev.add_argument("--embeddings", required=True, help="prompt embeddings (.npz/.safetensors; keys below)")
    ev.add_argument("--out", default="edit-jax-eval", help="folder for eval.json, router_map.png, fidelity_vs_flops.png")
    add_sampling_arguments(ev, seed_help="seed of the initial noise (the same for every method)")
    add_elastic_arguments(ev, cache_start=None)
    ev.add_argument("--true-cfg", type=float, default=1.0,
                    help="> 1: true CFG with the file's negative_* embeddings (Qwen-Image: typically 4)")
    ev.add_argument("--repeats", type=at_least(1), default=3, help="timed repeats per method (warm; the median is reported)")
    ev.add_argument("--batch-size", type=at_least(1), default=4,
                    help="prompts sampled together (E-DiT's batch decisions are per batch; the wall-clock is one batch's)")
    ev.add_argument("--vae", help="the pipeline's VAE folder (diffusers vae/, FLUX.1 or Qwen-Image): decode every "
                                  "method's latents, compare the images with dense's and write them as PNGs")
    ev.add_argument("--tile-size", type=at_least(1), default=1024, help="VAE decode tile, pixels")
    add_mesh_argument(ev)
    add_dtype_argument(ev)
    add_attention_argument(ev)
    ev.set_defaults(run=cmd_eval)

    convert = command("convert", "PyTorch weights -> edit-jax orbax checkpoint")
    convert.add_argument("family", choices=["flux", "qwen-image"])
    convert.add_argument("src", help="weight file, or folder (diffusers transformer/ or pipeline root)")
    convert.add_argument("dst", help="checkpoint folder to create")
    convert.add_argument(
        "--format", default="auto", choices=["auto", "diffusers", "bfl", "edit-release"],
        help="bfl: original FLUX single file; edit-release: the released E-DiT Qwen-Image file; auto: by the keys",
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

    exp = command("export", "edit-jax checkpoint -> PyTorch safetensors (diffusers layout, or the E-DiT release layout)")
    exp.add_argument("ckpt", help="edit-jax checkpoint folder")
    exp.add_argument("out", help="folder to create")
    exp.add_argument("--format", default="diffusers", choices=["diffusers", "edit-release"],
                     help="diffusers: the DiT as sharded safetensors + index + config.json (and its routers as "
                          "routers.safetensors); edit-release: one model.safetensors with the DiT and the routers as "
                          "gate_mlps.{i}.*")
    exp.add_argument("--dtype", choices=list(DTYPES), help="tensor dtype (default: as stored)")
    exp.add_argument("--shard-gb", type=at_least(0, float, strict=True), default=5.0, help="diffusers shard size, GiB")
    exp.add_argument("--overwrite", action="store_true", help="replace OUT if it is an earlier export")
    exp.add_argument("--allow-activation-change", action="store_true",
                     help="export a model whose MLP activation is not the one the format's own code runs (diffusers: "
                          "tanh GELU; the Qwen-Image release: x * sigmoid(1.702 x)); the files record the true one")
    exp.set_defaults(run=cmd_export)

    smp = command("sample", "sample latents from prompt embeddings (Euler flow matching, E-DiT optional)", EMBEDDINGS_HELP)
    smp.add_argument("ckpt", help="edit-jax checkpoint folder")
    smp.add_argument("--embeddings", required=True, help="prompt embeddings (.npz/.safetensors; keys below)")
    smp.add_argument("--out", required=True,
                     help="folder for latents.npy, summary.json and (E-DiT) records.npz and router_map.png")
    add_sampling_arguments(smp)
    smp.add_argument("--true-cfg", type=float, default=1.0, help="> 1: true CFG with the negative_* embeddings")
    smp.add_argument("--cfg-mode", default="batched", choices=["batched", "sequential"],
                     help="true CFG as one batch of 2B rows, or two calls per step as the released E-DiT code")
    smp.add_argument("--elastic", default="dense", choices=["dense", "infer"], help="dense: routers off; infer: E-DiT")
    smp.add_argument("--fresh-routers", action="store_true",
                     help="with --elastic infer on a checkpoint without routers: fresh full-capacity routers")
    smp.add_argument("--cache", action="store_true", help="router-guided block cache: reuse a block's last residual when p is borderline")
    add_elastic_arguments(smp, cache_start=15)
    smp.add_argument("--batch-size", type=at_least(1), help="prompts sampled together (default: the whole file; E-DiT's "
                                                           "batch decisions are per batch)")
    add_mesh_argument(smp)
    add_dtype_argument(smp)
    add_attention_argument(smp)
    smp.set_defaults(run=cmd_sample)

    order = command("order-channels", "sort elastic MLP channels by importance (before router training)", CALIBRATION_HELP)
    order.add_argument("ckpt", help="a converted base checkpoint (without routers)")
    order.add_argument("out", help="checkpoint folder to create")
    order.add_argument("--calibration", help="a dataset `edit-jax prepare-data` wrote (its latents noised, its captions' "
                                              "embeddings), or an .npz of model inputs (layout below); default: random inputs")
    order.add_argument("--batches", type=at_least(1), default=4, help="calibration batches (random, or of the dataset)")
    order.add_argument("--seed", type=at_least(0), default=0, help="seed of the random calibration inputs")
    order.add_argument("--overwrite", action="store_true", help="replace OUT if it is an edit-jax checkpoint")
    order.set_defaults(run=cmd_order_channels)

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

    inspect = command("inspect", "print a checkpoint's config and arrays, after checking every array's data file is "
                                 "there; or where a training run stands")
    inspect.add_argument("ckpt", help="edit-jax checkpoint folder, or a training run's RUN_DIR (its saved steps, last "
                                      "metrics and trained checkpoint)")
    inspect.add_argument("--verify", action="store_true", help="also read every array and check it is finite")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.set_defaults(run=cmd_inspect)
    return parser


SHARE_THE_GPU_WITH_TORCH = ("generate", "encode-prompts", "prepare-data")  # the text encoders run in PyTorch
OPTIONAL_PACKAGES = {"torch": ("torch", "diffusers", "transformers"), "diffrax": ("diffrax",), "tokamax": ("tokamax",)}


def main(argv: list[str] | None = None) -> int:
    from edit_jax.checkpoints_convert.engine import ConversionError
    from edit_jax.checkpoints_convert.sources import SourceError

    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras and args.command == "train" and all("=" in x and not x.startswith("-") for x in extras):
        args.overrides = [*args.overrides, *extras]  # key=value overrides after a flag
    elif extras:
        parser.parse_args(argv)  # argparse's own error for what it does not know, exit 2
    if args.command in SHARE_THE_GPU_WITH_TORCH:  # JAX takes GPU memory as it needs it, not 75% up front
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    try:
        return args.run(args)
    except (ConfigError, ConversionError, SourceError, CheckpointError, ValueError, MemoryError, RuntimeError,
            OSError) as e:
        print(f"edit-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nedit-jax {args.command}: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as e:
        extra = next((extra for extra, names in OPTIONAL_PACKAGES.items() if (e.name or "").split(".")[0] in names), None)
        if extra is None:
            raise
        print(f"edit-jax {args.command}: error: this needs {e.name.split('.')[0]}, an optional dependency: "
              f"pip install -e '.[{extra}]' in the edit-jax checkout (README: the CPU build of torch)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
