"""Times how long the model takes to trace, lower and compile, at any size and without weights:
params and routers are abstract arrays, so a full-size model needs no memory for them. Modes: the
dense forward, the forward with forced decisions and with routers (infer: a 5-way switch per
block), and router training's whole update (train mode's loss, its gradient and AdamW, the step
`edit-jax train` compiles). Each block stack compiles one block body per branch, whatever its
depth, so the times should hardly grow with the number of layers (target: under 60 s at full size).

    python -m edit_jax.eval.bench_compile --preset flux-dev --height 64 --width 64 --txt 512 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

import edit_jax
from edit_jax.models.registry import abstract_params, example_inputs, split_static
from edit_jax.eval.bench_elastic import forwards
from edit_jax.eval.bench_forward import config_from, model_arguments
from edit_jax.eval.report import emit, environment, run_script
from edit_jax.train.config import TrainConfig
from edit_jax.train.data import shared_inputs, synthetic_batch
from edit_jax.train.loop import split_trainable
from edit_jax.train.step import make_optimizer, make_train_step

MODES = ("dense", "forced", "infer", "train_step")


def programs(config, batch: int, height: int, width: int, txt: int) -> dict:
    """{mode: (jitted function, its arguments: abstract params, routers and optimizer state)} of
    the model `config` at this input size: the forwards the eval scripts time, and the train step.

    Args:
      config: the model config. batch: B. height, width: packed tokens per side. txt: text tokens.
    """
    model = edit_jax.build_model(config)
    variables = {c: abstract_params(config, c) for c in ("params", "routers")}
    arrays, static = split_static(example_inputs(config, batch, height, width, txt))  # inputs are small: concrete
    blocks = config.num_blocks
    decisions = {"run": jax.ShapeDtypeStruct((blocks,), jnp.bool_), "bucket": jax.ShapeDtypeStruct((blocks,), jnp.int32)}
    jitted = forwards(model, static)

    train_config = TrainConfig(batch_size=batch, height=height, width=width, num_txt=txt)  # routers train, base frozen
    optimizer = make_optimizer(train_config)
    trainable, frozen = split_trainable(train_config, variables)
    step = make_train_step(train_config, model, optimizer, shared_inputs(config, height, width, txt))
    train_batch = jax.eval_shape(lambda: synthetic_batch(config, train_config, 0))
    train_batch.pop("label")
    return {
        "dense": (jitted["dense"], (variables, arrays)),
        "forced": (jitted["forced"], (variables, arrays, decisions)),
        "infer": (jitted["infer"], (variables, arrays)),
        "train_step": (jax.jit(step), (trainable, jax.eval_shape(optimizer.init, trainable), frozen, train_batch,
                                       jax.ShapeDtypeStruct((), jnp.int32))),
    }


def timed_compile(fn, args) -> dict:
    """Seconds to trace, lower (to StableHLO) and compile fn at these arguments."""
    t0 = time.perf_counter()
    traced = fn.trace(*args)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    lowered.compile()
    t3 = time.perf_counter()
    return {"trace_s": round(t1 - t0, 3), "lower_s": round(t2 - t1, 3), "compile_s": round(t3 - t2, 3),
            "total_s": round(t3 - t0, 3)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(p)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--out", help="write the JSON result here too")
    args = p.parse_args(argv)

    config = config_from(args)
    fns = programs(config, args.batch, args.height, args.width, args.txt)
    times, cached = {}, jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)  # a persistent cache's hit is not a compile
    try:
        for mode in args.modes:
            times[mode] = timed_compile(*fns[mode])
            print(f"{mode}: trace {times[mode]['trace_s']:.2f} s, lower {times[mode]['lower_s']:.2f} s, "
                  f"compile {times[mode]['compile_s']:.2f} s", flush=True)
    finally:
        jax.config.update("jax_enable_compilation_cache", cached)
    return emit({
        **environment(),
        "preset": args.preset,
        "overrides": args.set,
        "tokens": {"image": args.height * args.width, "text": args.txt, "batch": args.batch},
        "dtype": args.dtype,
        "attention": args.attention,
        "seconds": times,
    }, args.out)


if __name__ == "__main__":
    run_script(main)
