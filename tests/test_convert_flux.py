"""FLUX conversion: the BFL path, clear errors on bad sources, atomic output, orbax round trip."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import edit_jax
from edit_jax.checkpoints_convert import ConversionError, convert_checkpoint
from edit_jax.checkpoints_convert.flux import BFL_PREFIX
from edit_jax.checkpoint import CheckpointError, flatten, load_config, save
from edit_jax.config import ConfigError, from_diffusers_config
from edit_jax.models import jit_forward
from reference import FLUX_TINY, flux_inputs, make_diffusers_flux, relative_error, run_diffusers


def diffusers_to_bfl(sd: dict, num_layers: int, num_single_layers: int) -> dict:
    """The inverse of diffusers' convert_flux_transformer_checkpoint_to_diffusers."""
    out = {
        "img_in": "x_embedder",
        "txt_in": "context_embedder",
        "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
        "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
        "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
        "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
        "final_layer.linear": "proj_out",
    }
    if "time_text_embed.guidance_embedder.linear_1.weight" in sd:
        out["guidance_in.in_layer"] = "time_text_embed.guidance_embedder.linear_1"
        out["guidance_in.out_layer"] = "time_text_embed.guidance_embedder.linear_2"
    for i in range(num_layers):
        b, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        out.update({
            f"{b}.img_mod.lin": f"{d}.norm1.linear", f"{b}.txt_mod.lin": f"{d}.norm1_context.linear",
            f"{b}.img_mlp.0": f"{d}.ff.net.0.proj", f"{b}.img_mlp.2": f"{d}.ff.net.2",
            f"{b}.txt_mlp.0": f"{d}.ff_context.net.0.proj", f"{b}.txt_mlp.2": f"{d}.ff_context.net.2",
            f"{b}.img_attn.proj": f"{d}.attn.to_out.0", f"{b}.txt_attn.proj": f"{d}.attn.to_add_out",
        })
    bfl = {f"{k}.{p}": sd[f"{v}.{p}"] for k, v in out.items() for p in ("weight", "bias")}
    for i in range(num_layers):
        b, d = f"double_blocks.{i}", f"transformer_blocks.{i}.attn"
        for p in ("weight", "bias"):
            bfl[f"{b}.img_attn.qkv.{p}"] = torch.cat([sd[f"{d}.to_{x}.{p}"] for x in "qkv"])
            bfl[f"{b}.txt_attn.qkv.{p}"] = torch.cat([sd[f"{d}.add_{x}_proj.{p}"] for x in "qkv"])
        for stream, q, k in (("img", "norm_q", "norm_k"), ("txt", "norm_added_q", "norm_added_k")):
            bfl[f"{b}.{stream}_attn.norm.query_norm.scale"] = sd[f"{d}.{q}.weight"]
            bfl[f"{b}.{stream}_attn.norm.key_norm.scale"] = sd[f"{d}.{k}.weight"]
    for i in range(num_single_layers):
        b, s = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        for p in ("weight", "bias"):
            bfl[f"{b}.linear1.{p}"] = torch.cat([sd[f"{s}.attn.to_{x}.{p}"] for x in "qkv"] + [sd[f"{s}.proj_mlp.{p}"]])
            bfl[f"{b}.linear2.{p}"] = sd[f"{s}.proj_out.{p}"]
            bfl[f"{b}.modulation.lin.{p}"] = sd[f"{s}.norm.linear.{p}"]
        bfl[f"{b}.norm.query_norm.scale"] = sd[f"{s}.attn.norm_q.weight"]
        bfl[f"{b}.norm.key_norm.scale"] = sd[f"{s}.attn.norm_k.weight"]
    for p in ("weight", "bias"):
        scale, shift = sd[f"norm_out.linear.{p}"].chunk(2)
        bfl[f"final_layer.adaLN_modulation.1.{p}"] = torch.cat([shift, scale])
    return {k: v.contiguous() for k, v in bfl.items()}


def convert_flux(src, dst, **kwargs):
    return convert_checkpoint("flux", src, dst, dtype="float32", progress=False, **kwargs)


def test_bfl_inverse_is_exact_under_diffusers_own_converter():
    # diffusers' BFL converter hard-codes hidden size 3072, hence 24 heads of 128 (520M params: only
    # the vectors perturbed, torch's init having drawn every matrix)
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    model = make_diffusers_flux(num_attention_heads=24, attention_head_dim=128, axes_dims_rope=(16, 56, 56),
                                matrices=False).to(torch.bfloat16)
    sd = model.state_dict()

    back = convert_flux_transformer_checkpoint_to_diffusers(diffusers_to_bfl(sd, 1, 1))

    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("prefix", ["", BFL_PREFIX], ids=["bare", "prefixed"])
