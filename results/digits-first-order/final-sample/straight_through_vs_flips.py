"""How well the straight-through gradient of rollout_loss="final" predicts what flipping one cell of a
step schedule does. Starts from TaylorSeer's map at interval 3 (first-order residual reuse, the
whole 12-step trajectory as the window), takes the gradient of the final-sample loss (no budget
term) with respect to the schedule's logits on training images, and beside it flips each cell
(step, block) alone and measures the loss again. Prints the two tables and how well they agree.

    python straight_through_vs_flips.py DEMO_OUT [KEY=VALUE ...]

DEMO_OUT: a folder `edit-jax demo` ran in with the same settings (its dense model is reused);
KEY=VALUE: the demo settings that run changed (`--set`'s arguments)."""

import sys
from pathlib import Path

import jax
import numpy as np
from scipy.stats import spearmanr

from edit_jax.eval import demo as demo_module
from edit_jax.train.config import TrainConfig
from edit_jax.train.step import init_schedule, rollout_value_and_grad

BATCHES, ROWS = 4, 64


def main(out: Path, overrides: list[str]) -> dict:
    demo = demo_module.Demo.prepared(out, overrides)
    settings = demo.s
    steps = settings.sample_steps
    config = TrainConfig(trainable="schedule", objective="rollout", closed="reuse", rollout_loss="final",
                         reuse_max=settings.reuse_max, reuse_order=settings.reuse_order, rollout_steps=steps,
                         rollout_schedule=steps, schedule_init_interval=3, lambda_g=0.0)
    value_and_grad = rollout_value_and_grad(config, demo.model)
    loss_and_grad = jax.jit(lambda logits, batch, key: value_and_grad(
        {"schedule": logits}, {"params": demo.base}, batch, key))
    batches = []
    for i in range(BATCHES):
        inputs = demo.model_inputs(demo.train, ROWS, 1000 + i, noisy=False)
        batches.append({"latents": inputs.pop("hidden_states"), **{k: v for k, v in inputs.items() if k != "timestep"}})
    keys = [jax.random.key(i) for i in range(BATCHES)]

    def mean_loss_and_grad(logits):
        results = [loss_and_grad(logits, b, k) for b, k in zip(batches, keys)]
        return (float(np.mean([float(r[0][0]) for r in results])),
                np.mean([np.asarray(r[1]["schedule"]) for r in results], axis=0))

    logits = init_schedule(config, demo.config)
    base, grad = mean_loss_and_grad(logits)
    p = np.asarray(jax.nn.sigmoid(logits))
    opens = p >= config.tau
    predicted = grad / (p * (1 - p)) * np.where(opens, -1.0, 1.0)  # d loss / d gate, times the flip's change of gate
    measured = np.zeros_like(predicted)
    for step in range(steps):
        for block in range(demo.config.num_blocks):
            flipped = logits.at[step, block].multiply(-1.0)
            measured[step, block] = mean_loss_and_grad(flipped)[0] - base
    movable = np.abs(measured) > 1e-9  # a flip that changes nothing (step 0 always computes) is left out
    return {"loss": base, "opens": opens, "predicted": predicted, "measured": measured,
            "spearman": float(spearmanr(predicted[movable], measured[movable])[0]),
            "sign_agreement": float(np.mean(np.sign(predicted[movable]) == np.sign(measured[movable]))),
            "opening_helps": measured[~opens & movable], "closing_hurts": measured[opens & movable]}


if __name__ == "__main__":
    result = main(Path(sys.argv[1]), sys.argv[2:])
    np.set_printoptions(precision=5, suppress=False, linewidth=140)
    print(f"final-sample loss of TaylorSeer's map at interval 3: {result['loss']:.6f}")
    print("cells open (1) at the map:\n", result["opens"].astype(int))
    print("predicted change of the loss by flipping each cell (straight-through gradient):\n", result["predicted"])
    print("measured change of the loss by flipping each cell:\n", result["measured"])
    print(f"Spearman rank correlation {result['spearman']:.3f}; sign agreement {result['sign_agreement']:.3f}")
    print(f"opening a closed cell: measured change from {result['opening_helps'].min():.6f} to "
          f"{result['opening_helps'].max():.6f}, {np.mean(result['opening_helps'] < 0):.2f} of them lower the loss")
    print(f"closing an open cell: measured change from {result['closing_hurts'].min():.6f} to "
          f"{result['closing_hurts'].max():.6f}, {np.mean(result['closing_hurts'] > 0):.2f} of them raise the loss")
