"""`edit-jax sample`, `eval` and `smoke`: sampling from prompt embeddings, and what it costs."""

from __future__ import annotations

import json

from edit_jax.checkpoint.paths import resolve
from edit_jax.cli.common import (EMBEDDINGS_HELP, add_attention_argument, add_dtype_argument, add_elastic_arguments,
                                 add_mesh_argument, add_sampling_arguments, add_step_cache_arguments, at_least,
                                 check_output_folder, earlier_outputs, mesh_of, remove_stale_outputs, step_cache_of)
from edit_jax.config import PRESETS, resolve_dtype
from edit_jax.elastic.mechanism import ElasticConfig
from edit_jax.eval.sampling_eval import evaluate_checkpoint
from edit_jax.eval.smoke import run_smoke
from edit_jax.models.vae import check_tile_size
from edit_jax.pipelines.calibrate_magcache import calibrate_mag_cache
from edit_jax.pipelines.sample_embeddings import sample_embeddings
from edit_jax.sampling.calibration import MAG_RATIOS_FILE
from edit_jax.sampling.embeddings import existing_file
from edit_jax.sampling.sampler import SamplerConfig


def cmd_sample(args) -> int:
    out = check_output_folder(args.out, "sample")
    earlier = earlier_outputs(out, "sample")
    if args.elastic != "infer" and (args.cache or args.fresh_routers):
        raise ValueError(f"--{'cache' if args.cache else 'fresh-routers'} acts on E-DiT's routers: add --elastic infer")
    step_cache = step_cache_of(args, resolve(args.ckpt) / MAG_RATIOS_FILE)
    if args.elastic == "schedule" and step_cache is not None:
        raise ValueError("--elastic schedule runs the checkpoint's learned step schedule: give no --step-cache with it")
    elastic = ElasticConfig(  # its flags checked before any weights are read
        mode="dense" if args.elastic == "schedule" else args.elastic, tau=args.tau, decision=args.decision,
        cache=args.cache, cache_start=args.cache_start, delta_margin=args.delta_margin, max_reuse=args.max_reuse,
        step_cache=step_cache)
    elastic = None if elastic.runs_base_model else elastic
    sampler = SamplerConfig(num_steps=args.steps, guidance_scale=args.guidance, true_cfg_scale=args.true_cfg,
                            cfg_mode=args.cfg_mode)
    summary = sample_embeddings(args.ckpt, args.embeddings, out, height=args.height, width=args.width, sampler=sampler,
                                seed=args.seed, elastic=elastic, fresh_routers=args.fresh_routers,
                                batch_size=args.batch_size, mesh=mesh_of(args), dtype=args.dtype,
                                attention=args.attention, schedule=args.elastic == "schedule")
    remove_stale_outputs(out, earlier)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_eval(args) -> int:
    out = check_output_folder(args.out, "eval")
    earlier = earlier_outputs(out, "eval")
    existing_file(args.embeddings, "--embeddings")
    check_tile_size(args.tile_size)
    elastic = ElasticConfig(mode="infer", tau=args.tau, decision=args.decision,
                            cache_start=args.steps // 3 if args.cache_start is None else args.cache_start,
                            delta_margin=args.delta_margin, max_reuse=args.max_reuse)
    summary = evaluate_checkpoint(args.ckpt, args.embeddings, out, args.height, args.width, args.steps, args.seed,
                                  elastic, args.guidance, args.repeats, args.vae, args.tile_size, mesh_of(args),
                                  resolve_dtype(args.dtype), args.true_cfg, args.batch_size, args.attention,
                                  step_cache_of(args, resolve(args.ckpt) / MAG_RATIOS_FILE))
    remove_stale_outputs(out, earlier)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_calibrate_magcache(args) -> int:
    sampler = SamplerConfig(num_steps=args.steps, guidance_scale=args.guidance, true_cfg_scale=args.true_cfg)
    summary = calibrate_mag_cache(args.ckpt, args.embeddings, sampler=sampler, height=args.height, width=args.width,
                                  seed=args.seed, out=args.out, batch_size=args.batch_size, mesh=mesh_of(args),
                                  dtype=args.dtype, attention=args.attention)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_smoke(args) -> int:
    summary = run_smoke(args.preset, check_output_folder(args.out, "smoke"), seed=args.seed)
    print(json.dumps(summary, indent=2))
    return 0