def test_bfl_import_gives_the_same_params_as_diffusers_import(save_diffusers, tmp_path, prefix):
    model = make_diffusers_flux(num_layers=2, num_single_layers=2, guidance_embeds=True)
    diffusers_dir = save_diffusers(model)
    bfl = diffusers_to_bfl(model.state_dict(), 2, 2)
    save_file({prefix + k: v for k, v in bfl.items()}, tmp_path / "flux1.safetensors")
    config = from_diffusers_config(diffusers_dir)

    via_bfl = convert_flux(tmp_path / "flux1.safetensors", tmp_path / "bfl", config=config)
    via_diffusers = convert_flux(diffusers_dir, tmp_path / "diffusers")

    a, b = flatten(edit_jax.load(via_bfl)[1]), flatten(edit_jax.load(via_diffusers)[1])
    assert set(a) == set(b)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert json.loads((via_bfl / "config.json").read_text())["converted_from"]["format"] == "bfl"


def test_bfl_import_matches_diffusers_forward(tmp_path):
    model = make_diffusers_flux(guidance_embeds=True)
    save_file(diffusers_to_bfl(model.state_dict(), 1, 1), tmp_path / "flux1.safetensors")
    config = from_diffusers_config(dict(model.config), "flux")
    ours, params = edit_jax.load(convert_flux(tmp_path / "flux1.safetensors", tmp_path / "ck", config=config))
    inputs = flux_inputs({**FLUX_TINY, "guidance_embeds": True}, batch=1, height=3, width=3, num_txt=4)

    forward, arrays = jit_forward(ours, inputs)
    velocity = forward(params, arrays)
    assert relative_error(velocity, run_diffusers(model, inputs)) <= 1e-5


def save_state_dict(sd, folder, config):
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(json.dumps(dict(config)))
    return folder


def assert_nothing_written(tmp_path):
    assert not (tmp_path / "ckpt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt")]


def test_missing_key_is_named_and_nothing_is_written(tmp_path):
    model = make_diffusers_flux()
    sd = model.state_dict()
    del sd["transformer_blocks.0.attn.to_q.weight"]
    src = save_state_dict(sd, tmp_path / "src", model.config)

    with pytest.raises(ConversionError, match=r"missing keys \(1\):\n    transformer_blocks.0.attn.to_q.weight"):
        convert_flux(src, tmp_path / "ckpt")
    assert_nothing_written(tmp_path)


def test_unexpected_key_is_named(tmp_path):
    model = make_diffusers_flux()
    sd = {**model.state_dict(), "extra.weight": torch.zeros(2)}
    src = save_state_dict(sd, tmp_path / "src", model.config)

    with pytest.raises(ConversionError, match=r"unexpected keys \(1\):\n    extra.weight"):
        convert_flux(src, tmp_path / "ckpt")
    assert_nothing_written(tmp_path)


def test_wrong_shape_is_named(tmp_path):
    model = make_diffusers_flux()
    sd = model.state_dict()
    sd["proj_out.weight"] = torch.zeros(5, 32)
    src = save_state_dict(sd, tmp_path / "src", model.config)

    with pytest.raises(ConversionError, match=r"shape mismatches \(1\):\n    proj_out.weight \(5, 32\)"):
        convert_flux(src, tmp_path / "ckpt")
    assert_nothing_written(tmp_path)


def test_config_with_fewer_layers_than_checkpoint_reports_the_extra_layers(save_diffusers, tmp_path):
    src = save_diffusers(make_diffusers_flux(num_layers=2))
    config = from_diffusers_config(src).replace(num_layers=1)
    (src / "config.json").unlink()

    with pytest.raises(ConversionError, match=r"unexpected keys \(32\):\n    transformer_blocks.1.attn"):
        convert_flux(src, tmp_path / "ckpt", config=config)
    assert_nothing_written(tmp_path)


def test_a_single_weight_file_reads_the_diffusers_config_json_beside_it(save_diffusers, tmp_path):
    src = save_diffusers(make_diffusers_flux())
    from_folder = convert_flux(src, tmp_path / "folder")
    from_file = convert_flux(src / "diffusion_pytorch_model.safetensors", tmp_path / "file")

    assert load_config(from_file) == load_config(from_folder)
    file_params, folder_params = (flatten(edit_jax.load(c)[1]) for c in (from_file, from_folder))
    assert file_params.keys() == folder_params.keys()
    for name in file_params:
        np.testing.assert_array_equal(file_params[name], folder_params[name])


