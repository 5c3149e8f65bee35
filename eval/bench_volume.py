"""Times Hunyuan3D-2's volume decode (`edit_jax.models.shape_vae.decode_volume`) and states its
memory: per octree resolution, the seconds per chunk of `num_chunks` grid points (median of
`--chunks` timed calls after a compile), the whole decode's time projected from it (chunks x
seconds per chunk), the compiled chunk program's device memory (its temporaries the same at every
resolution: the point of decoding in chunks) and the host grid's bytes. At `--measure` resolutions the whole
decode is also run and timed, so the projection is checked against a measurement.

    python -m edit_jax.eval.bench_volume                                # release size, CPU
    python -m edit_jax.eval.bench_volume --set width=256 --set num_decoder_layers=4 --resolutions 64,128
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from edit_jax.eval.report import emit, environment, run_script
from edit_jax.models.shape_vae import ShapeVAE, ShapeVAEConfig, chunk_decoder, decode_volume, grid_axes, init_shape_vae


def chunk_memory_bytes(config: ShapeVAEConfig, params: dict, kv: jax.Array, axes: jax.Array, num_chunks: int) -> dict:
    """The compiled chunk program's argument, output and temporary bytes (XLA's memory analysis).

    Args:
      config, params: the ShapeVAE's. kv: the latents' keys and values [B, N, 2 width]. axes: the
        grid's coordinates [3, R + 1]. num_chunks: grid points per call.
    """
    analysis = chunk_decoder(config, num_chunks).lower(params, kv, axes, 0).compile().memory_analysis()
    if analysis is None:
        return {}
    return {"arguments": int(analysis.argument_size_in_bytes), "outputs": int(analysis.output_size_in_bytes),
            "temporaries": int(analysis.temp_size_in_bytes)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolutions", default="256,384", help="octree resolutions to report, comma-separated")
    p.add_argument("--measure", default="", help="resolutions also decoded whole and timed, comma-separated")
    p.add_argument("--num-chunks", type=int, default=8000, help="grid points per call (hy3dgen's default)")
    p.add_argument("--chunks", type=int, default=3, help="timed chunk calls per resolution")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a ShapeVAE config field")
    p.add_argument("--out", help="write the JSON result here too")
    args = p.parse_args(argv)

    config = dataclasses.replace(ShapeVAEConfig(), **{k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)})
    params = init_shape_vae(config)
    model = ShapeVAE(config)
    latents = model.apply({"params": params}, jnp.zeros((1, config.num_latents, config.embed_dim)), method=ShapeVAE.decode)
    kv = jax.block_until_ready(model.apply({"params": params}, latents, method=ShapeVAE.data_kv))
    chunk = chunk_decoder(config, args.num_chunks)
    rows = []
    for resolution in (int(r) for r in args.resolutions.split(",") if r):
        axes = jnp.asarray(np.stack(grid_axes(1.01, resolution)))
        jax.block_until_ready(chunk(params, kv, axes, 0))  # compile
        seconds = []
        for i in range(args.chunks):
            start = time.perf_counter()
            jax.block_until_ready(chunk(params, kv, axes, (i + 1) * args.num_chunks))
            seconds.append(time.perf_counter() - start)
        points = (resolution + 1) ** 3
        per_chunk = float(np.median(seconds))
        row = {"octree_resolution": resolution, "points": points, "chunks": math.ceil(points / args.num_chunks),
               "s_per_chunk": round(per_chunk, 4),
               "projected_s": round(per_chunk * math.ceil(points / args.num_chunks), 1),
               "chunk_device_bytes": chunk_memory_bytes(config, params, kv, axes, args.num_chunks),
               "host_grid_mib": round(points * 4 / 2**20, 1)}
        if str(resolution) in args.measure.split(","):
            start = time.perf_counter()
            decode_volume(config, params, latents, 1.01, resolution, args.num_chunks)
            row["measured_s"] = round(time.perf_counter() - start, 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {**environment(), "shape_vae": dataclasses.asdict(config), "num_chunks": args.num_chunks, "rows": rows}
    return emit(result, args.out)


if __name__ == "__main__":
    run_script(main)
