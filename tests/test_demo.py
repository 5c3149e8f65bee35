"""`edit-jax demo` end to end at tiny settings, and `edit-jax eval` on a tiny checkpoint."""

import json
import re

import jax
import numpy as np
import pytest

import edit_jax
import edit_jax.cli.demo as cli_demo
from edit_jax.checkpoint import save
from edit_jax.cli import main
from edit_jax.elastic.flops import ROUTING_KEYS
from edit_jax.elastic.mechanism import ElasticConfig
from edit_jax.elastic.step_cache import TaylorSeer
from edit_jax.eval.demo import Demo
from edit_jax.eval.sampling_eval import run_in_batches
from edit_jax.sampling.embeddings import embedding_conditions, read_embeddings
from edit_jax.sampling.latents import initial_noise
from edit_jax.sampling.sampler import SamplerConfig

METHODS = {"dense", "E-DiT (routers)", "E-DiT (routers+base)", "E-DiT (routers+base) + cache", "per-step schedule",
           "static pruning", "static pruning + fine-tune", "cache alone, at E-DiT's FLOPs",
           "cache alone, at E-DiT + cache's FLOPs", "MagCache", "first-block cache (per sample)",
           "TaylorSeer (first order)", "cache alone (periodic)",
           "learned reuse (routers)", "per-step reuse schedule", "learned per-step reuse schedule (Learning-to-Cache)"}
COST_FIELDS = {"flops_per_step", "flops_total", "flops_vs_dense", "blocks_executed", "mean_width", "cache_hit_rate",
               "wall_clock_s"}


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    assert main(["demo", "--settings", "tiny", "--out", str(out), "--quiet"]) == 0
    return out


def test_the_demo_writes_its_table_json_and_pictures(tiny_demo):
    summary = json.loads((tiny_demo / "results.json").read_text())
    assert {row["method"] for row in summary["methods"]} == METHODS
    for row in summary["methods"]:
        assert COST_FIELDS <= set(row) and 0 <= row["class_accuracy"] <= 1 and row["frechet_distance"] >= 0
        assert row["method"] == "dense" or {"psnr_vs_dense_db", "ssim_vs_dense"} <= set(row)
        assert row["method"] == "dense" or ("rho_g" in row) != ("flops_target" in row)  # a router budget or a FLOPs target
    assert summary["judge"]["test_accuracy"] > 0.5 and summary["judge"]["frechet_floor_real_vs_real"] >= 0
    table = (tiny_demo / "results.md").read_text()
    assert all(f"| {method} |" in table for method in METHODS)
    pictures = ["quality_vs_flops.png", "fd_vs_flops.png", "reuse_vs_caches_fd.png", "reuse_vs_caches_psnr.png",
                "router_map.png"]
    assert all((tiny_demo / p).stat().st_size > 10_000 for p in pictures)
    assert len(list((tiny_demo / "samples").glob("*.png"))) == len(summary["methods"])


def test_the_demo_keeps_its_trained_checkpoints(tiny_demo):
    runs = {p.parent.name.rsplit("-", 1)[0] for p in (tiny_demo / "runs").glob("*/edit-jax")}
    assert {"dense", "edit-rho0.5", "edit-ft-rho0.5", "reuse-rho0.5", "schedule-rho0.5"} <= runs
    assert len(list((tiny_demo / "data").glob("train-*/manifest.json"))) == 1


def test_a_rerun_reuses_the_checkpoints_and_gives_the_same_results(tiny_demo, capsys):
    first = json.loads((tiny_demo / "results.json").read_text())
    capsys.readouterr()
    assert main(["demo", "--settings", "tiny", "--out", str(tiny_demo), "--quiet"]) == 0

    assert re.search(r"dense-\w+: reusing", capsys.readouterr().err)
    second = json.loads((tiny_demo / "results.json").read_text())
    judged = ("class_accuracy", "frechet_distance", "flops_vs_dense", "blocks_executed")
    assert [[row[k] for k in judged] for row in second["methods"]] == [[row[k] for k in judged] for row in first["methods"]]


def test_a_prepared_demo_reuses_its_runs_dense_model_and_judges_a_method_beside_it(tiny_demo, capsys):
    demo = Demo.prepared(tiny_demo, [], settings="tiny")
    noise, cond = demo.conditions()
    sampler = SamplerConfig(num_steps=demo.s.sample_steps)
    dense = demo.judge_run("dense", noise, cond, sampler)
    taylor_seer = ElasticConfig(mode="dense", step_cache=TaylorSeer(cache_interval=2, disable_cache_before_step=1))
    cached = demo.judge_run("TaylorSeer", noise, cond, sampler, elastic=taylor_seer)

    assert re.search(r"dense-\w+: reusing", capsys.readouterr().err)
    first = json.loads((tiny_demo / "results.json").read_text())["methods"][0]
    assert dense["class_accuracy"] == first["class_accuracy"] and "psnr_vs_dense_db" in cached


@pytest.mark.parametrize("args, seed", [([], 0), (["--seed", "3"], 3), (["--set", "seed=3"], 3),
                                         (["--set", "seed=3", "--seed", "3"], 3)])