def test_given_config_that_disagrees_with_source_config_is_an_error(save_diffusers, tmp_path):
    src = save_diffusers(make_diffusers_flux())
    config = from_diffusers_config(src).replace(num_single_layers=3)

    with pytest.raises(ConfigError, match="num_single_layers: source 1 vs given 3"):
        convert_flux(src, tmp_path / "ckpt", config=config)


@pytest.mark.parametrize("text, message", [("{not json", "is not a readable JSON file"), ("[1, 2]", "holds a JSON list")],
                         ids=["broken", "not-an-object"])
def test_a_source_config_that_is_not_a_json_object_is_an_error_naming_the_file(save_diffusers, tmp_path, text, message):
    src = save_diffusers(make_diffusers_flux())
    (src / "config.json").write_text(text)

    with pytest.raises(ConfigError, match=f"{src / 'config.json'} {message}"):
        convert_flux(src, tmp_path / "ckpt")
    assert_nothing_written(tmp_path)


def test_failure_while_writing_leaves_nothing_behind(save_diffusers, tmp_path, monkeypatch):
    import edit_jax.checkpoints_convert.engine as engine

    def broken(*args, **kwargs):
        yield {"x_embedder": {"bias": np.zeros(32, np.float32)}}
        raise OSError("disk full")

    monkeypatch.setattr(engine, "stream_params", broken)
    with pytest.raises(OSError, match="disk full"):
        convert_flux(save_diffusers(make_diffusers_flux()), tmp_path / "ckpt")
    assert_nothing_written(tmp_path)


def test_existing_destination_is_kept_unless_overwrite(save_diffusers, tmp_path):
    src = save_diffusers(make_diffusers_flux())
    convert_flux(src, tmp_path / "ckpt")

    with pytest.raises(CheckpointError, match="already exists"):
        convert_flux(src, tmp_path / "ckpt")
    convert_flux(src, tmp_path / "ckpt", overwrite=True)
    assert load_config(tmp_path / "ckpt").num_layers == 1


def test_bfloat16_conversion_stores_bfloat16(save_diffusers, tmp_path):
    src = save_diffusers(make_diffusers_flux())
    ckpt = convert_checkpoint("flux", src, tmp_path / "ckpt", dtype="bfloat16", progress=False)

    _, params = edit_jax.load(ckpt)
    assert {str(x.dtype) for x in flatten(params).values()} == {"bfloat16"}


def test_orbax_round_trip_keeps_params_and_config(tmp_path):
    config = edit_jax.preset("flux-tiny")
    params = edit_jax.init_params(config, seed=3)

    save(tmp_path / "ckpt", config, params)
    model, loaded = edit_jax.load(tmp_path / "ckpt")

    assert model.config == config
    a, b = flatten(params), flatten(loaded)
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_loading_a_folder_that_is_not_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="is not an edit-jax checkpoint"):
        edit_jax.load(tmp_path)


def test_transposed_weights_are_copied_exactly_in_blocks_with_the_dtype_converted():
    import ml_dtypes

    from edit_jax.checkpoints_convert.engine import _BLOCK, _fill

    weight = np.random.default_rng(0).standard_normal((_BLOCK + 3, 2 * _BLOCK + 5)).astype(np.float32)
    kernel = np.empty(weight.shape[::-1], ml_dtypes.bfloat16)
    _fill(kernel, weight.T)

    assert np.array_equal(kernel.view(np.uint16), weight.T.astype(ml_dtypes.bfloat16).view(np.uint16))


def test_a_converted_tensor_of_the_wrong_shape_is_an_error_not_a_broadcast():
    from edit_jax.checkpoints_convert.engine import _fill

    with pytest.raises(ConversionError, match=r"shape \(1, 4\), expected \(3, 4\)"):
        _fill(np.empty((3, 4), np.float32), np.ones((1, 4), np.float32))


def test_overwrite_never_deletes_the_source(save_diffusers, tmp_path, capsys):
    from edit_jax.cli import main

    src = save_diffusers(make_diffusers_flux())
    before = sorted(p.name for p in src.iterdir())

    for dst in (src, src / "converted", src.parent):
        assert main(["convert", "flux", str(src), str(dst), "--overwrite"]) == 2
        assert "the source" in capsys.readouterr().err
    assert sorted(p.name for p in src.iterdir()) == before


