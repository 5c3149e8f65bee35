"""`edit-jax generate`, `generate-3d`, `encode-prompts` and `prepare-data`: the pipelines from
prompts to images, images to meshes, and images to training data."""

from __future__ import annotations

import json
import sys

import numpy as np

from edit_jax.checkpoint.paths import resolve
from edit_jax.cli.common import (add_attention_argument, add_dtype_argument, add_elastic_arguments,
                                 add_embeddings_cache_argument, add_encoders_dtype_argument, add_mesh_argument,
                                 add_prompts_arguments, add_sampling_arguments, add_step_cache_arguments, at_least,
                                 check_output_folder, earlier_outputs, embeddings_cache_of, mesh_of, read_prompts,
                                 remove_stale_outputs, step_cache_of)
from edit_jax.elastic.mechanism import ElasticConfig
from edit_jax.pipelines.encode_prompts import encode_prompts
from edit_jax.pipelines.generate import generate
from edit_jax.pipelines.generate_3d import MESH_FORMATS, generate_3d
from edit_jax.pipelines.prepare_data import prepare_data
from edit_jax.sampling.calibration import MAG_RATIOS_FILE
from edit_jax.sampling.sampler import SamplerConfig


def cmd_generate(args) -> int:
    prompts = read_prompts(args)
    out = check_output_folder(args.out, "generate")
    earlier = earlier_outputs(out, "generate")
    if args.elastic == "dense" and (args.cache or args.cache_start is not None):
        raise ValueError("--cache and --cache-start act on E-DiT's routers: add --elastic infer")
    if args.cache_start is not None and not args.cache:
        raise ValueError("--cache-start needs --cache")
    sampler = SamplerConfig(num_steps=args.steps, guidance_scale=args.guidance, true_cfg_scale=args.true_cfg)
    transformer = resolve(args.transformer) if args.transformer else resolve(args.model) / "transformer"
    elastic = ElasticConfig(
        mode=args.elastic, tau=args.tau, decision=args.decision, cache=args.cache, delta_margin=args.delta_margin,
        max_reuse=args.max_reuse, cache_start=args.steps // 3 if args.cache_start is None else args.cache_start,
        step_cache=step_cache_of(args, transformer / MAG_RATIOS_FILE))
    elastic = None if elastic.runs_base_model else elastic
    result = generate(args.model, prompts, args.out, sampler=sampler, negative_prompt=args.negative_prompt,
                      height=args.height, width=args.width, seed=args.seed, elastic=elastic,
                      max_sequence_length=args.max_sequence_length, tile_size=args.tile_size,
                      embeddings_cache=embeddings_cache_of(args),
                      progress=not args.quiet, mesh=mesh_of(args), dtype=args.dtype, batch_size=args.batch_size,
                      transformer=args.transformer, attention=args.attention)
    remove_stale_outputs(out, earlier)
    print(json.dumps(result["summary"], indent=2))
    return 0


def cmd_generate_3d(args) -> int:
    out = check_output_folder(args.out, "generate-3d")
    earlier = earlier_outputs(out, "generate-3d")
    if args.elastic == "dense" and args.cache:
        raise ValueError("--cache acts on E-DiT's routers: add --elastic infer")
    features = None
    if args.features:
        with np.load(resolve(args.features)) as stored:
            if "image_features" not in stored:
                raise ValueError(f"--features {args.features} holds no image_features array [B, T, C]")
            features = stored["image_features"]
    elastic = ElasticConfig(mode=args.elastic, tau=args.tau, decision=args.decision, cache=args.cache,
                            delta_margin=args.delta_margin, max_reuse=args.max_reuse,
                            cache_start=args.steps // 3 if args.cache_start is None else args.cache_start,
                            step_cache=step_cache_of(args, resolve(args.model) / MAG_RATIOS_FILE))
    sampler = SamplerConfig(num_steps=args.steps, true_cfg_scale=args.guidance_scale, guidance_scale=args.guidance_scale)
    record = generate_3d(args.model, args.images, args.out, shape_vae=args.shape_vae, image_encoder=args.image_encoder,
                         features=features,
                         sampler=sampler, elastic=None if elastic.runs_base_model else elastic, seed=args.seed,
                         octree_resolution=args.octree_resolution, num_chunks=args.num_chunks, box_v=args.box_v,
                         mc_level=args.mc_level, mesh_format=args.format, progress=not args.quiet)
    remove_stale_outputs(out, earlier)
    print(json.dumps(record, indent=2))
    return 0


def cmd_encode_prompts(args) -> int:
    summary = encode_prompts(args.model, read_prompts(args), args.out, negative_prompt=args.negative_prompt,
                             max_sequence_length=args.max_sequence_length, batch_size=args.batch_size,
                             embeddings_cache=embeddings_cache_of(args),
                             overwrite=args.overwrite, progress=not args.quiet, dtype=args.dtype)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_prepare_data(args) -> int:
    report = prepare_data(args.images, args.out, args.model, captions=args.captions, resolution=args.resolution,
                          max_sequence_length=args.max_sequence_length, overwrite=args.overwrite,
                          progress=not args.quiet, dtype=args.dtype)
    for row in report["skipped"]:
        print(f"skipped {row['file']}: {row['reason']}", file=sys.stderr)
    print(json.dumps({k: v for k, v in report.items() if k != "skipped"} | {"skipped": len(report["skipped"])}, indent=2))
    return 0


