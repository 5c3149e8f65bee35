"""FLUX.1 conversion tables: diffusers layout and the original Black Forest Labs single file."""

from __future__ import annotations

from edit_jax.config import FluxConfig, preset, proj_out_parts
from edit_jax.checkpoints_convert.configs import reconcile_config, with_recorded_activation
from edit_jax.checkpoints_convert import tables
from edit_jax.checkpoints_convert.tables import Src, input_linear, joint_linear, linear, rows, scale, stored_order, swap_halves

BFL_PREFIX = "model.diffusion_model."


def diffusers_table(cfg: FluxConfig) -> dict[str, Src]:
    """Our params <- diffusers FluxTransformer2DModel state dict."""
    db, sb = "transformer_blocks.{i}", "single_transformer_blocks.{i}"
    order = lambda axis: stored_order(cfg.mlp_hidden_dim, cfg.width_groups, axis)  # noqa: E731
    embedders = ["timestep_embedder", "text_embedder"] + (["guidance_embedder"] if cfg.guidance_embeds else [])
    return {
        **linear("x_embedder", "x_embedder"),
        **linear("context_embedder", "context_embedder"),
        **{
            k: v
            for e in embedders
            for l in ("linear_1", "linear_2")
            for k, v in linear(f"time_text_embed/{e}/{l}", f"time_text_embed.{e}.{l}").items()
        },
        # double-stream blocks, stacked over {i}
        **linear("transformer_blocks/norm1/linear", f"{db}.norm1.linear"),
        **linear("transformer_blocks/norm1_context/linear", f"{db}.norm1_context.linear"),
        **linear("transformer_blocks/attn/to_q", f"{db}.attn.to_q"),
        **linear("transformer_blocks/attn/to_k", f"{db}.attn.to_k"),
        **linear("transformer_blocks/attn/to_v", f"{db}.attn.to_v"),
        **linear("transformer_blocks/attn/add_q_proj", f"{db}.attn.add_q_proj"),
        **linear("transformer_blocks/attn/add_k_proj", f"{db}.attn.add_k_proj"),
        **linear("transformer_blocks/attn/add_v_proj", f"{db}.attn.add_v_proj"),
        **scale("transformer_blocks/attn/norm_q", f"{db}.attn.norm_q.weight"),
        **scale("transformer_blocks/attn/norm_k", f"{db}.attn.norm_k.weight"),
        **scale("transformer_blocks/attn/norm_added_q", f"{db}.attn.norm_added_q.weight"),
        **scale("transformer_blocks/attn/norm_added_k", f"{db}.attn.norm_added_k.weight"),
        **linear("transformer_blocks/attn/to_out", f"{db}.attn.to_out.0"),
        **linear("transformer_blocks/attn/to_add_out", f"{db}.attn.to_add_out"),
        **linear("transformer_blocks/ff/fc1", f"{db}.ff.net.0.proj", *order(0)),
        **input_linear("transformer_blocks/ff/fc2", f"{db}.ff.net.2", *order(1)),
        **linear("transformer_blocks/ff_context/fc1", f"{db}.ff_context.net.0.proj"),
        **linear("transformer_blocks/ff_context/fc2", f"{db}.ff_context.net.2"),
        # single-stream blocks, stacked over {i}
        **linear("single_transformer_blocks/norm/linear", f"{sb}.norm.linear"),
        **linear("single_transformer_blocks/attn/to_q", f"{sb}.attn.to_q"),
        **linear("single_transformer_blocks/attn/to_k", f"{sb}.attn.to_k"),
        **linear("single_transformer_blocks/attn/to_v", f"{sb}.attn.to_v"),
        **scale("single_transformer_blocks/attn/norm_q", f"{sb}.attn.norm_q.weight"),
        **scale("single_transformer_blocks/attn/norm_k", f"{sb}.attn.norm_k.weight"),
        **linear("single_transformer_blocks/proj_mlp", f"{sb}.proj_mlp", *order(0)),
        **joint_linear("single_transformer_blocks/proj_out", f"{sb}.proj_out", proj_out_parts(cfg), {"kernel_mlp": order(1)}),
        **linear("norm_out/linear", "norm_out.linear"),
        **linear("proj_out", "proj_out"),
    }