def test_a_non_finite_source_tensor_is_named_and_nothing_is_written(tmp_path):
    model = make_diffusers_flux()
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    sd["transformer_blocks.0.ff.net.2.weight"][0, 0] = float("nan")
    save_file(sd, tmp_path / "model.safetensors")
    model.save_config(tmp_path)

    with pytest.raises(ConversionError, match=r"'transformer_blocks.0.ff.net.2.weight'.*non-finite"):
        convert_flux(tmp_path / "model.safetensors", tmp_path / "ckpt", config=from_diffusers_config(tmp_path / "config.json"))
    assert not (tmp_path / "ckpt").exists() and not list(tmp_path.glob(".ckpt*"))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_the_finite_check_flags_exactly_the_nans_and_infinities(dtype):
    import ml_dtypes

    from edit_jax.checkpoints_convert.engine import _check_finite

    dtype = np.dtype(getattr(ml_dtypes, dtype, None) or dtype)
    info = ml_dtypes.finfo(dtype)
    finite = np.array([0.0, -0.0, 1.0, -2.5, float(info.max), -float(info.max), float(info.smallest_subnormal)], dtype)
    _check_finite(finite, "w", "p")
    for bad in (float("nan"), float("inf"), float("-inf")):
        values = np.concatenate([finite, np.array([bad], dtype)])
        with pytest.raises(ConversionError, match="holds 1 non-finite"):
            _check_finite(values, "w", "p")


def test_a_file_of_random_bytes_is_one_clear_error(tmp_path):
    from edit_jax.checkpoints_convert import open_source
    from edit_jax.checkpoints_convert.sources import SourceError

    (tmp_path / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(SourceError, match="model.safetensors is not a safetensors file"):
        open_source(tmp_path / "model.safetensors")


def test_a_truncated_file_is_one_clear_error_naming_it(tmp_path):
    from edit_jax.checkpoints_convert import open_source
    from edit_jax.checkpoints_convert.sources import SourceError

    save_file({k: v.contiguous() for k, v in make_diffusers_flux().state_dict().items()}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])

    with pytest.raises(SourceError, match=r"model.safetensors is truncated"):
        open_source(tmp_path / "model.safetensors")


@pytest.mark.parametrize("bucket, width_groups", [(0, None), (1, None), (2, None), (1, 1)])
def test_a_width_bucket_of_a_converted_model_keeps_pytorchs_first_hidden_channels(save_diffusers, tmp_path, bucket,
                                                                                    width_groups):
    """Stored in groups (width_groups > 1), the channels a bucket keeps are still the first m of
    the PyTorch weights: the model with channels m.. zeroed there, run dense, gives the same."""
    from edit_jax.elastic.mechanism import ElasticConfig
    from edit_jax.models.registry import example_inputs, init_routers, split_static

    torch_model = make_diffusers_flux()
    full = convert_flux(save_diffusers(torch_model, "full"), tmp_path / "full", width_groups=width_groups)
    d, m = torch_model.inner_dim, 4 * torch_model.inner_dim * (bucket + 1) // 4
    with torch.no_grad():
        for block in torch_model.transformer_blocks:
            block.ff.net[0].proj.weight[m:] = 0
            block.ff.net[0].proj.bias[m:] = 0
            block.ff.net[2].weight[:, m:] = 0
        for block in torch_model.single_transformer_blocks:
            block.proj_mlp.weight[m:] = 0
            block.proj_mlp.bias[m:] = 0
            block.proj_out.weight[:, d + m :] = 0
    truncated = convert_flux(save_diffusers(torch_model, "truncated"), tmp_path / "truncated")
    model, params = edit_jax.load(full)
    assert model.config.width_groups == (width_groups or 8)
    arrays, static = split_static(example_inputs(model.config, 2, 4, 4, 8))
    blocks = model.config.num_blocks
    decisions = {"run": np.ones(blocks, bool), "bucket": np.full(blocks, bucket, np.int32)}

    narrow = model.apply({"params": params, "routers": init_routers(model.config)}, **arrays, **static,
                         elastic=ElasticConfig(mode="forced"), decisions=decisions)[0]
    dense = model.apply({"params": edit_jax.load(truncated)[1]}, **arrays, **static)

    assert relative_error(np.asarray(narrow), np.asarray(dense)) <= 1e-5
