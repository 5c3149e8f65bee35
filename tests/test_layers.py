"""Shared layers against their diffusers / PyTorch counterparts, and the layout every param has."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import edit_jax
from edit_jax import layers
from edit_jax.config import RuntimeConfig
from edit_jax.models.registry import abstract_params, example_inputs, logical_axes
from edit_jax.checkpoint import flatten
from edit_jax.placement import param_shardings
from edit_jax.sharding import make_mesh
from reference import relative_error

RT = RuntimeConfig()


def test_timestep_embedding_matches_diffusers_up_to_one_ulp_of_a_frequency():
    # diffusers' float32 exp is one ulp off the correctly rounded frequency at two of 128 entries;
    # at timestep 1000 that moves an angle by ~3e-5, so this is the honest bound.
    from diffusers.models.embeddings import get_timestep_embedding

    t = np.linspace(0, 1000, 41).astype(np.float32)
    ref = get_timestep_embedding(torch.from_numpy(t), 256, flip_sin_to_cos=True, downscale_freq_shift=0).numpy()

    np.testing.assert_allclose(layers.timestep_embedding(jnp.asarray(t)), ref, atol=5e-5)


def test_timestep_frequencies_are_the_correctly_rounded_exp_of_diffusers_float32_exponents():
    exponent = np.float32(-np.log(10000.0)) * np.arange(128, dtype=np.float32) / np.float32(128)
    exact = np.exp(exponent.astype(np.float64))
    assert np.max(np.abs(layers.timestep_frequencies() / exact - 1)) <= 2.0**-24


def test_rope_matches_diffusers_flux_pos_embed_and_apply_rotary_emb():
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    rng = np.random.default_rng(0)
    ids = np.concatenate([np.zeros((3, 3)), rng.integers(0, 64, (20, 3))]).astype(np.float32)
    x = rng.standard_normal((2, 23, 4, 32)).astype(np.float32)
    cos_t, sin_t = FluxPosEmbed(10000, [8, 12, 12])(torch.from_numpy(ids))
    ref = apply_rotary_emb(torch.from_numpy(x), (cos_t, sin_t), sequence_dim=1).numpy()

    cos, sin = layers.rope_frequencies(jnp.asarray(ids), (8, 12, 12))
    assert relative_error(layers.apply_rope(jnp.asarray(x), cos, sin), ref) <= 1e-6


def test_rms_norm_matches_torch():
    x = np.random.default_rng(0).standard_normal((2, 5, 16)).astype(np.float32) * 3
    scale = np.random.default_rng(1).standard_normal(16).astype(np.float32)
    ref = torch.nn.RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(scale))
    out = layers.RMSNorm("head_dim", RT).apply({"params": {"scale": scale}}, x)
    assert relative_error(out, ref(torch.from_numpy(x)).detach().numpy()) <= 1e-6


def test_layer_norm_matches_torch_without_affine():
    x = np.random.default_rng(0).standard_normal((2, 5, 16)).astype(np.float32) * 3 + 1
    ref = F.layer_norm(torch.from_numpy(x), (16,), eps=1e-6).numpy()
    assert relative_error(layers.layer_norm(jnp.asarray(x)), ref) <= 1e-6


@pytest.mark.parametrize(
    "name, reference",
    [
        ("gelu_tanh", lambda x: F.gelu(x, approximate="tanh")),
        ("sigmoid_gelu", lambda x: x * torch.sigmoid(1.702 * x)),
    ],
)
def test_activations_match_torch(name, reference):
    x = np.linspace(-8, 8, 1001).astype(np.float32)
    np.testing.assert_allclose(layers.activation_fn(name)(jnp.asarray(x)), reference(torch.from_numpy(x)).numpy(), atol=1e-6)


def test_attention_with_key_mask_matches_torch_sdpa():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 6, 2, 8)).astype(np.float32) for _ in range(3))
    mask = np.ones((2, 6), bool)
    mask[0, 1:3] = False
    ref = F.scaled_dot_product_attention(
        *(torch.from_numpy(t).transpose(1, 2) for t in (q, k, v)), attn_mask=torch.from_numpy(mask)[:, None, None, :]
    ).transpose(1, 2).reshape(2, 6, 16)
    out = layers.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask))
    assert relative_error(out, ref.numpy()) <= 1e-6


def test_a_key_mask_given_as_lengths_of_reordered_keys_attends_to_the_same_keys():
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((3, 7, 2, 8)), jnp.float32) for _ in range(3))
    mask = np.ones((3, 7), bool)
    mask[0, [1, 4]] = False  # holes anywhere, not only a padded tail
    mask[1, 5:] = False
    by_lengths = layers.attention_by_key_lengths(q, k, v, jnp.asarray(mask), "xla")
    assert relative_error(by_lengths, layers.attention(q, k, v, jnp.asarray(mask))) <= 1e-6


def test_auto_attention_whose_kernel_refuses_the_inputs_warns_and_runs_xla(monkeypatch):
    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 6, 2, 8)), jnp.bfloat16) for _ in range(3))
    mask = jnp.asarray(np.arange(6)[None, :] < np.array([[6], [4]]))
    monkeypatch.setattr(layers, "resolve_attention", lambda implementation, dtype: "cudnn")  # as on an NVIDIA GPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # so that cuDNN's own checks run, and refuse a CPU

    with pytest.warns(UserWarning, match="attention='auto': cudnn cannot run here"):
        out = layers.attention(q, k, v, mask, "auto")
    np.testing.assert_array_equal(out, layers.attention(q, k, v, mask, "xla"))


def test_mlp_width_uses_the_first_hidden_channels_only():
    mlp = layers.MLP(16, "gelu_tanh", RT)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 3, 8)), jnp.float32)
    params = nn.meta.unbox(mlp.init(jax.random.key(0), x))["params"]
    truncated = {
        "fc1": {"kernel": params["fc1"]["kernel"][:, :4], "bias": params["fc1"]["bias"][:4]},
        "fc2": {"kernel": params["fc2"]["kernel"][:4], "bias": params["fc2"]["bias"]},
    }
    narrow = layers.MLP(4, "gelu_tanh", RT).apply({"params": truncated}, x)
    np.testing.assert_allclose(mlp.apply({"params": params}, x, width=4), narrow, rtol=1e-6)


def joint_and_whole(parts=(("a", "heads", 3), ("b", "mlp", 5))):
    joint = layers.JointLinear(4, parts, "embed", RT)
    whole = layers.Linear(4, ("heads", "embed"), RT)
    rng = np.random.default_rng(0)
    x = [jnp.asarray(rng.standard_normal((2, rows)), jnp.float32) for _, _, rows in parts]
    return joint, whole, x


def test_joint_linear_draws_the_initial_values_of_one_linear_over_the_whole_input():
    joint, whole, x = joint_and_whole()
    split = nn.meta.unbox(joint.init(jax.random.key(3), x))["params"]
    one = nn.meta.unbox(whole.init(jax.random.key(3), jnp.concatenate(x, -1)))["params"]

    np.testing.assert_array_equal(np.concatenate([split["a"], split["b"]]), one["kernel"])
    np.testing.assert_allclose(joint.apply({"params": split}, x), whole.apply({"params": one}, jnp.concatenate(x, -1)),
                               rtol=1e-6)


def test_a_narrow_joint_linear_part_meets_the_first_rows_of_its_kernel():
    joint, whole, x = joint_and_whole()
    params = nn.meta.unbox(joint.init(jax.random.key(3), x))["params"]
    truncated = {"kernel": jnp.concatenate([params["a"], params["b"][:2]]), "bias": params["bias"]}

    np.testing.assert_allclose(joint.apply({"params": params}, (x[0], x[1][:, :2])),
                               whole.apply({"params": truncated}, jnp.concatenate([x[0], x[1][:, :2]], -1)), rtol=1e-6)


def test_width_groups_deal_channels_round_robin_and_a_width_keeps_the_first_channels_of_every_group():
    ranks = layers.channel_ranks(16, 4)  # stored position -> channel
    x = jnp.asarray(ranks, jnp.float32)[None, :]

    assert ranks.tolist() == [0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15]
    assert layers.narrow(x, 1, 8, 4).tolist() == [[0, 4, 1, 5, 2, 6, 3, 7]]  # channels 0..7, two per group
    assert layers.narrow(x, 1, 8, 1).tolist() == [ranks[:8].tolist()]


def test_every_param_has_one_logical_name_per_axis_and_a_layer_axis_when_stacked():
    config = edit_jax.preset("flux-tiny")
    shapes, specs = flatten(abstract_params(config)), flatten(logical_axes(config))
    assert set(shapes) == set(specs)
    for path, shape in shapes.items():
        assert len(specs[path]) == len(shape.shape), path
        assert (specs[path][0] == "layers") == path.split("/")[0].endswith("transformer_blocks"), path


def test_sharding_rules_cover_every_logical_axis():
    shardings = param_shardings(edit_jax.preset("flux-small"), make_mesh())
    assert all(s.mesh.axis_names == ("data", "fsdp", "tensor") for s in jax.tree.leaves(shardings))


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_policies_leave_the_forward_unchanged(remat):
    config = edit_jax.preset("flux-tiny")
    params = edit_jax.init_params(config)
    inputs = example_inputs(config, height=2, width=3, num_txt=4)
    base = edit_jax.build_model(config).apply({"params": params}, **inputs)
    rematted = edit_jax.build_model(config.with_runtime(remat=remat)).apply({"params": params}, **inputs)
    np.testing.assert_array_equal(base, rematted)


@pytest.mark.parametrize("attention", ["splash", "tokamax"])
@pytest.mark.parametrize("preset", ["flux-tiny", "qwen-image-tiny"])
def test_flash_attention_kernels_match_xla_attention_in_the_models(preset, attention):
    """Pallas splash attention (TPU), run in interpret mode on the CPU, and tokamax's attention
    (its XLA kernel here); 64 image + 64 text tokens (splash tiles 128), Qwen-Image with padded
    text in one row."""
    import edit_jax
    from edit_jax.models.registry import example_inputs, split_static

    config = edit_jax.preset(preset)
    arrays, static = split_static(example_inputs(config, batch=2, height=8, width=8, num_txt=64))
    if "encoder_hidden_states_mask" in arrays:
        arrays["encoder_hidden_states_mask"] = arrays["encoder_hidden_states_mask"].at[1, 40:].set(0)
    params = edit_jax.init_params(config)
    xla, flash = (edit_jax.build_model(config.with_runtime(attention=a)).apply({"params": params}, **arrays, **static)
                  for a in ("xla", attention))
    assert relative_error(flash, xla) <= 1e-5


def test_tokamax_attention_without_its_package_is_a_config_error_naming_the_extra(monkeypatch):
    import importlib.util

    from edit_jax.config import ConfigError, RuntimeConfig

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tokamax" else find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"edit-jax\[tokamax\]"):
        RuntimeConfig(attention="tokamax")


def test_splash_attention_names_the_lengths_it_cannot_tile():
    from edit_jax.layers import splash_attention

    x = jnp.zeros((1, 100, 2, 16))
    with pytest.raises(ValueError, match="divisible by 128"):
        splash_attention(x, x, x)
