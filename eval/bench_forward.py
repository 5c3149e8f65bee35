"""Times our dense forward against diffusers' on the same weights and inputs, in one process.

    python -m edit_jax.eval.bench_forward --preset flux-small --height 16 --width 16 --txt 32
    python -m edit_jax.eval.bench_forward --preset flux-dev --height 64 --width 64 --txt 512 \\
        --dtype bfloat16 --attention cudnn --compile        # GPU, full size
    python -m edit_jax.eval.bench_forward --preset qwen-image --height 64 --width 64 --txt 256 \\
        --dtype bfloat16 --attention cudnn --compile regional --batch 1 2   # one sample, and true CFG

Both models get the same random weights (ours through the diffusers conversion table, which is
also checked numerically here) and the same inputs, FLUX.1 or Qwen-Image by the preset's family.
`--compile` also times diffusers under torch.compile: the whole model (`full`, the default) or
each repeated block (`regional`: diffusers' `compile_repeated_blocks`, which it recommends for
these models: a fraction of the compile time for about the same speed); eager runs then run under
`torch.compiler.set_stance("force_eager")`. Each variant is warmed up (compiled; torch.compile's
first call is timed and reported apart), then
the variants run alternately; the median of --runs timings is reported, with ratios, for each
--batch size in turn (the weights built and converted once). torch and diffusers are optional:
without them only our forward is timed. Prints JSON; --out writes it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import jax
import numpy as np

import edit_jax
from edit_jax.checkpoints_convert.engine import build_params
from edit_jax.checkpoints_convert.export import FAMILIES, diffusers_config
from edit_jax.checkpoints_convert.sources import from_state_dict
from edit_jax.config import ATTENTION_IMPLEMENTATIONS, ConfigError
from edit_jax.models.registry import abstract_params, example_inputs, split_static
from edit_jax.eval.report import emit, environment, run_script
from edit_jax.eval.timing import time_alternating


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def preset_with_overrides(name: str, overrides: list[str]):
    """A preset with FIELD=VALUE overrides (values parsed as JSON: ints, floats, lists, bools; else
    strings). An unknown field or preset is a ConfigError naming it."""
    config = edit_jax.preset(name)
    fields = [f.name for f in dataclasses.fields(config) if f.name != "runtime"]
    changes = {}
    for item in overrides:
        field, sep, value = item.partition("=")
        if not sep or field not in fields:
            raise ConfigError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {', '.join(fields)}")
        try:
            changes[field] = json.loads(value)
        except ValueError:
            changes[field] = value
    return config.replace(**changes)


def model_arguments(p: argparse.ArgumentParser) -> None:
    """The flags that pick the model, its size and the inputs (shared by the eval scripts)."""
    p.add_argument("--preset", default="flux-small")
    p.add_argument("--height", type=int, default=16, help="latent tokens per column")
    p.add_argument("--width", type=int, default=16, help="latent tokens per row")
    p.add_argument("--txt", type=int, default=32, help="text tokens")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--attention", default="xla", choices=ATTENTION_IMPLEMENTATIONS)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field of the preset, e.g. --set num_attention_heads=8")


def config_from(args):
    """The config that `model_arguments`' flags pick."""
    return preset_with_overrides(args.preset, args.set).with_runtime(
        param_dtype=args.dtype, dtype=args.dtype, attention=args.attention
    )


