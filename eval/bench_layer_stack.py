"""How a stack of layers should read its stacked weights: L MLP layers ([T, D] -> [T, M] -> [T, D],
residual) run in the loop forms XLA offers, timed side by side in one process, with the number
of weight slices each form's compiled HLO copies out of the stack.

    python -m edit_jax.eval.bench_layer_stack                       # D 512, M 2048, 288 tokens, 12 layers
    python -m edit_jax.eval.bench_layer_stack --tokens 1088 --runs 10

Forms: "scan" (weights as the scan's xs, as nn.scan gives them), "scan_unroll2", "fori_closed"
(the whole stack closed over, each layer indexed dynamically: what the E-DiT switch branches do),
"unrolled_static" (a Python loop with static slices of the stack) and "separate_arrays" (one array
per layer: nothing to slice; the floor). Prints JSON: median ms per form and its ratio to "scan".
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from edit_jax.eval.report import emit, environment, run_script
from edit_jax.eval.timing import time_alternating


def layer(x, w1, w2):
    return x + jax.nn.gelu(x @ w1) @ w2


def forms(num_layers: int) -> dict:
    """name -> (jitted function, whether it takes the stacked weights or a list per layer)."""

    def scan(unroll):
        return lambda x, w1, w2: jax.lax.scan(lambda c, w: (layer(c, *w), None), x, (w1, w2), unroll=unroll)[0]

    def fori_closed(x, w1, w2):
        return jax.lax.fori_loop(0, num_layers, lambda i, c: layer(c, w1[i], w2[i]), x)

    def unrolled_static(x, w1, w2):
        for i in range(num_layers):
            x = layer(x, w1[i], w2[i])
        return x

    def separate_arrays(x, weights):
        for w1, w2 in weights:
            x = layer(x, w1, w2)
        return x

    return {"scan": (jax.jit(scan(1)), True), "scan_unroll2": (jax.jit(scan(2)), True),
            "fori_closed": (jax.jit(fori_closed), True), "unrolled_static": (jax.jit(unrolled_static), True),
            "separate_arrays": (jax.jit(separate_arrays), False)}


def weight_slices(compiled_text: str, shapes: set[str]) -> int:
    """HLO instructions that write a slice of a stacked weight: [1, D, M]-shaped (dynamic) or
    [D, M]-shaped (static) slices and their fusions."""
    count = 0
    for line in compiled_text.splitlines():
        if "slice" in line and " = " in line and any(line.split(" = ", 1)[1].startswith(s) for s in shapes):
            count += 1
    return count


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--tokens", type=int, default=288)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--out")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    w1 = jnp.asarray(0.02 * rng.standard_normal((args.layers, args.dim, args.hidden)), jnp.float32)
    w2 = jnp.asarray(0.02 * rng.standard_normal((args.layers, args.hidden, args.dim)), jnp.float32)
    per_layer = [(jnp.array(w1[i]), jnp.array(w2[i])) for i in range(args.layers)]
    x = jnp.asarray(rng.standard_normal((1, args.tokens, args.dim)), jnp.float32)
    shapes = {f"f32[1,{args.dim},{args.hidden}]", f"f32[1,{args.hidden},{args.dim}]",
              f"f32[{args.dim},{args.hidden}]", f"f32[{args.hidden},{args.dim}]"}

    calls, slices = {}, {}
    for name, (fn, stacked) in forms(args.layers).items():
        operands = (x, w1, w2) if stacked else (x, per_layer)
        slices[name] = weight_slices(fn.lower(*operands).compile().as_text(), shapes)
        calls[name] = (lambda fn=fn, operands=operands: jax.block_until_ready(fn(*operands)))
        calls[name]()
    times = time_alternating(calls, args.runs)
    flops = 2 * 2 * args.layers * args.tokens * args.dim * args.hidden
    result = {"benchmark": "layer_stack", **environment(), "layers": args.layers, "dim": args.dim,
              "hidden": args.hidden, "tokens": args.tokens, "runs": args.runs,
              "median_ms": {k: round(v, 3) for k, v in times.items()},
              "over_scan": {k: round(v / times["scan"], 3) for k, v in times.items()},
              "gflop_per_s": {k: round(flops / v / 1e6, 1) for k, v in times.items()},
              "weight_slices_in_hlo": slices}
    return emit(result, args.out)


if __name__ == "__main__":
    run_script(main)
