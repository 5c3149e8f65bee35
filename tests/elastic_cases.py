"""Small FLUX and Qwen-Image models with routers, for the elastic tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import edit_jax
from edit_jax.config import FluxConfig, QwenImageConfig
from edit_jax.models.registry import example_inputs, init_variables, split_static

# mlp_ratio 3 keeps every bucket width (24, 48, 72, 96) distinct from D = 32
CONFIGS = {
    "flux": FluxConfig(
        num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
        pooled_projection_dim=16, in_channels=8, axes_dims_rope=(4, 4, 8), guidance_embeds=True, mlp_ratio=3.0,
    ),
    "qwen-image": QwenImageConfig(
        num_layers=3, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24, in_channels=16,
        out_channels=4, axes_dims_rope=(8, 4, 4), mlp_ratio=3.0,
    ),
}
FAMILIES = list(CONFIGS)


_JIT_CACHE: dict = {}


def _jitted(model, static: dict, elastic=None):
    """One compiled apply per (model, static inputs, elastic config), shared by all tests."""
    key = (model, tuple(sorted(static.items())), elastic)
    if key not in _JIT_CACHE:
        if elastic is None:
            fn = lambda v, a: model.apply(v, **a, **static)  # noqa: E731
        else:
            fn = lambda v, a, d: model.apply(v, **a, **static, elastic=elastic, decisions=d)  # noqa: E731
        _JIT_CACHE[key] = jax.jit(fn)
    return _JIT_CACHE[key]


class Case:
    def __init__(self, family: str, batch: int = 2, seed: int = 0):
        self.config = CONFIGS[family]
        self.model = edit_jax.build_model(self.config)
        variables = init_variables(self.config, seed)
        self.params, self.routers = variables["params"], variables["routers"]
        self.arrays, self.static = split_static(example_inputs(self.config, batch, height=3, width=4, num_txt=5, seed=seed))
        if "encoder_hidden_states_mask" in self.arrays:  # ragged text: sample 0 has 3 valid tokens
            self.arrays["encoder_hidden_states_mask"] = self.arrays["encoder_hidden_states_mask"].at[0, 3:].set(0)
        self.num_blocks = self.config.num_blocks
        self.hidden = self.config.mlp_hidden_dim

    def dense(self, params=None, arrays=None, config=None):
        model = self.model if config is None else edit_jax.build_model(config)
        return _jitted(model, self.static)({"params": self.params if params is None else params}, arrays or self.arrays)

    def elastic(self, elastic, decisions=None, routers=None, arrays=None, params=None):
        variables = {"params": self.params if params is None else params, "routers": self.routers if routers is None else routers}
        return _jitted(self.model, self.static, elastic)(variables, arrays or self.arrays, decisions)

    def row(self, b: int) -> dict:
        """The inputs of sample b alone (batch 1)."""
        per_sample = {"img_ids", "txt_ids"}
        return {k: (v if k in per_sample else v[b : b + 1]) for k, v in self.arrays.items()}

    def stacks(self):
        """(stack name, number of blocks, path of the elastic MLP's fc2-like kernel [L, M, D])."""
        cfg = self.config
        if isinstance(cfg, FluxConfig):
            return [("transformer_blocks", cfg.num_layers, ("ff", "fc2", "kernel")),
                    ("single_transformer_blocks", cfg.num_single_layers, ("proj_out", "kernel_mlp"))]
        return [("transformer_blocks", cfg.num_layers, ("img_mlp", "fc2", "kernel"))]


def forced(run, bucket):
    return {"run": jnp.asarray(run, bool), "bucket": jnp.asarray(bucket, jnp.int32)}


def relative(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def take_layers(tree: dict, keep: list[int]) -> dict:
    return jax.tree.map(lambda x: x[np.asarray(keep)], tree)
