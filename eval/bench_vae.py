"""Decode time and peak memory of our Flax VAEs against diffusers' (AutoencoderKL for FLUX.1,
AutoencoderKLQwenImage for Qwen-Image), same random weights (through the conversion table), same
latents; each side in its own process so that its peak resident memory (VmHWM) is its own (so
the project's modules are imported inside the functions of the side that needs them: the
diffusers side never loads JAX).

    python -m edit_jax.eval.bench_vae --size 1024 --runs 3                      # FLUX.1's VAE, 1024x1024
    python -m edit_jax.eval.bench_vae --vae qwen-image --size 1024              # Qwen-Image's VAE
    python -m edit_jax.eval.bench_vae --vae qwen-image --size 2048 --tile 1024  # both sides in 1024 px tiles

Prints JSON (seconds: median of --runs after a warm-up call, or the first call with --runs 0;
peak RSS in GiB); --out writes it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from edit_jax.eval.report import run_script


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


def torch_vae(cfg, seed: int = 0):
    import dataclasses

    import torch
    from diffusers import AutoencoderKL, AutoencoderKLQwenImage

    from edit_jax.models.qwen_image_vae import AutoencoderKLQwenImageConfig

    torch.manual_seed(seed)
    if isinstance(cfg, AutoencoderKLQwenImageConfig):
        return AutoencoderKLQwenImage(**{k: list(v) if isinstance(v, tuple) else v
                                         for k, v in dataclasses.asdict(cfg).items()}).eval()
    blocks = len(cfg.block_out_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=cfg.latent_channels,
                         block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
                         norm_num_groups=cfg.norm_num_groups, use_quant_conv=False, use_post_quant_conv=False,
                         down_block_types=("DownEncoderBlock2D",) * blocks,
                         up_block_types=("UpDecoderBlock2D",) * blocks).eval()


def enable_torch_tiling(vae, tile: int) -> None:
    """diffusers' tiled decode at a tile of `tile` pixels, overlapping by a quarter (as ours)."""
    from diffusers import AutoencoderKLQwenImage

    if isinstance(vae, AutoencoderKLQwenImage):
        vae.enable_tiling(tile_sample_min_height=tile, tile_sample_min_width=tile,
                          tile_sample_stride_height=tile * 3 // 4, tile_sample_stride_width=tile * 3 // 4)
    else:
        vae.enable_tiling()
        vae.tile_sample_min_size, vae.tile_latent_min_size = tile, tile // 8


def run_side(side: str, vae_name: str, size: int, runs: int, tile: int | None, channels: str | None = None) -> dict:
    """One side's decode of random latents: its time and peak memory (run in a process of its own).

    Args:
      side: "ours" or "diffusers". vae_name: "flux" or "qwen-image". size: the image's side,
        pixels. runs: timed decodes. tile: the tile's side (None: whole). channels: the VAE's block
        widths (None: the real model's).
    """
    import numpy as np

    config = vae_config(vae_name, channels)
    latents = np.random.default_rng(0).standard_normal((1, 16, size // 8, size // 8)).astype(np.float32)
    vae = torch_vae(config)
    if side == "diffusers":
        import torch

        z = torch.from_numpy(latents)
        if config.clamps_output:  # the video VAE takes a frame axis
            z = z[:, :, None]
        if tile:
            enable_torch_tiling(vae, tile)

        def decode():
            with torch.no_grad():
                return vae.decode(z).sample
    else:
        from edit_jax.checkpoints_convert.engine import build_params
        from edit_jax.checkpoints_convert.sources import from_state_dict
        from edit_jax.checkpoints_convert.vae import vae_table
        from edit_jax.models.vae import abstract_vae, decode_tiled

        abstract = abstract_vae(config)
        params = build_params(vae_table(abstract), from_state_dict(vae.state_dict()), abstract)
        del vae

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
    return {"first_call_s": round(first, 3), "decode_s": round(sorted(times)[len(times) // 2], 3),
            "peak_rss_gib": round(peak_rss_gib(), 2)}


def main(argv=None) -> dict:
    from edit_jax.eval.report import emit, environment

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", default="flux", choices=["flux", "qwen-image"], help="which VAE")
    parser.add_argument("--size", type=int, default=1024, help="image side, pixels")
    parser.add_argument("--runs", type=int, default=3, help="timed decodes after the first (0: time the first)")
    parser.add_argument("--tile", type=int, help="tiled decode on both sides, tile in pixels (default: untiled)")
    parser.add_argument("--channels", help="quick runs: FLUX block widths instead of 128,256,512,512, or "
                                           "Qwen-Image's base width instead of 96")
    parser.add_argument("--side", choices=["ours", "diffusers"], help=argparse.SUPPRESS)  # one side, in a child
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if args.size <= 0 or args.size % 8:
        raise ValueError(f"--size {args.size}: must be a positive multiple of 8 pixels (the VAE's scale)")
    if args.side:  # a child measuring one side, started below once the flags were checked
        print(json.dumps(run_side(args.side, args.vae, args.size, args.runs, args.tile, args.channels)))
        return {}
    if args.tile is not None:
        from edit_jax.models.vae import check_tile_size  # here, not above: the diffusers side's child must not load JAX

        check_tile_size(args.tile, flag="--tile")
    result = {"benchmark": "vae_decode", **environment(), "vae": args.vae, "size": args.size, "tile": args.tile,
              "channels": args.channels or ("96" if args.vae == "qwen-image" else "128,256,512,512")}
    for side in ("ours", "diffusers"):
        command = [sys.executable, "-m", "edit_jax.eval.bench_vae", "--side", side, "--vae", args.vae, "--size", str(args.size),
                   "--runs", str(args.runs)] + (["--tile", str(args.tile)] if args.tile else []) + \
                  (["--channels", args.channels] if args.channels else [])
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:  # the child's own last line: "eval.bench_vae: error: ..." or its traceback's end
            lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
            raise (ValueError if done.returncode == 2 else RuntimeError)(
                f"{side} side: {lines[-1].removeprefix('eval.bench_vae: error: ')}")
        result[side] = json.loads(done.stdout.strip().splitlines()[-1])
    result["ours_vs_diffusers_time"] = round(result["ours"]["decode_s"] / result["diffusers"]["decode_s"], 3)
    return emit(result, args.out)


if __name__ == "__main__":
    run_script(main)
