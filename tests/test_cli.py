"""The `edit-jax` command line."""

import json

import jax
import numpy as np
import pytest

from edit_jax.cli import main
from reference import make_diffusers_flux


def test_smoke_writes_a_summary_whose_reload_is_identical(tmp_path, capsys):
    assert main(["smoke", "--preset", "flux-tiny", "--out", str(tmp_path)]) == 0

    summary = json.loads((tmp_path / "smoke.json").read_text())
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


def test_convert_stores_the_width_groups_asked_for_and_refuses_one_that_does_not_divide_the_widths(
        save_diffusers, tmp_path, capsys):
    src = save_diffusers(make_diffusers_flux())  # M = 128: widths 32, 64, 96, 128
    assert main(["convert", "flux", str(src), str(tmp_path / "ckpt"), "--width-groups", "2"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "ckpt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["width_groups"] == 2

    assert main(["convert", "flux", str(src), str(tmp_path / "bad"), "--width-groups", "3"]) == 2
    assert "width_groups=3 must be a positive int dividing every width bucket" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_unknown_config_value_is_a_clear_error(save_diffusers, tmp_path, capsys):
    src = save_diffusers(make_diffusers_flux())
    assert main(["convert", "flux", str(src), str(tmp_path / "ckpt"), "--config", "flux-huge"]) == 2
    assert "neither a preset" in capsys.readouterr().err


def test_bad_flag_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as e:
        main(["convert", "flux", "a", "b", "--dtype", "int8"])
    assert e.value.code == 2
    assert "invalid choice: 'int8'" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["sample", "c", "--embeddings", "e.npz", "--out", "o", "--steps", "0"], "argument --steps: 0 must be >= 1"),
    (["eval", "c", "--embeddings", "e.npz", "--repeats", "0"], "argument --repeats: 0 must be >= 1"),
    (["export", "c", "o", "--shard-gb", "nan"], "argument --shard-gb: nan must be > 0"),
    (["generate", "--model", "m", "--prompt", "p", "--height", "ten"], "argument --height: 'ten' is not an integer"),
    (["sample", "c", "--embeddings", "e.npz", "--out", "o", "--mesh", "data"], "argument --mesh: 'data': give AXIS=N pairs"),
], ids=["no-steps", "no-repeats", "nan-shard-size", "height-not-a-number", "mesh-unreadable"])
def test_a_count_or_size_out_of_range_is_rejected_by_the_parser(capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("command", [
    ["sample", "ckpt", "--embeddings", "e.npz"], ["eval", "ckpt", "--embeddings", "e.npz"],
    ["generate", "--model", "m", "--prompt", "a cat"], ["demo"], ["smoke"],
], ids=lambda c: c[0])
def test_an_out_folder_holding_files_the_command_does_not_write_is_refused_and_kept(tmp_path, capsys, command):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(command + ["--out", str(out)]) == 2
    assert f"holds notes.txt, which `edit-jax {command[0]}` does not write" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine" and len(list(out.iterdir())) == 1


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
    assert (tmp_path / "out" / "router_map.png").stat().st_size > 10_000


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


@pytest.mark.parametrize("flags, message", [
    (["--elastic", "infer", "--tau", "2"], "elastic tau 2.0 must be in [0, 1]"),
    (["--cache"], "--cache acts on E-DiT's routers: add --elastic infer"),
], ids=["tau-no-router-passes", "cache-without-routers"])
def test_sample_refuses_e_dit_flags_that_cannot_work_before_reading_weights(tmp_path, capsys, flags, message):
    args = ["sample", str(tmp_path / "no-such-ckpt"), "--embeddings", str(tmp_path / "no.npz"), "--out", str(tmp_path / "o")]
    assert main(args + flags) == 2
    assert message in capsys.readouterr().err


def sample_args(ckpt, emb, out, *extra):
    return ["sample", str(ckpt), "--embeddings", str(emb), "--out", str(out), "--height", "64", "--width", "64",
            "--steps", "2", *extra]


@pytest.mark.parametrize("extra, message", [  # argparse keeps a flag's last value
    (["--height", "100", "--width", "100"], "not a multiple of 16"),
    (["--embeddings", "{tmp}/nope.npz"], "nope.npz: no such file"),
    (["--out", "{tmp}/emb.npz"], "is an existing file"),
    (["--elastic", "infer"], "has no routers"),
    (["--embeddings", "{tmp}/nan.npz"], "'prompt_embeds' holds NaN or infinite values"),
    (["--embeddings", "{tmp}/rows.npz"], "pooled_projections has shape (2, 32), expected [1, 32]"),
    (["--mesh", "data=2"], "mesh {'data': 2, 'fsdp': 1, 'tensor': 1} needs 2 devices, have 1"),
], ids=["size", "embeddings", "out-is-a-file", "no-routers", "nan", "rows", "mesh-too-large"])
def test_bad_sample_input_is_one_clear_error_before_any_work(flux_small_ckpt, tmp_path, capsys, extra, message):
    import numpy as np

    ckpt, emb = flux_small_ckpt
    good = dict(np.load(emb))
    np.savez(tmp_path / "nan.npz", **good | {"prompt_embeds": np.full_like(good["prompt_embeds"], np.nan)})
    np.savez(tmp_path / "rows.npz", **good | {"pooled_prompt_embeds": np.ones((2, 32), np.float32)})
    extra = [x.format(tmp=tmp_path) for x in extra]
    assert main(sample_args(ckpt, emb, tmp_path / "out", *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_sample_with_fresh_routers_runs_e_dit_on_a_checkpoint_without_routers(flux_small_ckpt, tmp_path, capsys):
    ckpt, emb = flux_small_ckpt
    assert main(sample_args(ckpt, emb, tmp_path / "out", "--elastic", "infer", "--fresh-routers")) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["executed_fraction_per_step"] == [1.0, 1.0]  # full-capacity routers keep every block


def test_sample_on_a_mesh_of_every_device_gives_the_one_device_latents(flux_small_ckpt, tmp_path):
    import numpy as np

    ckpt, emb = flux_small_ckpt
    assert main(sample_args(ckpt, emb, tmp_path / "one")) == 0
    assert main(sample_args(ckpt, emb, tmp_path / "mesh", "--mesh", "data=-1")) == 0
    np.testing.assert_allclose(np.load(tmp_path / "mesh" / "latents.npy"), np.load(tmp_path / "one" / "latents.npy"),
                               rtol=1e-5, atol=1e-6)


def test_sample_in_bfloat16_runs_the_transformer_in_it_and_stays_near_float32(flux_small_ckpt, tmp_path):
    ckpt, emb = flux_small_ckpt
    assert main(sample_args(ckpt, emb, tmp_path / "f32")) == 0  # auto: float32 on CPU
    assert main(sample_args(ckpt, emb, tmp_path / "bf16", "--dtype", "bfloat16")) == 0
    f32, bf16 = (np.load(tmp_path / name / "latents.npy") for name in ("f32", "bf16"))
    assert [json.loads((tmp_path / n / "summary.json").read_text())["dtype"] for n in ("f32", "bf16")] == [
        "float32", "bfloat16"]
    error = np.linalg.norm(bf16 - f32) / np.linalg.norm(f32)
    assert 1e-4 < error < 5e-2  # bfloat16's rounding, not another computation
    assert bf16.dtype == np.float32  # the latents are updated in float32


def test_auto_dtype_is_float32_on_cpu_and_a_dtype_name_is_checked():
    from edit_jax.config import ConfigError, resolve_dtype

    assert resolve_dtype("auto") == "float32" and resolve_dtype("bfloat16") == "bfloat16"
    with pytest.raises(ConfigError, match="dtype='fp8'"):
        resolve_dtype("fp8")


class FakeDevice:
    def __init__(self, platform, device_kind):
        self.platform, self.device_kind = platform, device_kind


@pytest.mark.parametrize("device, dtype, want", [
    (FakeDevice("gpu", "NVIDIA H100 80GB HBM3"), "bfloat16", "cudnn"),
    (FakeDevice("gpu", "NVIDIA H200"), "float16", "cudnn"),
    (FakeDevice("gpu", "NVIDIA H200"), "float32", "xla"),  # cuDNN's flash kernels take 16-bit inputs
    (FakeDevice("gpu", "AMD Instinct MI300X"), "bfloat16", "xla"),
    (FakeDevice("tpu", "TPU v5 lite"), "bfloat16", "xla"),
    (FakeDevice("cpu", "cpu"), "bfloat16", "xla")])
def test_auto_attention_is_cudnn_on_an_nvidia_gpu_in_16_bits_and_xla_elsewhere(monkeypatch, device, dtype, want):
    from edit_jax.config import resolve_attention

    monkeypatch.setattr(jax, "devices", lambda *a: [device])
    assert resolve_attention("auto", dtype) == want and resolve_attention("splash", dtype) == "splash"


def test_sample_records_the_attention_it_ran(flux_small_ckpt, tmp_path):
    ckpt, emb = flux_small_ckpt
    assert main(sample_args(ckpt, emb, tmp_path / "auto")) == 0
    assert json.loads((tmp_path / "auto" / "summary.json").read_text())["attention"] == "xla"  # auto, on CPU


def test_sample_in_batches_writes_the_latents_and_records_of_one_batch(flux_small_ckpt, tmp_path):
    ckpt, _ = flux_small_ckpt
    rng = np.random.default_rng(1)
    arrays = {"prompt_embeds": rng.standard_normal((3, 8, 64)), "pooled_prompt_embeds": rng.standard_normal((3, 32))}
    np.savez(tmp_path / "cfg.npz", **{k: v.astype(np.float32) for k, v in arrays.items()},
             **{f"negative_{k}": np.zeros_like(v, np.float32) for k, v in arrays.items()})
    e_dit = ["--elastic", "infer", "--fresh-routers", "--decision", "sample", "--cache", "--cache-start", "1",
             "--delta-margin", "0.3", "--true-cfg", "3", "--steps", "3"]  # per-row decisions; true CFG stacks rows
    assert main(sample_args(ckpt, tmp_path / "cfg.npz", tmp_path / "whole", *e_dit)) == 0
    assert main(sample_args(ckpt, tmp_path / "cfg.npz", tmp_path / "apart", *e_dit, "--batch-size", "2")) == 0
    np.testing.assert_allclose(np.load(tmp_path / "apart" / "latents.npy"), np.load(tmp_path / "whole" / "latents.npy"),
                               rtol=1e-4, atol=1e-5)  # float32 sums blocked by batch size
    whole, apart = (dict(np.load(tmp_path / name / "records.npz")) for name in ("whole", "apart"))
    assert whole["executed"].shape[1] == 6 and whole["cache_hit"].any()
    for key in whole:
        np.testing.assert_allclose(apart[key], whole[key], rtol=1e-4, atol=1e-5, err_msg=key)


def test_dense_sample_writes_no_records(flux_small_ckpt, tmp_path):
    ckpt, emb = flux_small_ckpt
    assert main(sample_args(ckpt, emb, tmp_path / "out")) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["latents.npy", "summary.json"]


def test_a_rerun_into_an_earlier_output_leaves_none_of_its_stale_files(flux_small_ckpt, tmp_path):
    ckpt, emb = flux_small_ckpt
    assert main(sample_args(ckpt, emb, tmp_path / "out", "--elastic", "infer", "--fresh-routers")) == 0
    assert main(sample_args(ckpt, emb, tmp_path / "out")) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["latents.npy", "summary.json"]


def test_inspect_of_a_checkpoint_with_missing_array_data_is_an_error(flux_small_ckpt, capsys):
    ckpt, _ = flux_small_ckpt
    for data in ckpt.glob("params/**/d/*"):
        data.unlink()
    assert main(["inspect", str(ckpt)]) == 2
    assert "missing data file" in capsys.readouterr().err


def test_inspect_of_a_checkpoint_missing_its_array_manifest_is_an_error(flux_small_ckpt, capsys):
    ckpt, _ = flux_small_ckpt
    for manifest in ckpt.glob("params/*/manifest.ocdbt"):
        manifest.unlink()
    assert main(["inspect", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert "manifest.ocdbt" in err and "Traceback" not in err


def test_inspect_verify_reads_every_array(flux_small_ckpt, capsys):
    ckpt, _ = flux_small_ckpt
    assert main(["inspect", str(ckpt), "--verify"]) == 0
    assert "every array read and finite" in capsys.readouterr().out


def test_a_calibration_file_of_the_other_family_is_a_clear_error(flux_small_ckpt, tmp_path, capsys):
    import numpy as np

    ckpt, _ = flux_small_ckpt
    np.savez(tmp_path / "qwen.npz", hidden_states=np.zeros((1, 4, 64)), encoder_hidden_states=np.zeros((1, 4, 16)),
             timestep=np.zeros(1), img_shapes=np.array([1, 2, 2]))
    assert main(["order-channels", str(ckpt), str(tmp_path / "o"), "--calibration", str(tmp_path / "qwen.npz")]) == 2
    assert "does not hold flux model inputs" in capsys.readouterr().err


def test_a_calibration_file_that_is_not_arrays_is_an_error_naming_the_flag(flux_small_ckpt, tmp_path, capsys):
    ckpt, _ = flux_small_ckpt
    (tmp_path / "notes.npz").write_text("not arrays")
    assert main(["order-channels", str(ckpt), str(tmp_path / "o"), "--calibration", str(tmp_path / "notes.npz")]) == 2
    assert f"--calibration {tmp_path / 'notes.npz'} is not an .npz or .safetensors file" in capsys.readouterr().err


@pytest.mark.parametrize("name, content, message", [
    ("prompts.txt", "a cat\na dog\n", "is not an .npz or .safetensors file of named arrays (a text file)"),
    ("one.npy", None, "(an .npy array)"),
    ("objects.npz", {"prompt_embeds": [{"a": 1}]}, "it holds pickled objects, which edit-jax never loads"),
], ids=["prompts-text", "npy", "pickled"])
def test_eval_of_a_file_that_is_not_embeddings_says_how_to_make_them_and_never_suggests_pickles(
        flux_small_ckpt, tmp_path, capsys, name, content, message):
    import numpy as np

    ckpt, _ = flux_small_ckpt
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content)
    elif content is None:
        np.save(path, np.zeros(3))
    else:
        np.savez(path, prompt_embeds=np.array(content["prompt_embeds"], dtype=object))
    assert main(["eval", str(ckpt), "--embeddings", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and "edit-jax encode-prompts --model" in err
    assert "allow_pickle" not in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_order_channels_reports_the_importance_kept_by_the_order_it_wrote(flux_small_ckpt, tmp_path, capsys):
    ckpt, _ = flux_small_ckpt
    assert main(["order-channels", str(ckpt), str(tmp_path / "o"), "--batches", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    for after, before in zip(report["importance_kept_at_half_width"], report["importance_kept_at_half_width_before"]):
        assert after > 0.5 and after >= before


def test_smoke_of_a_model_too_large_for_this_machine_says_what_it_needs(tmp_path, capsys, monkeypatch):
    import edit_jax.eval.smoke

    monkeypatch.setattr(edit_jax.eval.smoke, "available_memory_bytes", lambda: 16 << 30)
    assert main(["smoke", "--preset", "flux-dev", "--out", str(tmp_path / "d")]) == 2
    assert "needs about" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_help_shows_defaults_and_explains_the_embeddings(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # help wraps at the terminal's width
    assert "(default: 0.015)" in text and "pooled_prompt_embeds [B, 768]" in text and "--cache-start" in text


def test_help_that_names_its_default_does_not_repeat_it(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: as stored)" in text and "(default: None)" not in text


def test_help_leaves_out_the_default_of_a_flag_that_is_unset_by_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--distributed" in text and "(default: None)" not in text and "(default: False)" not in text


def test_an_embeddings_file_may_hold_its_prompts_as_text(tmp_path):
    from edit_jax.sampling.embeddings import read_embeddings

    np.savez(tmp_path / "emb.npz", prompt_embeds=np.zeros((1, 4, 8), np.float32), prompts=np.array(["a cat"]))
    assert list(read_embeddings(str(tmp_path / "emb.npz"))["prompts"]) == ["a cat"]
