"""What the commands share: argument types and groups, the --out folder rules, prompts files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edit_jax.config import ATTENTION_IMPLEMENTATIONS, DTYPES
from edit_jax.elastic.step_cache import FirstBlockCache, MagCache, StepCacheMethod, TaylorSeer
from edit_jax.sampling.calibration import read_mag_ratios
from edit_jax.sampling.embeddings import existing_file
from edit_jax.sharding import MESH_AXES, make_mesh


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every default that says something (once: a help text that names its default
    keeps its own; an unset flag's None or False is left out) and keeps the epilogs' line breaks."""

    def _get_help_string(self, action):
        if "default" in (action.help or "") or action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


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


STEP_CACHES = ("none", "first-block", "mag-cache", "taylor-seer")


def add_step_cache_arguments(parser, ratios_default: str) -> None:
    """The per-step cache flags (diffusers' first-block cache and MagCache; docs/sampling.md)."""
    group = parser.add_argument_group("per-step cache (diffusers' hooks; on the dense model or beside E-DiT)")
    group.add_argument("--step-cache", default="none", choices=STEP_CACHES,
                       help="first-block: reuse the other blocks' residual while the first block's barely changes; "
                            "mag-cache: skip steps while the calibrated magnitude ratios say the residual holds; "
                            "taylor-seer: compute every --cache-interval steps, predict the blocks' output between")
    group.add_argument("--step-cache-threshold", type=at_least(0.0, float),
                       help="first-block: relative change of the first block's residual above which a step computes "
                            "(default 0.05); mag-cache: accumulated error up to which steps are skipped (default 0.06)")
    group.add_argument("--head-layers", type=at_least(1), default=1, help="first-block: blocks that always run and decide")
    group.add_argument("--tail-layers", type=at_least(0), default=0, help="first-block: last blocks that always run")
    group.add_argument("--max-skip-steps", type=at_least(0), default=3, help="mag-cache: consecutive skipped steps at most")
    group.add_argument("--retention-ratio", type=float, default=0.2, help="mag-cache: share of the first steps never skipped")
    group.add_argument("--mag-ratios", help=f"mag-cache: the calibrated ratios (default: {ratios_default}; "
                                            "`edit-jax calibrate-magcache` writes them)")
    group.add_argument("--cache-interval", type=at_least(1), default=5, help="taylor-seer: steps between computed steps")
    group.add_argument("--disable-cache-before-step", type=at_least(0), default=3,
                       help="taylor-seer: the first steps, all computed")
    group.add_argument("--disable-cache-after-step", type=at_least(0), help="taylor-seer: computes every step from this one on")
    group.add_argument("--max-order", type=at_least(0), default=1, help="taylor-seer: highest order of the Taylor series")
    group.add_argument("--taylor-factors-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                       help="taylor-seer: the stored factors' dtype")


def step_cache_of(args, ratios_default: Path) -> StepCacheMethod | None:
    """The per-step cache the flags ask for (per sample with --decision sample), or None."""
    per_sample = getattr(args, "decision", "batch") == "sample"
    if args.step_cache == "first-block":
        threshold = 0.05 if args.step_cache_threshold is None else args.step_cache_threshold
        return FirstBlockCache(threshold, args.head_layers, args.tail_layers, per_sample)
    if args.step_cache == "mag-cache":
        ratios = read_mag_ratios(args.mag_ratios or ratios_default)
        threshold = 0.06 if args.step_cache_threshold is None else args.step_cache_threshold
        return MagCache(ratios, args.steps, threshold, args.max_skip_steps, args.retention_ratio)
    if args.step_cache == "taylor-seer":
        return TaylorSeer(args.cache_interval, args.disable_cache_before_step, args.disable_cache_after_step,
                          args.max_order, args.taylor_factors_dtype)
    return None


OUTPUTS = {  # what each command writes into its --out folder (a full-match pattern of names)
    "sample": r"latents\.npy|records\.npz|summary\.json|router_map\.png",
    "eval": r"eval\.json|router_map\.png|fidelity_vs_flops\.png|(dense|e-dit|e-dit-cache|dense-first_block|dense-mag_cache|dense-taylor_seer)-\d+\.png",
    "generate": r"image-\d+\.png|generate\.json|router_map\.png",
    "generate-3d": r"mesh-\d+\.(glb|obj|png)|generate_3d\.json|router_map\.png",
    "smoke": r"checkpoint|\.checkpoint\..+|smoke\.json|router_map\.png",
    "demo": r"data|runs|samples|results\.(json|md)|(quality|fd)_vs_flops\.png|reuse_vs_caches_(fd|psnr)\.png|router_map\.png",
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


def add_prompts_arguments(parser) -> None:
    """--prompt TEXT (repeatable) and --prompts FILE (`read_prompts` reads both)."""
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    parser.add_argument("--prompts", help="a file of prompts: one per line, or JSONL with a \"prompt\" field")


def add_embeddings_cache_argument(parser) -> None:
    parser.add_argument("--embeddings-cache", default="~/.cache/edit-jax/prompt-embeddings",
                        help="folder of cached prompt embeddings ('none': no cache)")


def embeddings_cache_of(args):
    """The --embeddings-cache folder, or None for 'none'."""
    return None if args.embeddings_cache == "none" else args.embeddings_cache


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


EMBEDDINGS_HELP = """embeddings file (.npz or .safetensors), by model family:
  flux        prompt_embeds [B, T, 4096] (T5 tokens), pooled_prompt_embeds [B, 768] (CLIP)
  qwen-image  prompt_embeds [B, T, 3584], prompt_embeds_mask [B, T] (1 = valid; optional, all valid)
  with --true-cfg > 1 also negative_prompt_embeds (+ negative_pooled_prompt_embeds or
  negative_prompt_embeds_mask). Widths are those of the real models; a checkpoint of another size
  needs its own joint_attention_dim / pooled_projection_dim."""