def add_generate(command) -> None:
    gen = command("generate", "prompts -> PNG images with a FLUX.1 or Qwen-Image pipeline folder (text encoders, "
                              "transformer, VAE)")
    gen.add_argument("--model", required=True, help="diffusers pipeline folder: model_index.json, transformer/ "
                                                      "(diffusers weights or an edit-jax checkpoint), vae/, scheduler/, "
                                                      "text encoders and tokenizers")
    gen.add_argument("--transformer", help="weights to use instead of the folder's transformer/: an edit-jax checkpoint "
                                            "(a training run's RUN_DIR/edit-jax for --elastic infer), or diffusers, "
                                            "BFL or E-DiT release weights")
    add_prompts_arguments(gen)
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
    add_step_cache_arguments(gen, ratios_default=f"the transformer's folder's {MAG_RATIOS_FILE}")
    gen.add_argument("--tile-size", type=at_least(1), default=1024, help="VAE decode tile, pixels (larger images decode in tiles)")
    gen.add_argument("--batch-size", type=at_least(1), default=4,
                     help="prompts encoded, denoised and decoded together (with per-image decisions, the images "
                          "do not depend on it)")
    add_embeddings_cache_argument(gen)
    add_mesh_argument(gen)
    add_dtype_argument(gen)
    add_attention_argument(gen)
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.set_defaults(run=cmd_generate)


def add_generate_3d(command) -> None:
    gen = command("generate-3d", "images -> meshes (.glb/.obj) with a converted Hunyuan3D-2 checkpoint: DINOv2 image "
                                 "features, the shape DiT (dense or E-DiT), the ShapeVAE and marching cubes")
    gen.add_argument("images", nargs="*", help="image files (an alpha channel marks the object; else the whole image)")
    gen.add_argument("--model", required=True, help="an edit-jax checkpoint from `edit-jax convert hunyuan3d` "
                                                    "(its routers for --elastic infer)")
    gen.add_argument("--shape-vae", help="the converted checkpoint holding the ShapeVAE, when --model is a training "
                                         "run's checkpoint (default: --model)")
    gen.add_argument("--image-encoder", help="the Hunyuan3D-2 release folder (its config.yaml and conditioner "
                                             "weights) or a transformers Dinov2 folder")
    gen.add_argument("--features", help="an .npz with image_features [B, T, C] instead of images and an encoder")
    gen.add_argument("--out", default="edit-jax-meshes", help="folder for mesh-N.glb, mesh-N.png, generate_3d.json")
    gen.add_argument("--steps", type=at_least(1), default=50, help="denoising steps (hy3dgen's num_inference_steps)")
    gen.add_argument("--guidance-scale", type=float, default=5.0, help="classifier-free guidance against zero features "
                                                                        "(a guidance-distilled DiT embeds it instead)")
    gen.add_argument("--seed", type=int, default=0, help="seed of the initial latents")
    gen.add_argument("--octree-resolution", type=at_least(2), default=384, help="grid cells per side of the volume")
    gen.add_argument("--num-chunks", type=at_least(1), default=8000, help="grid points decoded per call (fixed memory)")
    gen.add_argument("--box-v", type=float, default=1.01, help="half-width of the box the volume covers")
    gen.add_argument("--mc-level", type=float, default=0.0, help="the level of the surface in the decoded logits")
    gen.add_argument("--format", default="glb", choices=MESH_FORMATS, help="mesh file format")
    gen.add_argument("--elastic", default="dense", choices=["dense", "infer"], help="infer: E-DiT with the checkpoint's routers")
    gen.add_argument("--cache", action="store_true", help="router-guided block cache (with --elastic infer)")
    add_elastic_arguments(gen, cache_start=None, decision="sample")
    add_step_cache_arguments(gen, ratios_default=f"the checkpoint's {MAG_RATIOS_FILE}")
    gen.add_argument("--quiet", action="store_true", help="no progress bars")
    gen.set_defaults(run=cmd_generate_3d)


def add_encode_prompts(command) -> None:
    enc = command("encode-prompts", "prompts -> an embeddings .npz for `sample` and `eval` (the text encoders of a "
                                    "FLUX.1 or Qwen-Image pipeline folder)")
    enc.add_argument("--model", required=True, help="diffusers pipeline folder: model_index.json, the text encoders and "
                                                      "their tokenizers (transformer/ and vae/ are not read)")
    add_prompts_arguments(enc)
    enc.add_argument("--negative-prompt", help="also store negative_* embeddings of this prompt, for true CFG")
    enc.add_argument("--out", required=True, help="the .npz to write")
    enc.add_argument("--max-sequence-length", type=at_least(1), default=512, help="text tokens (FLUX: T5's; Qwen-Image: at most)")
    enc.add_argument("--batch-size", type=at_least(1), default=8, help="prompts encoded at once")
    add_embeddings_cache_argument(enc)
    enc.add_argument("--overwrite", action="store_true", help="replace an earlier embeddings file at --out")
    add_encoders_dtype_argument(enc)
    enc.add_argument("--quiet", action="store_true", help="no progress bars")
    enc.set_defaults(run=cmd_encode_prompts)


def add_prepare_data(command) -> None:
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
