"""Qwen-Image: diffusers parity through our converter, the released E-DiT checkpoint import, and
the MLP activation field."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import edit_jax
from edit_jax.checkpoints_convert import ConversionError, convert_checkpoint
from edit_jax.checkpoint import flatten, load_config, load_routers
from edit_jax.config import ConfigError, QwenImageConfig, from_diffusers_config
from edit_jax.models import jit_forward
from reference import QWEN_TINY, make_diffusers_qwen, qwen_inputs, relative_error, run_diffusers_qwen

TOLERANCE = 1e-5


def convert_qwen(src, dst, **kwargs):
    return convert_checkpoint("qwen-image", src, dst, dtype="float32", progress=False, **kwargs)


def apply(model, params, inputs):
    """Our forward, jitted: one compiled program (op by op, it took longer than compiling)."""
    forward, arrays = jit_forward(model, inputs)
    return forward(params, arrays)


def test_tiny_config_matches_diffusers(save_diffusers, tmp_path):
    torch_model = make_diffusers_qwen()
    model, params = edit_jax.load(convert_qwen(save_diffusers(torch_model), tmp_path / "ckpt"))
    inputs = qwen_inputs(QWEN_TINY, batch=1, height=4, width=4, num_txt=6)

    assert relative_error(apply(model, params, inputs), run_diffusers_qwen(torch_model, inputs)) <= TOLERANCE


def test_deeper_config_with_ragged_and_holed_text_masks_and_nonsquare_image_matches_diffusers(save_diffusers, tmp_path):
    torch_model = make_diffusers_qwen(seed=1, num_layers=4)
    model, params = edit_jax.load(convert_qwen(save_diffusers(torch_model), tmp_path / "ckpt"))
    inputs = qwen_inputs({**QWEN_TINY, "num_layers": 4}, batch=2, height=3, width=5, num_txt=7, seed=1)
    inputs["encoder_hidden_states_mask"][0, 5:] = 0  # shorter valid text
    inputs["encoder_hidden_states_mask"][1, 2:4] = 0  # a hole in the middle

    out = apply(model, params, inputs)

    assert out.shape == (2, 15, 16)
    assert relative_error(out, run_diffusers_qwen(torch_model, inputs)) <= TOLERANCE


def test_several_images_in_one_sequence_match_diffusers_as_qwen_image_edit_passes_them(save_diffusers, tmp_path):
    """Qwen-Image-Edit's layout: the image generated, then a reference image of another size, each
    with its own RoPE frame index, in one token sequence."""
    torch_model = make_diffusers_qwen(seed=2)
    model, params = edit_jax.load(convert_qwen(save_diffusers(torch_model), tmp_path / "ckpt"))
    segments = [(1, 3, 4), (1, 2, 3)]
    inputs = qwen_inputs(QWEN_TINY, batch=2, height=1, width=18, num_txt=5, seed=2)
    kwargs = {k: torch.from_numpy(v) for k, v in inputs.items() if k != "img_shapes"}
    with torch.no_grad():
        want = torch_model(**kwargs, img_shapes=[segments] * 2, return_dict=False)[0].numpy()

    for img_shapes in (segments, [segments] * 2):  # every sample's images, or diffusers' per-sample list
        assert relative_error(apply(model, params, {**inputs, "img_shapes": img_shapes}), want) <= TOLERANCE


def test_zero_cond_t_modulates_the_reference_images_as_at_t_0_as_diffusers_does(save_diffusers, tmp_path):
    """Qwen-Image-Edit-2511: every image after the first in img_shapes is modulated from the time
    embedding at t = 0; the generated image, the text and the output norm from the call's t."""
    torch_model = make_diffusers_qwen(seed=3, zero_cond_t=True)
    model, params = edit_jax.load(convert_qwen(save_diffusers(torch_model), tmp_path / "ckpt"))
    segments = [(1, 3, 4), (1, 2, 3)]
    inputs = {**qwen_inputs(QWEN_TINY, batch=2, height=1, width=18, num_txt=5, seed=3), "img_shapes": segments}
    kwargs = {k: torch.from_numpy(v) for k, v in inputs.items() if k != "img_shapes"}
    with torch.no_grad():
        want = torch_model(**kwargs, img_shapes=[segments] * 2, return_dict=False)[0].numpy()

    assert model.config.zero_cond_t
    assert relative_error(apply(model, params, inputs), want) <= TOLERANCE
    without = edit_jax.build_model(model.config.replace(zero_cond_t=False))
    assert relative_error(apply(without, params, inputs), want) > 1e-3  # the test sees the feature


