"""`edit-jax generate-3d`: images of a Hunyuan3D-2 release folder's tiny model to meshes a person
can look at, with the JSON record of FLOPs and timings by stage; bad inputs are one clear error."""

import json

import numpy as np
import pytest
import torch
from test_hunyuan3d import release_folder

from edit_jax.cli import main
from edit_jax.train.dataset import write_dataset


def make_release(release):
    """A tiny release folder whose conditioner is a 2-layer DINOv2 on 28-pixel images."""
    import yaml
    from safetensors.torch import load_file, save_file
    from transformers import Dinov2Config, Dinov2Model

    release_folder(release)
    dino = dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, image_size=28,
                patch_size=14)
    torch.manual_seed(2)
    encoder = Dinov2Model(Dinov2Config(**dino)).eval()
    config = yaml.safe_load((release / "config.yaml").read_text())
    config["conditioner"]["params"] = {"main_image_encoder": {"type": "DinoImageEncoder", "kwargs": {
        "config": dino, "image_size": 28, "use_cls_token": True}}}
    (release / "config.yaml").write_text(yaml.safe_dump(config))
    weights = load_file(release / "model.fp16.safetensors")
    weights = {k: v for k, v in weights.items() if not k.startswith("conditioner.")}
    weights.update({f"conditioner.main_image_encoder.model.{k}": v.contiguous() for k, v in encoder.state_dict().items()})
    for key in ("vae.geo_decoder.output_proj.bias", "vae.geo_decoder.ln_post.bias"):  # a field that crosses 0
        weights[key] = torch.zeros_like(weights[key])
    save_file(weights, release / "model.fp16.safetensors")
    return release


@pytest.fixture(scope="module")
def release_ckpt(tmp_path_factory):
    """A tiny release folder (`make_release`) and its conversion."""
    tmp = tmp_path_factory.mktemp("hy3d")
    release = make_release(tmp / "release")
    assert main(["convert", "hunyuan3d", str(release), str(tmp / "ckpt"), "--dtype", "float32"]) == 0
    return release, tmp / "ckpt"


def object_image(path, size=(40, 30)):
    """An RGBA picture: an opaque disc on a transparent ground."""
    from PIL import Image

    rows, cols = np.mgrid[: size[0], : size[1]]
    rgba = np.zeros((*size, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255 * ((rows - 20) ** 2 + (cols - 15) ** 2 < 100)
    Image.fromarray(rgba).save(path)
    return path


def args(release, ckpt, out, *images, extra=()):
    return ["generate-3d", *map(str, images), "--model", str(ckpt), "--image-encoder", str(release), "--out", str(out),
            "--steps", "3", "--octree-resolution", "10", "--num-chunks", "300", "--quiet", *extra]


def test_images_become_meshes_previews_and_a_record_of_flops_and_stage_timings(release_ckpt, tmp_path):
    import trimesh

    release, ckpt = release_ckpt
    images = [object_image(tmp_path / "a.png"), object_image(tmp_path / "b.png", (30, 50))]
    assert main(args(release, ckpt, tmp_path / "out", *images)) == 0

    record = json.loads((tmp_path / "out" / "generate_3d.json").read_text())
    assert [m["mesh"] for m in record["meshes"]] == ["mesh-0.glb", "mesh-1.glb"]
    mesh = trimesh.load(tmp_path / "out" / "mesh-0.glb", force="mesh")
    assert len(mesh.faces) == record["meshes"][0]["faces"] > 0
    assert (tmp_path / "out" / "mesh-0.png").stat().st_size > 10_000
    assert set(record["timings_s"]) == {"prepare_s", "encode_s", "denoise_s", "decode_s", "volume_s", "surface_s", "export_s"}
    assert record["flops_total"] > 0 and record["flops_vs_dense"] == pytest.approx(1.0)


def test_a_step_cache_cuts_the_denoising_flops_and_obj_meshes_are_written(release_ckpt, tmp_path):
    release, ckpt = release_ckpt
    image = object_image(tmp_path / "a.png")
    assert main(args(release, ckpt, tmp_path / "taylor", image, extra=["--step-cache", "taylor-seer",
                                                                       "--cache-interval", "2",
                                                                       "--disable-cache-before-step", "1",
                                                                       "--format", "obj"])) == 0
    record = json.loads((tmp_path / "taylor" / "generate_3d.json").read_text())
    assert record["step_reuse_rate"] == pytest.approx(1 / 3) and record["flops_vs_dense"] < 1
    assert (tmp_path / "taylor" / "mesh-0.obj").is_file()


def test_bad_requests_are_one_clear_error(release_ckpt, tmp_path, capsys):
    release, ckpt = release_ckpt
    (tmp_path / "not-an-image.png").write_text("hello")
    assert main(args(release, ckpt, tmp_path / "out", tmp_path / "not-an-image.png")) == 2
    assert "is not an image PIL can read" in capsys.readouterr().err
    assert main(args(release, release, tmp_path / "out", object_image(tmp_path / "a.png"))) == 2
    assert "holds no ShapeVAE: convert a Hunyuan3D-2 release folder" in capsys.readouterr().err
    assert main(args(release, ckpt, tmp_path / "out", object_image(tmp_path / "a.png"), extra=["--mc-level", "99"])) == 2
    assert "no surface" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_routers_trained_on_a_shape_dataset_run_in_generate_3d(release_ckpt, tmp_path):
    release, ckpt = release_ckpt
    rng = np.random.default_rng(0)
    examples = [{"latents": rng.standard_normal((12, 8)).astype(np.float32),
                 "image_features": rng.standard_normal((5, 24)).astype(np.float32)} for _ in range(4)]
    write_dataset(tmp_path / "shapes", "hunyuan3d", examples)
    assert main(["train", f"checkpoint={ckpt}", f"data={tmp_path / 'shapes'}", "steps=2", "batch_size=2",
                 f"run_dir={tmp_path / 'run'}", "--quiet"]) == 0
    image = object_image(tmp_path / "a.png")

    assert main(args(release, tmp_path / "run" / "edit-jax", tmp_path / "out", image,
                     extra=["--shape-vae", str(ckpt), "--elastic", "infer", "--tau", "0.0"])) == 0
    record = json.loads((tmp_path / "out" / "generate_3d.json").read_text())
    assert record["elastic"] == "infer" and record["blocks_executed"] == 1.0
    assert (tmp_path / "out" / "router_map.png").is_file() and (tmp_path / "out" / "mesh-0.glb").is_file()


def test_a_shape_dataset_of_another_width_is_refused_before_training(release_ckpt, tmp_path, capsys):
    _, ckpt = release_ckpt
    write_dataset(tmp_path / "shapes", "hunyuan3d", [{"latents": np.zeros((12, 8), np.float32),
                                                      "image_features": np.zeros((5, 7), np.float32)}] * 2)
    assert main(["train", f"checkpoint={ckpt}", f"data={tmp_path / 'shapes'}", "steps=1", "batch_size=2",
                 f"run_dir={tmp_path / 'run'}", "--quiet"]) == 2
    assert "has image_features 7 wide; the model expects 24" in capsys.readouterr().err
