"""Decode time and peak memory of our Flax VAEs against diffusers' (AutoencoderKL for FLUX.1,
AutoencoderKLQwenImage for Qwen-Image), same random weights (through the conversion table), same
latents; each side in its own process so that its peak resident memory (VmHWM) is its own. The
parent draws the weights (diffusers' init, seeded) into a safetensors file both children read:
ours through the conversion table with NumPy alone (its process never loads torch), diffusers'
into the VAE it builds from the arguments the parent hands it as JSON (its process never loads
JAX). The children run this file by its path, so the project's modules are imported inside the
functions of the side that needs them.

    python -m edit_jax.eval.bench_vae --size 1024 --runs 3                      # FLUX.1's VAE, 1024x1024
    python -m edit_jax.eval.bench_vae --vae qwen-image --size 1024              # Qwen-Image's VAE
    python -m edit_jax.eval.bench_vae --vae qwen-image --size 2048 --tile 1024  # both sides in 1024 px tiles

Prints JSON (seconds: median of --runs after a warm-up call, or the first call with --runs 0;
peak RSS in GiB; whether the side's process loaded JAX, and torch); --out writes it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def peak_rss_gib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def vae_config(vae: str, channels: str | None):
    """The real config of FLUX.1's or Qwen-Image's VAE, or one of other widths for quick runs
    (FLUX: block widths "32,32,64,64"; Qwen-Image: the base width "16")."""
    from edit_jax.models.qwen_image_vae import AutoencoderKLQwenImageConfig
    from edit_jax.models.vae import AutoencoderKLConfig

    if vae == "qwen-image":
        return AutoencoderKLQwenImageConfig(**({"base_dim": int(channels)} if channels else {}))
    if not channels:
        return AutoencoderKLConfig()
    widths = tuple(int(c) for c in channels.split(","))
    return AutoencoderKLConfig(block_out_channels=widths, norm_num_groups=min(32, widths[0]))


def diffusers_arguments(cfg) -> dict:
    """The keyword arguments of diffusers' VAE class for our config (JSON values), with "class"."""
    from edit_jax.models.qwen_image_vae import AutoencoderKLQwenImageConfig

    if isinstance(cfg, AutoencoderKLQwenImageConfig):
        return {"class": "AutoencoderKLQwenImage",
                **{k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}}
    blocks = len(cfg.block_out_channels)
    return {"class": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": cfg.latent_channels,
            "block_out_channels": list(cfg.block_out_channels), "layers_per_block": cfg.layers_per_block,
            "norm_num_groups": cfg.norm_num_groups, "use_quant_conv": False, "use_post_quant_conv": False,
            "down_block_types": ["DownEncoderBlock2D"] * blocks, "up_block_types": ["UpDecoderBlock2D"] * blocks}


def torch_vae(arguments: dict, seed: int = 0):
    """diffusers' VAE from `diffusers_arguments`, seeded random weights."""
    import diffusers
    import torch

    torch.manual_seed(seed)
    arguments = dict(arguments)
    return getattr(diffusers, arguments.pop("class"))(**arguments).eval()