def test_zero_cond_t_with_block_modulations_computed_ahead_gives_the_call_it_would_compute():
    """As `sample` runs it: the blocks' modulations for the call's t come from outside, the
    reference images' (t = 0) the model adds itself."""
    from edit_jax.models.registry import block_modulations

    config = edit_jax.preset("qwen-image-tiny").replace(zero_cond_t=True)
    model, params = edit_jax.build_model(config), edit_jax.init_params(config)
    inputs = {**qwen_inputs(QWEN_TINY, batch=1, height=1, width=18, num_txt=5, seed=4), "img_shapes": [(1, 3, 4), (1, 2, 3)]}
    mods = block_modulations(config, params, jnp.asarray(inputs["timestep"]), {})

    own, ahead = apply(model, params, inputs), apply(model, params, {**inputs, "block_modulations": mods})
    assert relative_error(ahead, own) <= TOLERANCE


def test_img_shapes_that_differ_between_samples_are_an_error():
    from edit_jax.models.qwen_image import normalize_img_shapes

    with pytest.raises(ValueError, match="per-sample list of 2 equal"):
        normalize_img_shapes([[(1, 2, 2)], [(1, 2, 2), (1, 1, 1)]], batch=2)


def test_sigmoid_activation_matches_diffusers_with_its_mlp_activation_replaced(save_diffusers, tmp_path):
    torch_model = make_diffusers_qwen()
    src = save_diffusers(torch_model)
    for block in torch_model.transformer_blocks:
        for mlp in (block.img_mlp, block.txt_mlp):
            proj = mlp.net[0].proj
            mlp.net[0].forward = lambda x, proj=proj: proj(x) * torch.sigmoid(1.702 * proj(x))
    config = from_diffusers_config(src).replace(activation="sigmoid_gelu")
    model, params = edit_jax.load(convert_qwen(src, tmp_path / "ckpt", config=config))
    inputs = qwen_inputs(QWEN_TINY, batch=1, height=2, width=4, num_txt=3)

    assert relative_error(apply(model, params, inputs), run_diffusers_qwen(torch_model, inputs)) <= TOLERANCE


def fake_release(torch_model, path, seed=0, drop=None, extra=None, scale=1.0):
    """A file in the released E-DiT layout: the DiT's diffusers keys plus gate_mlps.{i}.*."""
    gen = torch.Generator().manual_seed(seed)
    d = torch_model.config.num_attention_heads * torch_model.config.attention_head_dim
    sd = dict(torch_model.state_dict())
    shapes = {"img_mod.1": (3 * d, d), "out.0": (128, d), "out.2": (1, 128), "width_head": (4, 128)}
    for i in range(torch_model.config.num_layers):
        for name, (out_dim, in_dim) in shapes.items():
            sd[f"gate_mlps.{i}.{name}.weight"] = scale * torch.randn(out_dim, in_dim, generator=gen)
            sd[f"gate_mlps.{i}.{name}.bias"] = scale * torch.randn(out_dim, generator=gen)
    if drop:
        del sd[drop]
    sd.update(extra or {})
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    return sd


def test_release_import_keeps_base_parity_and_puts_every_router_tensor_in_the_router_subtree(tmp_path):
    torch_model = make_diffusers_qwen()
    sd = fake_release(torch_model, tmp_path / "model.safetensors")
    config = from_diffusers_config(dict(torch_model.config), "qwen-image")

    ckpt = convert_qwen(tmp_path / "model.safetensors", tmp_path / "ckpt", config=config)

    assert load_config(ckpt).activation == "sigmoid_gelu"
    routers = flatten(load_routers(ckpt)["transformer_blocks"]["router"])
    theirs = {"img_mod/linear": "img_mod.1", "proj": "out.0", "gate_head": "out.2", "width_head": "width_head"}
    assert set(routers) == {f"{ours}/{p}" for ours in theirs for p in ("kernel", "bias")}
    for ours, key in theirs.items():
        for i in range(config.num_layers):
            np.testing.assert_array_equal(routers[f"{ours}/kernel"][i], sd[f"gate_mlps.{i}.{key}.weight"].numpy().T)
            np.testing.assert_array_equal(routers[f"{ours}/bias"][i], sd[f"gate_mlps.{i}.{key}.bias"].numpy())
    model, params = edit_jax.load(ckpt, activation="gelu_tanh")  # base parity with diffusers' activation
    inputs = qwen_inputs(QWEN_TINY, batch=1, height=2, width=2, num_txt=3)
    assert relative_error(apply(model, params, inputs), run_diffusers_qwen(torch_model, inputs)) <= TOLERANCE