def test_the_seed_reaches_the_demo_given_by_flag_or_by_setting(args, seed, tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(cli_demo, "run_demo",
                        lambda settings, out, progress: ran.append(settings) or {"methods": [], "seconds": 0})
    assert main(["demo", "--settings", "tiny", "--out", str(tmp_path / "d"), *args]) == 0
    assert ran[0].seed == seed


def test_a_seed_given_twice_with_two_values_is_one_clear_error(tmp_path, capsys):
    assert main(["demo", "--settings", "tiny", "--set", "seed=1", "--seed", "2", "--out", str(tmp_path / "d")]) == 2
    assert "--seed 2 and --set seed=1 disagree" in capsys.readouterr().err


@pytest.mark.parametrize("setting, message", [
    ("nope=1", "KEY one of"), ("rho_g=high", "rho_g takes a tuple of numbers"),
    ("router_steps=-1", "router_steps=-1 must be >= 1"), ("rho_g=[0.5,1.5]", "rho_g=1.5 must be in [0, 1]"),
    ("dataset=cifar", "dataset='cifar' is not one of"), ("reuse_order=2", "reuse_order=2 is not one of (0, 1)"),
    ("rollout_loss=sample", "rollout_loss='sample' is not one of ('velocity', 'final')"),
])
def test_a_bad_setting_is_one_clear_error(tmp_path, capsys, setting, message):
    assert main(["demo", "--settings", "tiny", "--set", setting, "--out", str(tmp_path / "d")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


@pytest.fixture
def tiny_routed_ckpt(tmp_path):
    config = edit_jax.preset("flux-tiny")
    variables = edit_jax.models.init_variables(config)
    save(tmp_path / "ckpt", config, variables["params"], variables["routers"])
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "emb.npz", prompt_embeds=rng.standard_normal((2, 4, 32)).astype(np.float32),
             pooled_prompt_embeds=rng.standard_normal((2, 32)).astype(np.float32))
    return tmp_path / "ckpt", tmp_path / "emb.npz"


@pytest.mark.parametrize("mesh", [None, "data=-1"], ids=["one-device", "on-a-mesh"])
def test_eval_compares_edit_and_the_cache_with_dense_from_the_same_noise(tiny_routed_ckpt, tmp_path, capsys, mesh):
    ckpt, emb = tiny_routed_ckpt
    # fresh routers open every block at p = 0.7: a margin of 0.3 makes every block borderline for the cache
    args = ["eval", str(ckpt), "--embeddings", str(emb), "--out", str(tmp_path / "out"), "--height", "32",
            "--width", "32", "--steps", "4", "--cache-start", "1", "--delta-margin", "0.3", "--repeats", "1"]
    assert main(args + (["--mesh", mesh] if mesh else [])) == 0

    summary = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert summary["mesh"] == (None if mesh is None else {"data": 1, "fsdp": 1, "tensor": 1})
    assert summary["batch_size"] == 2  # the file's two prompts in one batch of at most 4
    methods = summary["methods"]
    assert set(methods) == {"dense", "E-DiT", "E-DiT + cache"}
    assert all(COST_FIELDS | {"psnr_db", "ssim"} <= set(m) for m in methods.values())
    assert methods["dense"]["psnr_db"] == "inf" and methods["E-DiT"]["blocks_executed"] == 1.0
    assert methods["E-DiT + cache"]["cache_hit_rate"] > 0 and methods["E-DiT + cache"]["psnr_db"] != "inf"
    assert methods["E-DiT + cache"]["flops_total"] < methods["E-DiT"]["flops_total"]
    assert methods["E-DiT"]["flops_per_step"] > methods["dense"]["flops_per_step"]  # the routers' own cost
    assert all((tmp_path / "out" / p).stat().st_size > 10_000 for p in ("router_map.png", "fidelity_vs_flops.png"))


def test_eval_with_a_step_cache_adds_the_dense_model_under_it(tiny_routed_ckpt, tmp_path, capsys):
    ckpt, emb = tiny_routed_ckpt
    args = ["eval", str(ckpt), "--embeddings", str(emb), "--out", str(tmp_path / "out"), "--height", "32",
            "--width", "32", "--steps", "4", "--repeats", "1", "--step-cache", "first-block", "--step-cache-threshold", "10"]
    assert main(args) == 0

    summary = json.loads((tmp_path / "out" / "eval.json").read_text())
    cached = summary["methods"]["dense + first_block"]
    assert cached["step_reuse_rate"] == 0.75 and cached["flops_total"] < summary["methods"]["dense"]["flops_total"]
    assert summary["step_cache"]["name"] == "first_block" and cached["psnr_db"] != "inf"


def test_eval_with_true_cfg_guides_with_the_files_negative_embeddings(tiny_routed_ckpt, tmp_path, capsys):
    ckpt, emb = tiny_routed_ckpt
    args = ["eval", str(ckpt), "--out", str(tmp_path / "out"), "--height", "32", "--width", "32", "--steps", "2",
            "--repeats", "1", "--true-cfg", "4", "--embeddings"]
    assert main(args + [str(emb)]) == 2
    assert "--true-cfg 4.0 needs negative_prompt_embeds in" in capsys.readouterr().err
    data = dict(np.load(emb))
    np.savez(tmp_path / "cfg.npz", **data, **{f"negative_{k}": np.zeros_like(v) for k, v in data.items()})
    assert main(args + [str(tmp_path / "cfg.npz")]) == 0  # the sampler refuses CFG without them: they reached it
    summary = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert (summary["true_cfg"], summary["forward_passes_per_step"]) == (4.0, 2)


def test_eval_in_batches_gives_the_latents_and_routing_of_one_batch(tiny_routed_ckpt):
    ckpt, emb = tiny_routed_ckpt
    model, params = edit_jax.load(ckpt)
    cond = embedding_conditions(model.config, read_embeddings(str(emb)), 32, 32)
    noise = initial_noise(jax.random.key(0), 2, 1, 32, 32)
    method = dict(routers=edit_jax.load_routers(ckpt), repeats=1,  # per-row decisions: a row's result is its own
                  elastic=ElasticConfig(mode="infer", decision="sample", cache=True, cache_start=1, delta_margin=0.3))
    apart = run_in_batches(model, params, noise, cond, SamplerConfig(num_steps=3), 1, **method)
    together = run_in_batches(model, params, noise, cond, SamplerConfig(num_steps=3), 2, **method)
    np.testing.assert_allclose(apart[0], together[0], rtol=1e-5, atol=1e-6)
    for key in ROUTING_KEYS:
        assert apart[1][key] == pytest.approx(together[1][key], rel=1e-6), key
    assert (apart[1]["timing_rows"], together[1]["timing_rows"]) == (1, 2)


def test_eval_checks_every_prompt_before_cutting_them_into_batches(tiny_routed_ckpt, tmp_path, capsys):
    ckpt, emb = tiny_routed_ckpt
    np.savez(tmp_path / "rows.npz", **dict(np.load(emb)) | {"pooled_prompt_embeds": np.ones((3, 32), np.float32)})
    args = ["eval", str(ckpt), "--embeddings", str(tmp_path / "rows.npz"), "--out", str(tmp_path / "out"),
            "--height", "32", "--width", "32", "--steps", "2", "--batch-size", "1"]
    assert main(args) == 2
    assert "pooled_projections has shape (3, 32), expected [2, 32]" in capsys.readouterr().err


def test_eval_of_a_checkpoint_without_routers_is_one_clear_error(tmp_path, capsys):
    config = edit_jax.preset("flux-tiny")
    save(tmp_path / "ckpt", config, edit_jax.init_params(config))
    np.savez(tmp_path / "emb.npz", prompt_embeds=np.zeros((1, 4, 32), np.float32), pooled_prompt_embeds=np.zeros((1, 32), np.float32))
    args = ["eval", str(tmp_path / "ckpt"), "--embeddings", str(tmp_path / "emb.npz"), "--out", str(tmp_path / "o"),
            "--height", "32", "--width", "32", "--steps", "2"]
    assert main(args) == 2
    assert "has no routers to evaluate" in capsys.readouterr().err


def test_eval_with_a_vae_compares_the_decoded_images_too(tiny_routed_ckpt, tmp_path):
    import torch
    from diffusers import AutoencoderKL
    from tiny_pipeline import VAE_TINY

    ckpt, emb = tiny_routed_ckpt  # flux-tiny reads 4 packed channels: a VAE of 1 latent channel
    torch.manual_seed(0)
    AutoencoderKL(**{**VAE_TINY, "latent_channels": 1}).save_pretrained(tmp_path / "vae")
    args = ["eval", str(ckpt), "--embeddings", str(emb), "--out", str(tmp_path / "out"), "--height", "32",
            "--width", "32", "--steps", "3", "--cache-start", "1", "--delta-margin", "0.3", "--repeats", "1",
            "--vae", str(tmp_path / "vae")]
    assert main(args) == 0

    methods = json.loads((tmp_path / "out" / "eval.json").read_text())["methods"]
    assert methods["dense"]["images"]["psnr_db"] == "inf" and 0 < methods["E-DiT + cache"]["images"]["ssim"] <= 1
    assert (tmp_path / "out" / "e-dit-cache-1.png").is_file()


def test_eval_with_a_vae_that_does_not_fit_the_model_is_one_error_before_sampling(tiny_routed_ckpt, tmp_path, capsys):
    import torch
    from diffusers import AutoencoderKL
    from tiny_pipeline import VAE_TINY

    ckpt, emb = tiny_routed_ckpt
    torch.manual_seed(0)
    AutoencoderKL(**{**VAE_TINY, "latent_channels": 2}).save_pretrained(tmp_path / "vae")
    args = ["eval", str(ckpt), "--embeddings", str(emb), "--out", str(tmp_path / "out"), "--height", "32",
            "--width", "32", "--steps", "2", "--vae", str(tmp_path / "vae")]
    assert main(args) == 2
    assert "(2 latent channels, 8x) does not fit the transformer (4 packed channels" in capsys.readouterr().err
