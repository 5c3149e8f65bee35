"""Export: the conversion tables read backward, into diffusers' layout and the E-DiT release's."""

import json

import jax
import numpy as np
import pytest
import torch

import edit_jax
from edit_jax.checkpoints_convert import convert_checkpoint
from edit_jax.checkpoints_convert.export import export_checkpoint
from edit_jax.checkpoint import CheckpointError, load_routers, save
from edit_jax.config import from_diffusers_config
from edit_jax.models.registry import init_variables
from reference import flux_inputs, make_diffusers_flux, make_diffusers_qwen, run_diffusers


def test_a_converted_model_exported_to_diffusers_loads_back_with_identical_outputs(save_diffusers, tmp_path):
    from diffusers import FluxTransformer2DModel

    torch_model = make_diffusers_flux(guidance_embeds=True)
    src = save_diffusers(torch_model)
    convert_checkpoint("flux", src, tmp_path / "ckpt", dtype="float32", progress=False)

    out = export_checkpoint(tmp_path / "ckpt", tmp_path / "exported", shard_bytes=20_000, progress=False)

    index = json.loads((out / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    back = FluxTransformer2DModel.from_pretrained(out).eval()
    assert set(back.state_dict()) == set(torch_model.state_dict())
    assert all(torch.equal(back.state_dict()[k], v) for k, v in torch_model.state_dict().items())
    inputs = flux_inputs(dict(torch_model.config), batch=1, height=2, width=2, num_txt=4)
    # from_pretrained computes on the memory-mapped file, whose alignment (set by the header's length)
    # changes CPU kernels' rounding: bit-identical weights, outputs equal to float32 rounding
    np.testing.assert_allclose(run_diffusers(back, inputs), run_diffusers(torch_model, inputs), rtol=1e-5, atol=1e-6)


def test_a_diffusers_export_writes_each_shard_as_it_fills(save_diffusers, tmp_path, monkeypatch):
    import edit_jax.checkpoints_convert.export as export

    convert_checkpoint("flux", save_diffusers(make_diffusers_flux()), tmp_path / "ckpt", dtype="float32", progress=False)
    read, read_at_write = [], []
    tensors, write = export._tree_tensors, export._write_shard
    monkeypatch.setattr(export, "_tree_tensors", lambda *a: (read.append(key) or (key, t) for key, t in tensors(*a)))
    monkeypatch.setattr(export, "_write_shard", lambda *a: (read_at_write.append(len(read)), write(*a)))

    export_checkpoint(tmp_path / "ckpt", tmp_path / "exported", shard_bytes=20_000, progress=False)

    assert len(read_at_write) > 2 and read_at_write == sorted(set(read_at_write))
    assert read_at_write[0] < len(read) // 2  # the first shard left memory long before the last tensor was read
    assert not list((tmp_path / "exported").glob("shard-*"))  # the provisional names are gone


def test_qwen_release_routers_survive_export_and_import_unchanged(tmp_path):
    from test_qwen_image import fake_release

    torch_model = make_diffusers_qwen()
    fake_release(torch_model, tmp_path / "model.safetensors")
    torch_model.save_config(tmp_path / "cfg")
    config = from_diffusers_config(tmp_path / "cfg" / "config.json")
    convert_checkpoint("qwen-image", tmp_path / "model.safetensors", tmp_path / "a", config=config, dtype="float32",
                       progress=False)

    export_checkpoint(tmp_path / "a", tmp_path / "release", "edit-release", progress=False)
    convert_checkpoint("qwen-image", tmp_path / "release" / "model.safetensors", tmp_path / "b", config=config,
                       dtype="float32", progress=False)

    jax.tree.map(np.testing.assert_array_equal, load_routers(tmp_path / "a"), load_routers(tmp_path / "b"))
    jax.tree.map(np.testing.assert_array_equal, edit_jax.load(tmp_path / "a")[1], edit_jax.load(tmp_path / "b")[1])


def test_flux_routers_are_numbered_over_double_then_single_blocks_and_read_back(tmp_path):
    config = edit_jax.preset("flux-small")
    variables = init_variables(config)
    save(tmp_path / "trained", config, variables["params"], variables["routers"])

    out = export_checkpoint(tmp_path / "trained", tmp_path / "release", "edit-release", progress=False)
    from safetensors.numpy import load_file

    keys = load_file(out / "model.safetensors")
    assert {int(k.split(".")[1]) for k in keys if k.startswith("gate_mlps.")} == set(range(2 + 4))
    np.testing.assert_array_equal(keys["gate_mlps.2.out.0.weight"],
                                  np.asarray(variables["routers"]["single_transformer_blocks"]["router"]["proj"]["kernel"][0]).T)
    convert_checkpoint("flux", out / "model.safetensors", tmp_path / "back", config=config, dtype="float32",
                       fmt="edit-release", progress=False)
    jax.tree.map(np.testing.assert_array_equal, load_routers(tmp_path / "back"), jax.tree.map(np.asarray, variables["routers"]))


def test_export_never_replaces_a_folder_it_did_not_write(tmp_path):
    config = edit_jax.preset("flux-tiny")
    save(tmp_path / "ckpt", config, init_variables(config)["params"])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")

    with pytest.raises(CheckpointError, match="not an earlier export"):
        export_checkpoint(tmp_path / "ckpt", tmp_path / "mine", overwrite=True, progress=False)
    with pytest.raises(CheckpointError, match="inside the checkpoint"):
        export_checkpoint(tmp_path / "ckpt", tmp_path / "ckpt" / "exported", progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_a_diffusers_export_writes_the_routers_beside_and_converts_back_with_them(tmp_path, capsys):
    from diffusers import FluxTransformer2DModel
    from safetensors import safe_open

    config = edit_jax.preset("flux-tiny")
    variables = init_variables(config)
    save(tmp_path / "trained", config, variables["params"], variables["routers"])

    out = export_checkpoint(tmp_path / "trained", tmp_path / "exported", shard_bytes=20_000, progress=False)

    assert "has no routers: they are in" in capsys.readouterr().err
    with safe_open(out / "routers.safetensors", "np") as f:
        assert {k.split(".")[0] for k in f.keys()} == {"gate_mlps"}
    FluxTransformer2DModel.from_pretrained(out)  # diffusers reads the folder as before
    convert_checkpoint("flux", out, tmp_path / "back", dtype="float32", progress=False)
    jax.tree.map(np.testing.assert_array_equal, load_routers(tmp_path / "back"),
                 jax.tree.map(np.asarray, variables["routers"]))


def _qwen_checkpoint(path, activation):
    import dataclasses

    config = dataclasses.replace(edit_jax.preset("qwen-image-tiny"), activation=activation)
    variables = init_variables(config)
    save(path, config, variables["params"], variables["routers"])
    return config


@pytest.mark.parametrize("activation, fmt", [("gelu_tanh", "edit-release"), ("sigmoid_gelu", "diffusers")])
def test_an_export_whose_format_runs_another_activation_is_refused_naming_both(tmp_path, activation, fmt):
    from edit_jax.checkpoints_convert.engine import ConversionError

    _qwen_checkpoint(tmp_path / "ckpt", activation)
    with pytest.raises(ConversionError, match="tanh GELU.*sigmoid|sigmoid.*tanh GELU"):
        export_checkpoint(tmp_path / "ckpt", tmp_path / "out", fmt, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("activation, fmt", [("gelu_tanh", "edit-release"), ("sigmoid_gelu", "diffusers"),
                                             ("sigmoid_gelu", "edit-release"), ("gelu_tanh", "diffusers")])
def test_the_activation_survives_an_export_and_conversion_back(tmp_path, activation, fmt):
    from edit_jax.checkpoint import load_config

    config = _qwen_checkpoint(tmp_path / "ckpt", activation)
    out = export_checkpoint(tmp_path / "ckpt", tmp_path / "out", fmt, progress=False, allow_activation_change=True)
    src = out / "model.safetensors" if fmt == "edit-release" else out
    convert_checkpoint("qwen-image", src, tmp_path / "back", config=config, dtype="float32", progress=False)
    assert load_config(tmp_path / "back").activation == activation


def test_export_refuses_an_activation_change_with_exit_2_on_the_cli(tmp_path, capsys):
    from edit_jax.cli import main

    _qwen_checkpoint(tmp_path / "ckpt", "sigmoid_gelu")
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 2
    assert "--allow-activation-change" in capsys.readouterr().err