def add_smoke(command) -> None:
    smoke = command("smoke", "random-weight model: forward, save, reload, compare, sample dense and with E-DiT (no downloads)")
    smoke.add_argument("--preset", default="flux-small", choices=sorted(PRESETS), help="model size (see docs/model.md: Presets)")
    smoke.add_argument("--out", default="edit-jax-smoke", help="folder for the checkpoint, demo.json and router_map.png")
    smoke.add_argument("--seed", type=at_least(0), default=0, help="seed of the random weights, inputs and noise")
    smoke.set_defaults(run=cmd_smoke)


def add_eval(command) -> None:
    ev = command("eval", "dense vs E-DiT vs E-DiT + cache (vs a per-step cache with --step-cache) on a checkpoint with "
                         "routers and your prompt embeddings: "
                         "FLOPs, wall-clock, routing, PSNR/SSIM to dense from the same noise", EMBEDDINGS_HELP)
    ev.add_argument("ckpt", help="edit-jax checkpoint folder with routers")
    ev.add_argument("--embeddings", required=True, help="prompt embeddings (.npz/.safetensors; keys below)")
    ev.add_argument("--out", default="edit-jax-eval", help="folder for eval.json, router_map.png, fidelity_vs_flops.png")
    add_sampling_arguments(ev, seed_help="seed of the initial noise (the same for every method)")
    add_elastic_arguments(ev, cache_start=None)
    add_step_cache_arguments(ev, ratios_default=f"CKPT/{MAG_RATIOS_FILE}")
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


def add_sample(command) -> None:
    smp = command("sample", "sample latents from prompt embeddings (Euler flow matching, E-DiT optional)", EMBEDDINGS_HELP)
    smp.add_argument("ckpt", help="edit-jax checkpoint folder")
    smp.add_argument("--embeddings", required=True, help="prompt embeddings (.npz/.safetensors; keys below)")
    smp.add_argument("--out", required=True,
                     help="folder for latents.npy, summary.json and (E-DiT) records.npz and router_map.png")
    add_sampling_arguments(smp)
    smp.add_argument("--true-cfg", type=float, default=1.0, help="> 1: true CFG with the negative_* embeddings")
    smp.add_argument("--cfg-mode", default="batched", choices=["batched", "sequential"],
                     help="true CFG as one batch of 2B rows, or two calls per step as the released E-DiT code")
    smp.add_argument("--elastic", default="dense", choices=["dense", "infer", "schedule"],
                     help="dense: routers off; infer: E-DiT; schedule: the checkpoint's learned step schedule "
                          "(`edit-jax train trainable=schedule`)")
    smp.add_argument("--fresh-routers", action="store_true",
                     help="with --elastic infer on a checkpoint without routers: fresh full-capacity routers")
    smp.add_argument("--cache", action="store_true", help="router-guided block cache: reuse a block's last residual when p is borderline")
    add_elastic_arguments(smp, cache_start=15)
    add_step_cache_arguments(smp, ratios_default=f"CKPT/{MAG_RATIOS_FILE}")
    smp.add_argument("--batch-size", type=at_least(1), help="prompts sampled together (default: the whole file; E-DiT's "
                                                           "batch decisions are per batch)")
    add_mesh_argument(smp)
    add_dtype_argument(smp)
    add_attention_argument(smp)
    smp.set_defaults(run=cmd_sample)


def add_calibrate_magcache(command) -> None:
    cal = command("calibrate-magcache", "MagCache's per-step magnitude ratios of a checkpoint, from a dense run over "
                                        "your prompt embeddings, written beside it (for sample --step-cache mag-cache)",
                  EMBEDDINGS_HELP)
    cal.add_argument("ckpt", help="edit-jax checkpoint folder")
    cal.add_argument("--embeddings", required=True, help="prompt embeddings (.npz/.safetensors; keys below)")
    cal.add_argument("--out", help=f"the ratios file (default: CKPT/{MAG_RATIOS_FILE})")
    add_sampling_arguments(cal)
    cal.add_argument("--true-cfg", type=float, default=1.0, help="> 1: true CFG with the negative_* embeddings")
    cal.add_argument("--batch-size", type=at_least(1), help="prompts sampled together (default: the whole file)")
    add_mesh_argument(cal)
    add_dtype_argument(cal)
    add_attention_argument(cal)
    cal.set_defaults(run=cmd_calibrate_magcache)