def bfl_table(cfg: FluxConfig) -> dict[str, Src]:
    """Our params <- the original BFL checkpoint (flux1-dev.safetensors), prefix stripped.

    BFL fuses q, k, v (double blocks: `qkv`; single blocks: `linear1` = [q; k; v; mlp]) and
    orders the final adaLN as (shift, scale).
    """
    db, sb = "double_blocks.{i}", "single_blocks.{i}"
    d, m = cfg.inner_dim, cfg.mlp_hidden_dim
    qkv, qkv_mlp = (d, d, d), (d, d, d, m)
    order = lambda axis: stored_order(m, cfg.width_groups, axis)  # noqa: E731
    embedders = {"timestep_embedder": "time_in", "text_embedder": "vector_in"}
    if cfg.guidance_embeds:
        embedders["guidance_embedder"] = "guidance_in"
    return {
        **linear("x_embedder", "img_in"),
        **linear("context_embedder", "txt_in"),
        **{
            k: v
            for ours, theirs in embedders.items()
            for l, t in (("linear_1", "in_layer"), ("linear_2", "out_layer"))
            for k, v in linear(f"time_text_embed/{ours}/{l}", f"{theirs}.{t}").items()
        },
        # double-stream blocks
        **linear("transformer_blocks/norm1/linear", f"{db}.img_mod.lin"),
        **linear("transformer_blocks/norm1_context/linear", f"{db}.txt_mod.lin"),
        **linear("transformer_blocks/attn/to_q", f"{db}.img_attn.qkv", rows(qkv, 0)),
        **linear("transformer_blocks/attn/to_k", f"{db}.img_attn.qkv", rows(qkv, 1)),
        **linear("transformer_blocks/attn/to_v", f"{db}.img_attn.qkv", rows(qkv, 2)),
        **linear("transformer_blocks/attn/add_q_proj", f"{db}.txt_attn.qkv", rows(qkv, 0)),
        **linear("transformer_blocks/attn/add_k_proj", f"{db}.txt_attn.qkv", rows(qkv, 1)),
        **linear("transformer_blocks/attn/add_v_proj", f"{db}.txt_attn.qkv", rows(qkv, 2)),
        **scale("transformer_blocks/attn/norm_q", f"{db}.img_attn.norm.query_norm.scale"),
        **scale("transformer_blocks/attn/norm_k", f"{db}.img_attn.norm.key_norm.scale"),
        **scale("transformer_blocks/attn/norm_added_q", f"{db}.txt_attn.norm.query_norm.scale"),
        **scale("transformer_blocks/attn/norm_added_k", f"{db}.txt_attn.norm.key_norm.scale"),
        **linear("transformer_blocks/attn/to_out", f"{db}.img_attn.proj"),
        **linear("transformer_blocks/attn/to_add_out", f"{db}.txt_attn.proj"),
        **linear("transformer_blocks/ff/fc1", f"{db}.img_mlp.0", *order(0)),
        **input_linear("transformer_blocks/ff/fc2", f"{db}.img_mlp.2", *order(1)),
        **linear("transformer_blocks/ff_context/fc1", f"{db}.txt_mlp.0"),
        **linear("transformer_blocks/ff_context/fc2", f"{db}.txt_mlp.2"),
        # single-stream blocks
        **linear("single_transformer_blocks/norm/linear", f"{sb}.modulation.lin"),
        **linear("single_transformer_blocks/attn/to_q", f"{sb}.linear1", rows(qkv_mlp, 0)),
        **linear("single_transformer_blocks/attn/to_k", f"{sb}.linear1", rows(qkv_mlp, 1)),
        **linear("single_transformer_blocks/attn/to_v", f"{sb}.linear1", rows(qkv_mlp, 2)),
        **linear("single_transformer_blocks/proj_mlp", f"{sb}.linear1", rows(qkv_mlp, 3), *order(0)),
        **scale("single_transformer_blocks/attn/norm_q", f"{sb}.norm.query_norm.scale"),
        **scale("single_transformer_blocks/attn/norm_k", f"{sb}.norm.key_norm.scale"),
        **joint_linear("single_transformer_blocks/proj_out", f"{sb}.linear2", proj_out_parts(cfg), {"kernel_mlp": order(1)}),
        **linear("norm_out/linear", "final_layer.adaLN_modulation.1", swap_halves),
        **linear("proj_out", "final_layer.linear"),
    }


def router_table(cfg: FluxConfig) -> dict[str, Src]:
    """Our routers <- gate_mlps.{i}.* numbered over the double blocks, then the single blocks
    (the layout `edit-jax export --format edit-release` writes for FLUX)."""
    return tables.stacked_router_table((("transformer_blocks", 0), ("single_transformer_blocks", cfg.num_layers)))


TABLES = {"diffusers": diffusers_table, "bfl": bfl_table, "edit-release": diffusers_table}


def detect_format(keys: list[str]) -> str:
    """"bfl", "edit-release" (diffusers keys + routers) or "diffusers" from the tensor names."""
    if any(k.startswith(("double_blocks.", BFL_PREFIX + "double_blocks.")) for k in keys):
        return "bfl"
    if any(k.startswith("gate_mlps.") for k in keys):
        return "edit-release"
    if any(k.startswith("transformer_blocks.") for k in keys):
        return "diffusers"
    raise ValueError("cannot tell the FLUX checkpoint format: no 'double_blocks.*' (BFL) or "
                     "'transformer_blocks.*' (diffusers) tensors")


def prepare(source, fmt: str = "auto", config: FluxConfig | None = None):
    """Picks the format and config of a FLUX source: returns (config, table, format, router table
    or None); "edit-release" is the E-DiT layout `edit-jax export` writes for FLUX.

    BFL files carry no config: without one given, flux-dev or flux-schnell is taken by whether
    the file has guidance weights. A diffusers folder's config.json is read; a config given as
    well must agree with it.
    """
    if fmt == "auto":
        fmt = detect_format(source.keys())
    if fmt not in TABLES:
        raise ValueError(f"unknown FLUX format {fmt!r}; choose auto, {', '.join(TABLES)}")
    if fmt == "bfl":
        source.strip_prefix(BFL_PREFIX)
        if config is None:
            config = preset("flux-dev" if "guidance_in.in_layer.weight" in source else "flux-schnell")
    else:
        config = with_recorded_activation(reconcile_config(source, config, "flux"), source)
    return config, TABLES[fmt](config), fmt, router_table(config) if fmt == "edit-release" else None


def more_trees(source) -> tuple[dict, dict]:
    """No trees beside the transformer's."""
    return {}, {}
