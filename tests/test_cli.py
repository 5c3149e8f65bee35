"""The `edit-jax` command line."""

import json

import pytest

from edit_jax.cli import main
from reference import make_diffusers_flux


def test_demo_writes_a_summary_whose_reload_is_identical(tmp_path, capsys):
    assert main(["demo", "--preset", "flux-tiny", "--out", str(tmp_path)]) == 0

    summary = json.loads((tmp_path / "demo.json").read_text())
    assert summary["reloaded_output_identical"] is True
    assert json.loads(capsys.readouterr().out) == summary


def test_convert_then_inspect_lists_config_and_params(save_diffusers, tmp_path, capsys):
    src = save_diffusers(make_diffusers_flux())
    assert main(["convert", "flux", str(src), str(tmp_path / "ckpt"), "--dtype", "float32"]) == 0
    capsys.readouterr()

    assert main(["inspect", str(tmp_path / "ckpt"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["family"] == "flux" and report["config"]["num_layers"] == 1
    rows = {r["path"]: r for r in report["params"]}
    assert rows["transformer_blocks/attn/to_q/kernel"]["shape"] == [1, 32, 32]
    assert report["param_count"] == sum(r["count"] for r in rows.values())


def test_convert_of_a_missing_source_is_one_clear_error(tmp_path, capsys):
    assert main(["convert", "flux", str(tmp_path / "nope"), str(tmp_path / "ckpt")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_unknown_config_value_is_a_clear_error(save_diffusers, tmp_path, capsys):
    src = save_diffusers(make_diffusers_flux())
    assert main(["convert", "flux", str(src), str(tmp_path / "ckpt"), "--config", "flux-huge"]) == 2
    assert "neither a preset" in capsys.readouterr().err


def test_bad_flag_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as e:
        main(["convert", "flux", "a", "b", "--dtype", "int8"])
    assert e.value.code == 2
    assert "invalid choice: 'int8'" in capsys.readouterr().err


def test_convert_of_a_release_lists_router_params_under_routers(tmp_path, capsys):
    from reference import make_diffusers_qwen
    from test_qwen_image import fake_release

    torch_model = make_diffusers_qwen()
    fake_release(torch_model, tmp_path / "model.safetensors")
    torch_model.save_config(tmp_path / "cfg")
    args = ["convert", "qwen-image", str(tmp_path / "model.safetensors"), str(tmp_path / "ckpt")]
    assert main(args + ["--config", str(tmp_path / "cfg" / "config.json"), "--dtype", "float32"]) == 0
    capsys.readouterr()

    assert main(["inspect", str(tmp_path / "ckpt"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    params = {r["path"]: r for r in report["params"]}
    routers = {r["path"]: r for r in report["routers"]}
    assert routers["transformer_blocks/router/width_head/kernel"]["shape"] == [2, 128, 4]
    assert params["transformer_blocks/img_mlp/fc1/kernel"]["shape"] == [2, 64, 256]
    assert not any("router" in p for p in params)
    assert report["param_count"] == sum(r["count"] for r in params.values())
    assert report["routers_count"] == sum(r["count"] for r in routers.values())


def test_order_channels_writes_a_reordered_checkpoint_and_refuses_trained_routers(tmp_path, capsys):
    import edit_jax
    from edit_jax.checkpoint import save

    config = edit_jax.preset("qwen-image-tiny")
    variables = edit_jax.models.init_variables(config)
    save(tmp_path / "base", config, variables["params"])
    save(tmp_path / "trained", config, variables["params"], variables["routers"])

    assert main(["order-channels", str(tmp_path / "base"), str(tmp_path / "ordered"), "--batches", "1"]) == 0
    assert len(json.loads(capsys.readouterr().out)["importance_kept_at_half_width"]) == 1
    assert main(["order-channels", str(tmp_path / "trained"), str(tmp_path / "x")]) == 2
    assert "holds trained routers" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_sample_writes_latents_and_per_step_records(tmp_path, capsys):
    import numpy as np

    import edit_jax
    from edit_jax.checkpoint import save

    config = edit_jax.preset("flux-small")
    variables = edit_jax.models.init_variables(config)
    save(tmp_path / "ckpt", config, variables["params"], variables["routers"])
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "emb.npz", prompt_embeds=rng.standard_normal((1, 8, 64)).astype(np.float32),
             pooled_prompt_embeds=rng.standard_normal((1, 32)).astype(np.float32))

    args = ["sample", str(tmp_path / "ckpt"), "--embeddings", str(tmp_path / "emb.npz"), "--out", str(tmp_path / "out"),
            "--height", "64", "--width", "64", "--steps", "3", "--elastic", "infer", "--cache", "--cache-start", "1"]
    assert main(args) == 0

    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["shape"] == [1, 4, 8, 8]
    assert np.load(tmp_path / "out" / "latents.npy").shape == (1, 4, 8, 8)
    assert len(summary["executed_fraction_per_step"]) == 3
    assert np.load(tmp_path / "out" / "records.npz")["p"].shape == (3, 1, 6)


def test_sample_without_routers_in_elastic_mode_is_a_clear_error(tmp_path, capsys):
    import numpy as np

    import edit_jax
    from edit_jax.checkpoint import save

    config = edit_jax.preset("flux-tiny")
    save(tmp_path / "ckpt", config, edit_jax.init_params(config))
    np.savez(tmp_path / "emb.npz", prompt_embeds=np.zeros((1, 4, 32), np.float32), pooled_prompt_embeds=np.zeros((1, 32), np.float32))
    args = ["sample", str(tmp_path / "ckpt"), "--embeddings", str(tmp_path / "emb.npz"), "--out", str(tmp_path / "o"),
            "--height", "32", "--width", "32", "--steps", "2", "--elastic", "infer"]
    assert main(args) == 2
    assert "has no routers" in capsys.readouterr().err
