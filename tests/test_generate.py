"""Prompt to image: FLUX text encoding at the edge, the embedding cache, and `edit-jax generate`
against diffusers' FluxPipeline on the same tiny components."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from edit_jax.cli import main
from edit_jax.elastic import ElasticConfig
from edit_jax.sampling.sampler import SamplerConfig
from reference import relative_error
from tiny_pipeline import make_tiny_flux_pipeline

PROMPTS = ["a red fox in the snow", "two cats"]


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline") / "FLUX.1-tiny"
    return make_tiny_flux_pipeline(folder), folder


def test_text_embeddings_equal_the_pipelines_encode_prompt(tiny_pipeline):
    from edit_jax.pipelines.text_encoders import FluxTextEncoder

    pipe, folder = tiny_pipeline
    ours = FluxTextEncoder(folder, max_sequence_length=16, device="cpu")(PROMPTS)
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(PROMPTS, prompt_2=None, device="cpu", max_sequence_length=16)
    np.testing.assert_array_equal(ours["prompt_embeds"], embeds.numpy())
    np.testing.assert_array_equal(ours["pooled_prompt_embeds"], pooled.numpy())


def test_the_embedding_cache_encodes_a_prompt_once(tiny_pipeline, tmp_path, monkeypatch):
    from edit_jax.pipelines.text_encoders import EmbeddingCache, FluxTextEncoder

    _, folder = tiny_pipeline
    encoder, cache = FluxTextEncoder(folder, max_sequence_length=16, device="cpu"), EmbeddingCache(tmp_path / "cache")
    first = encoder(PROMPTS, cache)
    calls = []
    original = encoder.encode
    monkeypatch.setattr(encoder, "encode", lambda prompts: calls.append(list(prompts)) or original(prompts))
    again = encoder(PROMPTS + ["a new prompt"], cache)

    assert calls == [["a new prompt"]]
    np.testing.assert_array_equal(again["prompt_embeds"][:2], first["prompt_embeds"])
    other = FluxTextEncoder(folder, max_sequence_length=8, device="cpu")
    assert other.key(PROMPTS[0]) != encoder.key(PROMPTS[0])  # the settings are part of the key


def test_a_quiet_encoder_loads_without_progress_bars_and_leaves_them_as_they_were(tiny_pipeline, capsys):
    from diffusers.utils import logging as diffusers_logging

    from edit_jax.pipelines.text_encoders import FluxTextEncoder

    _, folder = tiny_pipeline
    FluxTextEncoder(folder, max_sequence_length=16, device="cpu", progress=False)
    assert "Loading" not in capsys.readouterr().err
    assert diffusers_logging.is_progress_bar_enabled()


def test_encode_prompts_writes_the_pipelines_embeddings_for_sample_and_eval(tiny_pipeline, tmp_path):
    from edit_jax.sampling.embeddings import read_embeddings

    pipe, folder = tiny_pipeline
    assert main(["encode-prompts", "--model", str(folder), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                 "--negative-prompt", "blurry", "--batch-size", "1", "--max-sequence-length", "16",
                 "--embeddings-cache", "none", "--out", str(tmp_path / "emb.npz"), "--quiet"]) == 0
    data = read_embeddings(str(tmp_path / "emb.npz"))
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(PROMPTS, prompt_2=None, device="cpu", max_sequence_length=16)
        negative, negative_pooled, _ = pipe.encode_prompt(["blurry"] * 2, prompt_2=None, device="cpu",
                                                          max_sequence_length=16)
    np.testing.assert_allclose(data["prompt_embeds"], embeds.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(data["pooled_prompt_embeds"], pooled.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(data["negative_prompt_embeds"], negative.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(data["negative_pooled_prompt_embeds"], negative_pooled.numpy(), rtol=1e-5, atol=1e-6)
    assert list(data["prompts"]) == PROMPTS
    assert not [f.name for f in tmp_path.iterdir() if f.name != "emb.npz"]  # no scratch file left


def test_encode_prompts_replaces_only_an_earlier_embeddings_file(tiny_pipeline, tmp_path, capsys):
    _, folder = tiny_pipeline
    args = ["encode-prompts", "--model", str(folder), "--prompt", "a cat", "--max-sequence-length", "8",
            "--embeddings-cache", "none", "--quiet", "--out"]
    (tmp_path / "notes.npz").write_text("mine")
    assert main(args + [str(tmp_path / "notes.npz"), "--overwrite"]) == 2
    assert "is not an embeddings file" in capsys.readouterr().err
    assert (tmp_path / "notes.npz").read_text() == "mine"
    assert main(args + [str(tmp_path / "emb.npz")]) == 0
    assert main(args + [str(tmp_path / "emb.npz")]) == 2
    assert "already exists (--overwrite replaces" in capsys.readouterr().err
    assert main(args + [str(tmp_path / "emb.npz"), "--overwrite"]) == 0


def test_diffusers_weights_load_in_the_dtype_asked_for(tiny_pipeline):
    import jax

    from edit_jax.pipelines.generate import load_transformer

    _, folder = tiny_pipeline
    model, params, routers = load_transformer(folder / "transformer", "flux", dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype("bfloat16")}
    assert model.config.runtime.dtype == "bfloat16" and routers is None


def test_text_encoders_run_in_bfloat16_on_cuda_under_auto_and_in_float32_off_it():
    from edit_jax.pipelines.text_encoders import device_and_dtype

    assert device_and_dtype("cuda", "auto") == ("cuda", "bfloat16")
    assert device_and_dtype("cuda:1", "float16") == ("cuda:1", "float16")
    assert device_and_dtype("cpu", "auto") == device_and_dtype("cpu", "bfloat16") == ("cpu", "float32")


def test_text_encoders_run_in_float32_off_cuda_whatever_the_dtype(tiny_pipeline):
    from edit_jax.pipelines.text_encoders import FluxTextEncoder

    _, folder = tiny_pipeline
    encoders = [FluxTextEncoder(folder, max_sequence_length=8, device="cpu", dtype=d) for d in ("float32", "auto", "bfloat16")]
    assert {e.dtype for e in encoders} == {"float32"} and len({e.key("a cat") for e in encoders}) == 1


def test_generate_equals_the_diffusers_flux_pipeline(tiny_pipeline, tmp_path):
    from edit_jax.pipelines.generate import generate

    pipe, folder = tiny_pipeline
    noise = np.random.default_rng(0).standard_normal((2, 12, 16)).astype(np.float32)  # 64 x 48 px
    with torch.no_grad():
        ref = pipe(PROMPTS, latents=torch.from_numpy(noise), height=64, width=48, num_inference_steps=4,
                   guidance_scale=3.5, max_sequence_length=512, output_type="np").images
    result = generate(folder, PROMPTS, tmp_path / "out", sampler=SamplerConfig(num_steps=4, guidance_scale=3.5),
                      height=64, width=48, noise=noise, progress=False, batch_size=1)  # one prompt at a time: the same images as diffusers' batch
    ours = np.clip(result["images"] / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    assert relative_error(ours, ref) <= 1e-4
    summary = json.loads((tmp_path / "out" / "generate.json").read_text())
    assert set(summary["timings_s"]) == {"encode_s", "denoise_s", "decode_s"} and summary["batch_size"] == 1
    assert all((tmp_path / "out" / f"image-{i}.png").is_file() for i in range(2))


def test_the_cli_generates_pngs_and_a_run_json(tiny_pipeline, tmp_path):
    from PIL import Image

    _, folder = tiny_pipeline
    args = ["generate", "--model", str(folder), "--prompt", "a cat", "--height", "64", "--width", "64",
            "--steps", "2", "--out", str(tmp_path / "o"), "--embeddings-cache", str(tmp_path / "c"), "--quiet"]
    assert main(args) == 0
    assert Image.open(tmp_path / "o" / "image-0.png").size == (64, 64)
    assert len(list((tmp_path / "c").glob("*.npz"))) == 1


def test_batches_read_back_from_the_cache_give_the_images_of_one_batch_in_memory(tiny_pipeline, tmp_path, monkeypatch):
    from edit_jax.sampling import batches as module  # where generate's batches are sampled
    from edit_jax.pipelines.generate import generate

    _, folder = tiny_pipeline
    prompts, settings = PROMPTS + ["a third prompt"], dict(sampler=SamplerConfig(num_steps=2), height=32, width=32,
                                                           progress=False)
    whole = generate(folder, prompts, tmp_path / "whole", batch_size=3, **settings)["images"]
    rows, sample = [], module.sample
    monkeypatch.setattr(module, "sample", lambda model, params, noise, *a, **k: (
        rows.append(noise.shape[0]), sample(model, params, noise, *a, **k))[1])
    batched = generate(folder, prompts, tmp_path / "batched", batch_size=2, embeddings_cache=tmp_path / "c", **settings)
    np.testing.assert_allclose(batched["images"], whole, rtol=1e-5, atol=1e-5)
    assert len(list((tmp_path / "c").glob("*.npz"))) == 3
    assert rows == [2, 2] and len(batched["images"]) == 3  # the last batch padded to the compiled size


def test_e_dit_images_with_the_cache_do_not_depend_on_the_batch_size(tiny_pipeline, tmp_path, monkeypatch):
    import edit_jax
    from edit_jax.checkpoint import save
    from edit_jax.pipelines import generate as module
    from edit_jax.pipelines.generate import generate

    titles, plot = [], module.plot_router_map
    monkeypatch.setattr(module, "plot_router_map", lambda *a, **k: titles.append(k["title"]) or plot(*a, **k))

    _, folder = tiny_pipeline
    config = edit_jax.from_diffusers_config(folder / "transformer")
    variables = edit_jax.models.init_variables(config)  # fresh routers: every block at p = 0.7
    save(tmp_path / "edit", config, variables["params"], variables["routers"])
    elastic = ElasticConfig(mode="infer", decision="sample", cache=True, cache_start=1, delta_margin=0.3)
    settings = dict(sampler=SamplerConfig(num_steps=3), height=32, width=32, progress=False,
                    transformer=tmp_path / "edit", elastic=elastic)  # every block borderline: the cache reuses
    one = generate(folder, PROMPTS, tmp_path / "one", batch_size=1, **settings)
    two = generate(folder, PROMPTS, tmp_path / "two", batch_size=2, **settings)
    np.testing.assert_allclose(two["images"], one["images"], rtol=1e-5, atol=1e-5)
    assert one["summary"]["routing"]["cache_hit_rate"] > 0 and one["summary"]["e_dit"]["decision"] == "sample"
    assert titles[0].startswith("E-DiT + cache routing of prompt 0")  # the router map says the cache ran too


def test_a_folder_without_a_component_is_one_error_naming_it(tiny_pipeline, tmp_path, capsys):
    import shutil

    _, folder = tiny_pipeline
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "vae")
    assert main(["generate", "--model", str(broken), "--prompt", "a cat", "--out", str(tmp_path / "o")]) == 2
    assert "no vae/" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("setting, message", [
    ({"use_karras_sigmas": True}, "turns on use_karras_sigmas"),
    ({"_class_name": "FlowMatchHeunDiscreteScheduler"}, "the scheduler is FlowMatchHeunDiscreteScheduler"),
], ids=["karras-sigmas", "heun"])
def test_a_scheduler_sample_does_not_reproduce_is_one_error_before_any_prompt_is_encoded(tiny_pipeline, tmp_path, capsys,
                                                                                         monkeypatch, setting, message):
    import json
    import shutil

    from edit_jax.pipelines import text_encoders

    _, folder = tiny_pipeline
    changed = tmp_path / "changed"
    shutil.copytree(folder, changed)
    config = changed / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **setting}))
    monkeypatch.setattr(text_encoders.FluxTextEncoder, "__init__", lambda *a, **k: pytest.fail("the encoders were loaded"))
    assert main(["generate", "--model", str(changed), "--prompt", "a cat", "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def tiny_qwen_pipeline(tmp_path_factory):
    from tiny_pipeline import make_tiny_qwen_pipeline

    folder = tmp_path_factory.mktemp("pipeline") / "Qwen-Image-tiny"
    return make_tiny_qwen_pipeline(folder), folder


def test_qwen_text_embeddings_equal_the_pipelines_encode_prompt(tiny_qwen_pipeline):
    from edit_jax.pipelines.text_encoders import QwenImageTextEncoder

    pipe, folder = tiny_qwen_pipeline
    ours = QwenImageTextEncoder(folder, device="cpu")(PROMPTS)
    with torch.no_grad():
        embeds, mask = pipe.encode_prompt(PROMPTS, device="cpu")
    np.testing.assert_array_equal(ours["prompt_embeds"], embeds.numpy())
    np.testing.assert_array_equal(ours["prompt_embeds_mask"], mask.numpy())  # the shorter prompt is padded
    assert ours["prompt_embeds_mask"][1].sum() < ours["prompt_embeds_mask"][0].sum()


def test_cached_qwen_prompts_are_padded_to_the_batchs_longest(tiny_qwen_pipeline, tmp_path):
    from edit_jax.pipelines.text_encoders import EmbeddingCache, QwenImageTextEncoder

    _, folder = tiny_qwen_pipeline
    encoder, cache = QwenImageTextEncoder(folder, device="cpu"), EmbeddingCache(tmp_path / "cache")
    together = encoder(PROMPTS)
    apart = [encoder([p], cache) for p in PROMPTS]
    again = encoder(PROMPTS, cache)  # both rows from the cache
    np.testing.assert_array_equal(again["prompt_embeds_mask"], together["prompt_embeds_mask"])
    np.testing.assert_allclose(again["prompt_embeds"], together["prompt_embeds"], rtol=1e-5, atol=1e-6)
    assert apart[1]["prompt_embeds"].shape[1] == apart[1]["prompt_embeds_mask"].sum()  # alone: no padding


def test_encoded_qwen_prompts_in_several_batches_are_padded_to_the_longest(tiny_qwen_pipeline, tmp_path):
    from edit_jax.pipelines.encode_prompts import encode_prompts

    pipe, folder = tiny_qwen_pipeline
    summary = encode_prompts(folder, PROMPTS[::-1], tmp_path / "emb.npz", batch_size=1, progress=False)
    with np.load(tmp_path / "emb.npz") as data:
        ours = dict(data)
    with torch.no_grad():
        embeds, mask = pipe.encode_prompt(PROMPTS[::-1], device="cpu")
    np.testing.assert_array_equal(ours["prompt_embeds_mask"], mask.numpy())
    np.testing.assert_allclose(ours["prompt_embeds"], embeds.numpy(), rtol=1e-5, atol=1e-6)
    assert summary["family"] == "qwen-image" and summary["arrays"]["prompt_embeds_mask"] == list(mask.shape)


def test_generate_equals_the_diffusers_qwen_image_pipeline_with_true_cfg(tiny_qwen_pipeline, tmp_path):
    from edit_jax.pipelines.generate import generate

    pipe, folder = tiny_qwen_pipeline
    noise = np.random.default_rng(0).standard_normal((2, 12, 16)).astype(np.float32)  # 64 x 48 px
    with torch.no_grad():
        ref = pipe(PROMPTS, negative_prompt=[" "] * 2, true_cfg_scale=4.0, latents=torch.from_numpy(noise), height=64,
                   width=48, num_inference_steps=3, output_type="np").images
    result = generate(folder, PROMPTS, tmp_path / "out", sampler=SamplerConfig(num_steps=3, true_cfg_scale=4.0),
                      negative_prompt=" ", height=64, width=48, noise=noise, progress=False)
    ours = np.clip(result["images"] / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    assert relative_error(ours, ref) <= 1e-4
    assert result["summary"]["family"] == "qwen-image"
    assert result["summary"]["routing"]["flops_vs_dense"] == 1.0 and result["summary"]["routing"]["flops_per_step"] > 0


def test_true_cfg_without_a_negative_prompt_is_one_clear_error(tiny_qwen_pipeline, tmp_path, capsys):
    _, folder = tiny_qwen_pipeline
    assert main(["generate", "--model", str(folder), "--prompt", "a cat", "--true-cfg", "4",
                 "--out", str(tmp_path / "o")]) == 2
    assert "--true-cfg 4.0 needs --negative-prompt" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags, message", [
    (["--cache"], "--cache and --cache-start act on E-DiT's routers: add --elastic infer"),
    (["--height", "1000"], "height 1000 is not a multiple of 16 pixels"),
    (["--max-sequence-length", "513"], "max_sequence_length 513: FLUX's T5 reads 1 to 512 tokens"),
    (["--mesh", "tensor=64"], "needs 64 devices, have 1"),
    (["--elastic", "infer"], "transformer has no routers (train them with `edit-jax train`, then give --transformer"),
    (["--transformer", "no-such-weights"], "no-such-weights: no such file or folder"),
    (["--elastic", "infer", "--tau", "2"], "elastic tau 2.0 must be in [0, 1]"),
    (["--tile-size", "1001"], "--tile-size 1001: give a multiple of 32 px"),
    (["--tile-size", "8"], "--tile-size 8: give a multiple of 32 px"),
], ids=["cache-without-routers", "size", "longer-than-t5", "mesh-larger-than-the-devices", "e-dit-without-routers",
        "missing-transformer", "tau-out-of-range", "tile-off-the-scale", "tile-below-one-step"])
def test_flags_that_cannot_work_are_one_clear_error_before_any_prompt_is_encoded(tiny_pipeline, tmp_path, capsys,
                                                                                  monkeypatch, flags, message):
    from edit_jax.pipelines import text_encoders

    monkeypatch.setattr(text_encoders.FluxTextEncoder, "encode", lambda *a: pytest.fail("a prompt was encoded"))
    _, folder = tiny_pipeline
    assert main(["generate", "--model", str(folder), "--prompt", "a cat", "--embeddings-cache", "none",
                 "--out", str(tmp_path / "o"), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe a cat", "is not UTF-8 text"),
    (b'{"prompt": 5}', '"prompt" that is not text'),
    (b'{"text": "a cat"}', 'without a "prompt" field'),
], ids=["not-utf8", "not-text", "no-field"])
def test_a_prompts_file_that_cannot_be_read_is_one_error_naming_it(tmp_path, capsys, content, message):
    (tmp_path / "prompts.txt").write_bytes(content)
    assert main(["encode-prompts", "--model", str(tmp_path), "--prompts", str(tmp_path / "prompts.txt"),
                 "--out", str(tmp_path / "emb.npz")]) == 2
    err = capsys.readouterr().err
    assert message in err and "prompts.txt" in err


def test_a_missing_optional_dependency_is_one_error_naming_the_extra(tiny_pipeline, tmp_path, capsys, monkeypatch):
    import sys

    _, folder = tiny_pipeline
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if not installed
    assert main(["encode-prompts", "--model", str(folder), "--prompt", "a cat", "--out", str(tmp_path / "e.npz")]) == 2
    assert "this needs diffusers, an optional dependency: pip install -e '.[torch]'" in capsys.readouterr().err


def test_a_folder_of_another_pipeline_is_one_error_naming_it(tmp_path, capsys):
    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert main(["generate", "--model", str(tmp_path / "sd"), "--prompt", "a cat", "--out", str(tmp_path / "o")]) == 2
    assert "holds a StableDiffusionPipeline; supported: FluxPipeline, QwenImagePipeline" in capsys.readouterr().err


def test_commands_that_run_torch_encoders_leave_it_gpu_memory(tmp_path, monkeypatch):
    import os

    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "true")
    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE")
    main(["encode-prompts", "--model", str(tmp_path), "--prompt", "a cat", "--out", str(tmp_path / "e.npz")])
    assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"  # read by JAX when it first touches the GPU


def test_generate_with_the_first_block_cache_keeps_each_images_decisions_whatever_the_batch(tiny_pipeline, tmp_path):
    _, folder = tiny_pipeline
    args = ["generate", "--model", str(folder), "--prompt", "a cat", "--prompt", "a dog on a skateboard", "--height", "32",
            "--width", "32", "--steps", "4", "--step-cache", "first-block", "--step-cache-threshold", "1.0", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "one"), "--batch-size", "1"]) == 0
    assert main([*args, "--out", str(tmp_path / "two"), "--batch-size", "2"]) == 0
    one, two = (json.loads((tmp_path / d / "generate.json").read_text()) for d in ("one", "two"))

    for i in range(2):
        np.testing.assert_allclose(np.asarray(Image.open(tmp_path / "two" / f"image-{i}.png"), float),
                                   np.asarray(Image.open(tmp_path / "one" / f"image-{i}.png"), float), atol=1)
    assert one["step_cache"]["per_sample"] and one["elastic"] == "dense" and one["e_dit"] is None
    assert 0 < one["routing"]["step_reuse_rate"] == pytest.approx(two["routing"]["step_reuse_rate"])
    assert (tmp_path / "one" / "router_map.png").is_file()


def test_generate_runs_routers_trained_to_reuse_with_their_reuse(tiny_pipeline, tmp_path, capsys):
    import edit_jax
    from edit_jax.checkpoint import save

    _, folder = tiny_pipeline
    config = edit_jax.from_diffusers_config(folder / "transformer")
    variables = edit_jax.models.init_variables(config)  # fresh routers: p = 0.7, closed at tau 0.75
    save(tmp_path / "reuse", config, variables["params"], variables["routers"],
         router_mode={"closed": "reuse", "max_reuse": 2, "order": 0})
    args = ["generate", "--model", str(folder), "--transformer", str(tmp_path / "reuse"), "--prompt", "a cat",
            "--height", "32", "--width", "32", "--steps", "3", "--elastic", "infer", "--tau", "0.75", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "generate.json").read_text())
    assert summary["block_cache"] == "learned_reuse" and summary["routing"]["cache_hit_rate"] > 0
    assert main([*args, "--out", str(tmp_path / "cached"), "--cache"]) == 2
    assert "trained to reuse" in capsys.readouterr().err