def diffusers_model(config, torch_dtype, device):
    """diffusers' transformer of `config`'s family and architecture, random weights, in eval mode."""
    import diffusers
    import torch

    kwargs = diffusers_config(config)
    model_class = getattr(diffusers, kwargs.pop("_class_name"))
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)  # built in its dtype: a float32 FLUX.1-dev would need 48 GB first
    try:
        with torch.device(device):
            model = model_class(**kwargs)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def diffusers_inputs(arrays: dict, static: dict, torch_dtype, device) -> dict:
    """Our forward's inputs as diffusers' forward takes them (the activations in torch_dtype).

    Args:
      arrays, static: our forward's inputs. torch_dtype: the activations' dtype. device: torch's.
    """
    import torch

    out = {k: torch.from_numpy(np.array(v, np.float32)).to(device) for k, v in arrays.items()}
    for k in ("hidden_states", "encoder_hidden_states", "pooled_projections"):
        if k in out:
            out[k] = out[k].to(torch_dtype)
    if "encoder_hidden_states_mask" in out:
        out["encoder_hidden_states_mask"] = out["encoder_hidden_states_mask"].long()
    if "img_shapes" in static:  # Qwen-Image: one (frames, rows, cols) list per sample
        out["img_shapes"] = [[static["img_shapes"]]] * arrays["hidden_states"].shape[0]
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                conflict_handler="resolve")
    model_arguments(p)
    p.add_argument("--batch", type=int, nargs="+", default=[1],
                   help="batch sizes, each timed in turn on the same weights (e.g. 1 2: one sample, and true CFG)")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", nargs="?", const="full", choices=["full", "regional"],
                   help="also time diffusers under torch.compile, of the whole model (full, the default) or of "
                        "each repeated block (regional); its compile time reported apart")
    p.add_argument("--no-torch", action="store_true", help="time only our forward")
    p.add_argument("--out", help="write the JSON result here too")
    args = p.parse_args(argv)
    if min(args.batch) < 1:
        raise ValueError(f"--batch {args.batch}: batch sizes must be >= 1")

    config = config_from(args)
    model = edit_jax.build_model(config)
    _, static = split_static(example_inputs(config, 1, args.height, args.width, args.txt))
    forward = jax.jit(lambda params, x: model.apply({"params": params}, **x, **static))

    result = {**environment(), "preset": args.preset, "overrides": args.set,
              "tokens": {"image": args.height * args.width, "text": args.txt}, "dtype": args.dtype,
              "attention": args.attention, "runs": args.runs}
    references = {}
    try:
        if args.no_torch:
            raise ImportError("--no-torch")
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        torch_dtype = getattr(torch, args.dtype)
        t0 = time.perf_counter()
        ref = diffusers_model(config, torch_dtype, device)
        log(f"diffusers model built in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        params = jax.device_put(build_params(
            FAMILIES[config.family].diffusers_table(config), from_state_dict(ref.state_dict()), abstract_params(config)
        ))
        log(f"its weights converted to ours in {time.perf_counter() - t0:.1f} s")
        references["diffusers_eager"] = ref
        # one graph per batch size (dynamic=False), as a sampler at a fixed batch gets
        if args.compile == "full":
            references["diffusers_compiled"] = torch.compile(ref, dynamic=False)
        elif args.compile == "regional":  # compiles ref's blocks in place; eager calls set them aside
            ref.compile_repeated_blocks(fullgraph=True, dynamic=False)
            references["diffusers_compiled"] = ref
        result["torch"] = torch.__version__
        result["torch_compile"] = args.compile
    except ImportError as e:
        params = edit_jax.init_params(config)
        result["torch"] = f"not timed ({e})"

    result["by_batch"] = {}
    for batch in args.batch:
        arrays_f32, _ = split_static(example_inputs(config, batch, args.height, args.width, args.txt))
        arrays = {k: (v.astype(args.dtype) if k in ("hidden_states", "encoder_hidden_states", "pooled_projections") else v)
                  for k, v in arrays_f32.items()}
        row, variants = {}, {}
        if references:
            torch_inputs = diffusers_inputs(arrays_f32, static, torch_dtype, device)

            def run_torch(m, stance, torch_inputs=torch_inputs):
                def call():
                    with torch.inference_mode(), torch.compiler.set_stance(stance):
                        out = m(**torch_inputs, return_dict=False)[0]
                    if device == "cuda":
                        torch.cuda.synchronize()
                    return out
                return call

            variants = {name: run_torch(m, "default" if name == "diffusers_compiled" else "force_eager")
                        for name, m in references.items()}
            if "diffusers_compiled" in variants:
                t0 = time.perf_counter()
                variants["diffusers_compiled"]()
                row["torch_compile_s"] = round(time.perf_counter() - t0, 2)
                log(f"batch {batch}: diffusers under torch.compile, first call (compile) {row['torch_compile_s']} s")
        t0 = time.perf_counter()
        ours_out = jax.block_until_ready(forward(params, arrays))
        row["jax_compile_s"] = round(time.perf_counter() - t0, 2)
        log(f"batch {batch}: edit_jax first call (compile) {row['jax_compile_s']} s")
        if variants:
            ref_out = variants["diffusers_eager"]().float().cpu().numpy()
            ours = np.asarray(ours_out, np.float64)
            row["relative_error_vs_diffusers"] = float(np.linalg.norm(ours - ref_out) / np.linalg.norm(ref_out))
        variants = {"edit_jax": lambda arrays=arrays: jax.block_until_ready(forward(params, arrays)), **variants}
        time_alternating(variants, args.warmup)
        medians = time_alternating(variants, args.runs)
        row["median_ms"] = {k: round(v, 3) for k, v in medians.items()}
        row["ratio_edit_jax_over"] = {k: round(medians["edit_jax"] / v, 3) for k, v in medians.items() if k != "edit_jax"}
        result["by_batch"][str(batch)] = row
    return emit(result, args.out)


if __name__ == "__main__":
    run_script(main)