@pytest.mark.parametrize(
    "drop, extra, message",
    [
        ("gate_mlps.1.width_head.bias", None, r"missing keys \(1\):\n    gate_mlps.1.width_head.bias"),
        (None, {"gate_mlps.0.extra.weight": torch.zeros(1)}, r"unexpected keys \(1\):\n    gate_mlps.0.extra.weight"),
        (None, {"gate_mlps.0.out.0.weight": torch.zeros(64, 64)}, r"gate_mlps.0.out.0.weight \(64, 64\)"),
    ],
    ids=["missing", "unexpected", "wrong-shape"],
)
def test_bad_router_keys_are_named(tmp_path, drop, extra, message):
    torch_model = make_diffusers_qwen()
    fake_release(torch_model, tmp_path / "model.safetensors", drop=drop, extra=extra)
    config = from_diffusers_config(dict(torch_model.config), "qwen-image")

    with pytest.raises(ConversionError, match=message):
        convert_qwen(tmp_path / "model.safetensors", tmp_path / "ckpt", config=config)
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("feature", ["use_additional_t_cond", "use_layer3d_rope"])
def test_unimplemented_config_features_are_rejected(feature):
    with pytest.raises(ConfigError, match=feature):
        from_diffusers_config({"_class_name": "QwenImageTransformer2DModel", **QWEN_TINY, feature: True})


def test_img_shapes_that_do_not_fit_the_tokens_are_an_error():
    config = edit_jax.preset("qwen-image-tiny")
    params = edit_jax.init_params(config)
    inputs = qwen_inputs(QWEN_TINY, batch=1, height=2, width=3, num_txt=3)
    inputs["img_shapes"] = (1, 3, 3)
    with pytest.raises(ValueError, match=r"img_shapes \(1, 3, 3\) hold 9 tokens but hidden_states has 6"):
        apply(edit_jax.build_model(config), params, inputs)


def test_preset_matches_published_config():
    assert edit_jax.preset("qwen-image") == QwenImageConfig(num_layers=60, joint_attention_dim=3584)


def test_the_released_config_json_with_its_unused_pooled_projection_dim_reads_as_the_preset(tmp_path):
    """Qwen/Qwen-Image's transformer/config.json, written by diffusers 0.34.0.dev0, holds a
    pooled_projection_dim that diffusers' model class has no argument for and drops."""
    import json

    released = {"_class_name": "QwenImageTransformer2DModel", "_diffusers_version": "0.34.0.dev0",
                "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56], "guidance_embeds": False, "in_channels": 64,
                "joint_attention_dim": 3584, "num_attention_heads": 24, "num_layers": 60, "out_channels": 16,
                "patch_size": 2, "pooled_projection_dim": 768}
    (tmp_path / "config.json").write_text(json.dumps(released))
    assert from_diffusers_config(tmp_path) == edit_jax.preset("qwen-image")


@pytest.mark.parametrize("bad, message", [
    ({"timestep": 1000 * np.full((1,), 0.5, np.float32)}, "timestep must be sigma in"),
    ({"encoder_hidden_states_mask": np.zeros((1, 4), np.int32)}, "at least one text token"),
    ({"img_shapes": (1, 3, 3)}, "img_shapes"),
], ids=["timestep-0-1000", "all-zero-mask", "img-shapes"])
def test_inputs_with_impossible_values_are_clear_errors(bad, message):
    import edit_jax
    from edit_jax.models.registry import example_inputs

    config = edit_jax.preset("qwen-image-tiny")
    inputs = {**example_inputs(config, batch=1, height=4, width=3, num_txt=4), **bad}
    with pytest.raises(ValueError, match=message):
        edit_jax.build_model(config).apply({"params": edit_jax.init_params(config)}, **inputs)
