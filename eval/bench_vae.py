"""Decode time and peak memory of our Flax FLUX VAE against diffusers' AutoencoderKL, same random
weights (through the conversion table), same latents; each side in its own process so that its
peak resident memory (VmHWM) is its own.

    python -m eval.bench_vae --size 1024 --runs 3            # FLUX.1's VAE config, 1024x1024
    python -m eval.bench_vae --size 1024 --tile 512          # ours decoding in 512 px tiles

Prints JSON (seconds: median of --runs after a warm-up call; peak RSS in GiB); --out writes it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def peak_rss_gib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def vae_config(channels: str | None):
    """FLUX.1's VAE config, or one with other block widths ("32,32,64,64": quick runs)."""
    from edit_jax.vae import AutoencoderKLConfig

    if not channels:
        return AutoencoderKLConfig()
    widths = tuple(int(c) for c in channels.split(","))
    return AutoencoderKLConfig(block_out_channels=widths, norm_num_groups=min(32, widths[0]))


def torch_vae(cfg, seed: int = 0):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    blocks = len(cfg.block_out_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=cfg.latent_channels,
                         block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
                         norm_num_groups=cfg.norm_num_groups, use_quant_conv=False, use_post_quant_conv=False,
                         down_block_types=("DownEncoderBlock2D",) * blocks,
                         up_block_types=("UpDecoderBlock2D",) * blocks).eval()


def run_side(side: str, size: int, runs: int, tile: int | None, channels: str | None = None) -> dict:
    import numpy as np

    config = vae_config(channels)
    latents = np.random.default_rng(0).standard_normal((1, 16, size // 8, size // 8)).astype(np.float32)
    vae = torch_vae(config)
    if side == "diffusers":
        import torch

        z = torch.from_numpy(latents)

        def decode():
            with torch.no_grad():
                return vae.decode(z).sample
    else:
        from checkpoints_convert.engine import build_params
        from checkpoints_convert.sources import from_state_dict
        from checkpoints_convert.vae import vae_table
        from edit_jax.vae import abstract_vae, decode_tiled

        abstract = abstract_vae(config)
        params = build_params(vae_table(abstract), from_state_dict(vae.state_dict()), abstract)
        del vae

        def decode():
            return decode_tiled(config, params, latents, tile_size=tile or size)

    t0 = time.perf_counter()
    decode()
    first = time.perf_counter() - t0
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        decode()
        times.append(time.perf_counter() - t0)
    return {"first_call_s": round(first, 3), "decode_s": round(sorted(times)[len(times) // 2], 3),
            "peak_rss_gib": round(peak_rss_gib(), 2)}


def main(argv=None) -> dict:
    from eval.report import emit, environment

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024, help="image side, pixels")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tile", type=int, help="our tiled decode's tile, pixels (default: one tile)")
    parser.add_argument("--channels", help="block widths instead of FLUX.1's 128,256,512,512 (quick runs)")
    parser.add_argument("--side", choices=["ours", "diffusers"], help=argparse.SUPPRESS)  # one side, in a child
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if args.side:
        print(json.dumps(run_side(args.side, args.size, args.runs, args.tile, args.channels)))
        return {}
    result = {"benchmark": "vae_decode", **environment(), "size": args.size, "tile": args.tile,
              "channels": args.channels or "128,256,512,512"}
    for side in ("ours", "diffusers"):
        command = [sys.executable, "-m", "eval.bench_vae", "--side", side, "--size", str(args.size),
                   "--runs", str(args.runs)] + (["--tile", str(args.tile)] if args.tile else []) + \
                  (["--channels", args.channels] if args.channels else [])
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        result[side] = json.loads(done.stdout.strip().splitlines()[-1])
    result["ours_vs_diffusers_time"] = round(result["ours"]["decode_s"] / result["diffusers"]["decode_s"], 3)
    return emit(result, args.out)


if __name__ == "__main__":
    main()
