"""Qwen-Image conversion tables: the diffusers layout, and the released E-DiT checkpoint (the
same DiT keys plus `gate_mlps.{i}.*` routers, SPEC section 6).

Routers go to their own tree (the model's "routers" collection), stacked along the layer axis
like the blocks they sit in:

    transformer_blocks/router/img_mod/linear/{kernel [L, D, 3D], bias}  <- gate_mlps.{i}.img_mod.1
    transformer_blocks/router/proj/{kernel [L, D, 128], bias}           <- gate_mlps.{i}.out.0
    transformer_blocks/router/gate_head/{kernel [L, 128, 1], bias}      <- gate_mlps.{i}.out.2
    transformer_blocks/router/width_head/{kernel [L, 128, 4], bias}     <- gate_mlps.{i}.width_head
"""

from __future__ import annotations

from edit_jax.config import QwenImageConfig
from edit_jax.checkpoints_convert.configs import reconcile_config, with_recorded_activation
from edit_jax.checkpoints_convert import tables
from edit_jax.checkpoints_convert.tables import Src, input_linear, linear, scale, stored_order

def diffusers_table(cfg: QwenImageConfig) -> dict[str, Src]:
    """Our params <- diffusers QwenImageTransformer2DModel state dict."""
    b = "transformer_blocks.{i}"
    order = lambda axis: stored_order(cfg.mlp_hidden_dim, cfg.width_groups, axis)  # noqa: E731
    return {
        **linear("img_in", "img_in"),
        **scale("txt_norm", "txt_norm.weight"),
        **linear("txt_in", "txt_in"),
        **linear("time_text_embed/timestep_embedder/linear_1", "time_text_embed.timestep_embedder.linear_1"),
        **linear("time_text_embed/timestep_embedder/linear_2", "time_text_embed.timestep_embedder.linear_2"),
        # blocks, stacked over {i}
        **linear("transformer_blocks/img_mod/linear", f"{b}.img_mod.1"),
        **linear("transformer_blocks/txt_mod/linear", f"{b}.txt_mod.1"),
        **linear("transformer_blocks/attn/to_q", f"{b}.attn.to_q"),
        **linear("transformer_blocks/attn/to_k", f"{b}.attn.to_k"),
        **linear("transformer_blocks/attn/to_v", f"{b}.attn.to_v"),
        **linear("transformer_blocks/attn/add_q_proj", f"{b}.attn.add_q_proj"),
        **linear("transformer_blocks/attn/add_k_proj", f"{b}.attn.add_k_proj"),
        **linear("transformer_blocks/attn/add_v_proj", f"{b}.attn.add_v_proj"),
        **scale("transformer_blocks/attn/norm_q", f"{b}.attn.norm_q.weight"),
        **scale("transformer_blocks/attn/norm_k", f"{b}.attn.norm_k.weight"),
        **scale("transformer_blocks/attn/norm_added_q", f"{b}.attn.norm_added_q.weight"),
        **scale("transformer_blocks/attn/norm_added_k", f"{b}.attn.norm_added_k.weight"),
        **linear("transformer_blocks/attn/to_out", f"{b}.attn.to_out.0"),
        **linear("transformer_blocks/attn/to_add_out", f"{b}.attn.to_add_out"),
        **linear("transformer_blocks/img_mlp/fc1", f"{b}.img_mlp.net.0.proj", *order(0)),
        **input_linear("transformer_blocks/img_mlp/fc2", f"{b}.img_mlp.net.2", *order(1)),
        **linear("transformer_blocks/txt_mlp/fc1", f"{b}.txt_mlp.net.0.proj"),
        **linear("transformer_blocks/txt_mlp/fc2", f"{b}.txt_mlp.net.2"),
        **linear("norm_out/linear", "norm_out.linear"),
        **linear("proj_out", "proj_out"),
    }


def router_table(cfg: QwenImageConfig | None = None) -> dict[str, Src]:
    """Our router tree <- the release's gate_mlps.{i}.*, stacked over {i} (one stack: the config
    does not change the table; taken for the same signature as FLUX's)."""
    return tables.stacked_router_table((("transformer_blocks", 0),))


TABLES = {"diffusers": diffusers_table, "edit-release": diffusers_table}


def detect_format(keys) -> str:
    if any(k.startswith("gate_mlps.") for k in keys):
        return "edit-release"
    if any(k.startswith("transformer_blocks.") for k in keys):
        return "diffusers"
    raise ValueError("cannot tell the Qwen-Image checkpoint format: no 'transformer_blocks.*' tensors")


def prepare(source, fmt: str = "auto", config: QwenImageConfig | None = None):
    """(config, base table, format, router table or None) for a Qwen-Image source.

    The release was trained with the x * sigmoid(1.702 x) MLP activation: its config records it,
    unless the file's metadata records another (`edit-jax export` writes it)."""
    if fmt == "auto":
        fmt = detect_format(source.keys())
    if fmt not in TABLES:
        raise ValueError(f"unknown Qwen-Image format {fmt!r}; choose auto, {', '.join(TABLES)}")
    config = reconcile_config(source, config, "qwen-image")
    if fmt == "edit-release":
        config = with_recorded_activation(config, source, default="sigmoid_gelu")
        return config, TABLES[fmt](config), fmt, router_table()
    return with_recorded_activation(config, source), TABLES[fmt](config), fmt, None


def more_trees(source) -> tuple[dict, dict]:
    """No trees beside the transformer's."""
    return {}, {}
