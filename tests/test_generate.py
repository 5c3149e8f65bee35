"""Prompt to image: FLUX text encoding at the edge, the embedding cache, and `edit-jax generate`
against diffusers' FluxPipeline on the same tiny components."""

import json

import numpy as np
import pytest
import torch

from edit_jax.cli import main
from reference import relative_error
from tiny_pipeline import make_tiny_flux_pipeline

PROMPTS = ["a red fox in the snow", "two cats"]


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline") / "FLUX.1-tiny"
    return make_tiny_flux_pipeline(folder), folder


def test_text_embeddings_equal_the_pipelines_encode_prompt(tiny_pipeline):
    from pipelines.text_encoders import FluxTextEncoder

    pipe, folder = tiny_pipeline
    ours = FluxTextEncoder(folder, max_sequence_length=16, device="cpu")(PROMPTS)
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(PROMPTS, prompt_2=None, device="cpu", max_sequence_length=16)
    np.testing.assert_array_equal(ours["prompt_embeds"], embeds.numpy())
    np.testing.assert_array_equal(ours["pooled_prompt_embeds"], pooled.numpy())


def test_the_embedding_cache_encodes_a_prompt_once(tiny_pipeline, tmp_path, monkeypatch):
    from pipelines.text_encoders import EmbeddingCache, FluxTextEncoder

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


def test_generate_equals_the_diffusers_flux_pipeline(tiny_pipeline, tmp_path):
    from pipelines.generate import generate

    pipe, folder = tiny_pipeline
    noise = np.random.default_rng(0).standard_normal((2, 12, 16)).astype(np.float32)  # 64 x 48 px
    with torch.no_grad():
        ref = pipe(PROMPTS, latents=torch.from_numpy(noise), height=64, width=48, num_inference_steps=4,
                   guidance_scale=3.5, max_sequence_length=512, output_type="np").images
    result = generate(folder, PROMPTS, tmp_path / "out", steps=4, guidance=3.5, height=64, width=48, noise=noise,
                      progress=False)
    ours = np.clip(result["images"] / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    assert relative_error(ours, ref) <= 1e-4
    summary = json.loads((tmp_path / "out" / "generate.json").read_text())
    assert set(summary["timings_s"]) == {"encode_s", "denoise_s", "decode_s"}
    assert all((tmp_path / "out" / f"image-{i}.png").is_file() for i in range(2))


def test_the_cli_generates_pngs_and_a_run_json(tiny_pipeline, tmp_path):
    from PIL import Image

    _, folder = tiny_pipeline
    args = ["generate", "--model", str(folder), "--prompt", "a cat", "--height", "64", "--width", "64",
            "--steps", "2", "--out", str(tmp_path / "o"), "--embeddings-cache", str(tmp_path / "c"), "--quiet"]
    assert main(args) == 0
    assert Image.open(tmp_path / "o" / "image-0.png").size == (64, 64)
    assert len(list((tmp_path / "c").glob("*.npz"))) == 1


def test_a_folder_without_a_component_is_one_error_naming_it(tiny_pipeline, tmp_path, capsys):
    import shutil

    _, folder = tiny_pipeline
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "vae")
    assert main(["generate", "--model", str(broken), "--prompt", "a cat", "--out", str(tmp_path / "o")]) == 2
    assert "no vae/" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
