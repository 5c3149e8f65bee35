"""The `edit-jax` command line (docs/cli.md has every command; `edit-jax COMMAND --help` every flag).

    edit-jax demo [--full] [--out DIR]              the fidelity demo on real digits
    edit-jax eval CKPT --embeddings FILE            dense vs E-DiT vs the cache on a real checkpoint
    edit-jax generate --model DIR --prompt TEXT     prompts to PNGs (FLUX.1 / Qwen-Image pipeline folder)
    edit-jax encode-prompts --model DIR --prompts FILE --out FILE.npz   prompts to sample's and eval's embeddings
    edit-jax prepare-data IMAGES OUT --model DIR    captioned images to a training dataset
    edit-jax convert | export | inspect | order-channels | sample | calibrate-magcache | train | smoke

The command groups import what they run at their tops: all of it adds about 0.25 s to the CLI's
1.7 s start on 2 CPU cores (measured), and none of it needs an optional dependency
(`tests/test_import_graph.py` starts the CLI without torch, diffusers, transformers, diffrax,
tokamax or libtpu).
"""

from __future__ import annotations

import argparse
import os
import sys

from edit_jax.checkpoint import CheckpointError
from edit_jax.checkpoints_convert.engine import ConversionError
from edit_jax.checkpoints_convert.sources import SourceError
from edit_jax.cli import checkpoints, demo, pipelines, sampling, training
from edit_jax.cli.common import HelpFormatter
from edit_jax.config import ConfigError

# (the order of `edit-jax --help`, and the module that adds each command)
COMMANDS = (demo.add_demo, pipelines.add_generate, pipelines.add_generate_3d, pipelines.add_encode_prompts, pipelines.add_prepare_data,
            sampling.add_smoke, sampling.add_eval, checkpoints.add_convert, checkpoints.add_export, sampling.add_sample,
            sampling.add_calibrate_magcache,
            checkpoints.add_order_channels, training.add_train, checkpoints.add_inspect)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edit-jax", description="Elastic Diffusion Transformers in JAX")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, help, epilog=None):
        return sub.add_parser(name, help=help, description=help, epilog=epilog, formatter_class=HelpFormatter)

    for add in COMMANDS:
        add(command)
    return parser


SHARE_THE_GPU_WITH_TORCH = ("generate", "encode-prompts", "prepare-data")  # the text encoders run in PyTorch
OPTIONAL_PACKAGES = {"torch": ("torch", "diffusers", "transformers"), "diffrax": ("diffrax",), "tokamax": ("tokamax",)}


def main(argv: list[str] | None = None) -> int:
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