def write_weights(arguments: dict, path: Path) -> None:
    """diffusers' VAE of `arguments` with seeded random weights, its state dict saved to `path`."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in torch_vae(arguments).state_dict().items()}, path)


def enable_torch_tiling(vae, tile: int) -> None:
    """diffusers' tiled decode at a tile of `tile` pixels, overlapping by a quarter (as ours)."""
    from diffusers import AutoencoderKLQwenImage

    if isinstance(vae, AutoencoderKLQwenImage):
        vae.enable_tiling(tile_sample_min_height=tile, tile_sample_min_width=tile,
                          tile_sample_stride_height=tile * 3 // 4, tile_sample_stride_width=tile * 3 // 4)
    else:
        vae.enable_tiling()
        vae.tile_sample_min_size, vae.tile_latent_min_size = tile, tile // 8


def run_side(side: str, arguments: dict, weights: str, size: int, runs: int, tile: int | None, vae_name: str,
             channels: str | None) -> dict:
    """One side's decode of random latents: its time and peak memory (run in a process of its own).

    Args:
      side: "ours" or "diffusers". arguments: diffusers' VAE arguments (`diffusers_arguments`).
      weights: the safetensors file of diffusers' state dict (`main` writes it).
      size: the image's side, pixels. runs: timed decodes. tile: the tile's side (None: whole).
      vae_name, channels: our config's (`vae_config`; read on our side only).
    """
    import numpy as np

    latents = np.random.default_rng(0).standard_normal((1, 16, size // 8, size // 8)).astype(np.float32)
    if side == "diffusers":
        import torch
        from safetensors.torch import load_file

        vae = torch_vae(arguments)
        vae.load_state_dict(load_file(weights))
        z = torch.from_numpy(latents)
        if arguments["class"] == "AutoencoderKLQwenImage":  # the video VAE takes a frame axis
            z = z[:, :, None]
        if tile:
            enable_torch_tiling(vae, tile)

        def decode():
            with torch.no_grad():
                return vae.decode(z).sample
    else:
        from edit_jax.checkpoints_convert.engine import build_params
        from edit_jax.checkpoints_convert.sources import open_source
        from edit_jax.checkpoints_convert.vae import vae_table
        from edit_jax.models.vae import abstract_vae, decode_tiled

        config = vae_config(vae_name, channels)
        abstract = abstract_vae(config)
        params = build_params(vae_table(abstract), open_source(weights), abstract)

        def decode():
            return decode_tiled(config, params, latents, tile_size=tile or size)

    t0 = time.perf_counter()
    decode()
    first = time.perf_counter() - t0
    times = [first] if runs == 0 else []
    for _ in range(runs):
        t0 = time.perf_counter()
        decode()
        times.append(time.perf_counter() - t0)
    # the diffusers side's peak memory is diffusers' own only while JAX stays out of its process
    return {"first_call_s": round(first, 3), "decode_s": round(sorted(times)[len(times) // 2], 3),
            "peak_rss_gib": round(peak_rss_gib(), 2), "jax_loaded": "jax" in sys.modules,
            "torch_loaded": "torch" in sys.modules}


def child(argv: list[str]) -> None:
    """A child measuring one side: --side, --arguments (JSON), --weights, --size, --runs, [--tile],
    --vae, [--channels]; prints its JSON line (flags were checked by the parent)."""
    parser = argparse.ArgumentParser()
    for flag in ("--side", "--arguments", "--weights", "--vae", "--channels"):
        parser.add_argument(flag)
    for flag in ("--size", "--runs", "--tile"):
        parser.add_argument(flag, type=int)
    args = parser.parse_args(argv)
    print(json.dumps(run_side(args.side, json.loads(args.arguments), args.weights, args.size, args.runs, args.tile,
                              args.vae, args.channels)))


def main(argv=None) -> dict:
    from edit_jax.eval.report import emit, environment
    from edit_jax.models.vae import check_tile_size

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", default="flux", choices=["flux", "qwen-image"], help="which VAE")
    parser.add_argument("--size", type=int, default=1024, help="image side, pixels")
    parser.add_argument("--runs", type=int, default=3, help="timed decodes after the first (0: time the first)")
    parser.add_argument("--tile", type=int, help="tiled decode on both sides, tile in pixels (default: untiled)")
    parser.add_argument("--channels", help="quick runs: FLUX block widths instead of 128,256,512,512, or "
                                           "Qwen-Image's base width instead of 96")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if args.size <= 0 or args.size % 8:
        raise ValueError(f"--size {args.size}: must be a positive multiple of 8 pixels (the VAE's scale)")
    if args.tile is not None:
        check_tile_size(args.tile, flag="--tile")
    arguments = diffusers_arguments(vae_config(args.vae, args.channels))
    result = {"benchmark": "vae_decode", **environment(), "vae": args.vae, "size": args.size, "tile": args.tile,
              "channels": args.channels or ("96" if args.vae == "qwen-image" else "128,256,512,512")}
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "vae.safetensors"
        write_weights(arguments, weights)
        for side in ("ours", "diffusers"):
            command = [sys.executable, str(Path(__file__).resolve()), "--side", side, "--arguments",
                       json.dumps(arguments), "--weights", str(weights), "--vae", args.vae, "--size", str(args.size),
                       "--runs", str(args.runs)]
            command += ["--tile", str(args.tile)] if args.tile else []
            command += ["--channels", args.channels] if args.channels else []
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:  # the end of the child's traceback
                lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
                raise RuntimeError(f"{side} side: {lines[-1]}")
            result[side] = json.loads(done.stdout.strip().splitlines()[-1])
    result["ours_vs_diffusers_time"] = round(result["ours"]["decode_s"] / result["diffusers"]["decode_s"], 3)
    return emit(result, args.out)


if __name__ == "__main__":
    if "--side" in sys.argv:  # a child, started by main: nothing of edit_jax before its side needs it
        child(sys.argv[1:])
    else:
        from edit_jax.eval.report import run_script

        run_script(main)
