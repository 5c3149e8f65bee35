"""`edit-jax prepare-data`: captioned images -> a training dataset the trainer reads."""

import json

import numpy as np
import pytest

from edit_jax.cli import main
from tiny_pipeline import make_tiny_flux_pipeline


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline") / "FLUX.1-tiny"
    make_tiny_flux_pipeline(folder)
    return folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("images") / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, size in (("square", (80, 80)), ("wide", (120, 70)), ("tall", (60, 100)), ("tiny", (20, 20)),
                       ("uncaptioned", (80, 80)), ("latin1", (80, 80))):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), np.uint8)).save(folder / f"{name}.png")
        if name != "uncaptioned":
            (folder / f"{name}.txt").write_bytes(f"a {name} photo, caf\xe9".encode("latin-1" if name == "latin1" else "utf-8"))
    (folder / "broken.png").write_bytes(b"not an image")
    (folder / "broken.txt").write_text("a broken photo")
    return folder


@pytest.fixture(scope="module")
def prepared(tiny_pipeline, photos, tmp_path_factory):
    """The CLI run once for the module: (dataset folder, what it printed on stderr)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("prepared") / "data"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["prepare-data", str(photos), str(out), "--model", str(tiny_pipeline), "--resolution", "64",
                     "--max-sequence-length", "16", "--quiet"]) == 0
    return out, err.getvalue()


def test_prepare_data_writes_bucketed_latents_and_reports_what_it_skipped(prepared):
    from edit_jax.train.dataset import read_manifest

    out, err = prepared
    manifest = read_manifest(out)
    assert manifest["count"] == 3 and manifest["family"] == "flux"
    assert sorted(tuple(b["latent_shape"]) for b in manifest["buckets"]) == [(4, 6, 10), (4, 8, 8), (4, 10, 6)]
    skipped = {r["file"]: r["reason"] for r in json.loads((out / "skipped.json").read_text())}
    assert skipped["uncaptioned.png"] == "no caption" and skipped["broken.png"].startswith("unreadable")
    assert skipped["tiny.png"].startswith("too small")
    assert skipped["latin1.png"] == "its caption latin1.txt is not UTF-8 text"
    assert "skipped tiny.png: too small" in err
    assert not out.with_name("data.partial").exists()


def _write_photo(path, size=(80, 80), seed=0):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), np.uint8)).save(path)


def test_an_imagefolder_metadata_jsonl_captions_images_in_subfolders(tiny_pipeline, tmp_path):
    folder = tmp_path / "photos"
    _write_photo(folder / "top.png")
    _write_photo(folder / "train" / "nested.png", seed=1)
    _write_photo(folder / "unlisted.png", seed=2)
    rows = [{"file_name": "top.png", "text": "a photo"}, {"file_name": "train/nested.png", "text": "a nested photo"},
            {"file_name": "train/gone.png", "text": "a lost photo"}]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "data"
    assert main(["prepare-data", str(folder), str(out), "--model", str(tiny_pipeline), "--resolution", "64",
                 "--max-sequence-length", "16", "--quiet"]) == 0
    skipped = {r["file"]: r["reason"] for r in json.loads((out / "skipped.json").read_text())}
    assert skipped == {"train/gone.png": "listed in metadata.jsonl, no such file", "unlisted.png": "no caption"}
    from edit_jax.train.dataset import read_manifest

    assert read_manifest(out)["count"] == 2


def test_an_imagefolder_metadata_csv_captions_its_images(tiny_pipeline, tmp_path):
    folder = tmp_path / "photos"
    _write_photo(folder / "a.png")
    _write_photo(folder / "b.png", seed=1)
    (folder / "metadata.csv").write_text('file_name,text\na.png,"a photo, with a comma"\nb.png,another photo\n')
    out = tmp_path / "data"
    assert main(["prepare-data", str(folder), str(out), "--model", str(tiny_pipeline), "--resolution", "64",
                 "--max-sequence-length", "16", "--quiet"]) == 0
    assert stored_captions(out) == ["a photo, with a comma", "another photo"]


def stored_captions(dataset) -> list[str]:
    """Every caption a dataset's records hold, sorted."""
    from array_record.python.array_record_module import ArrayRecordReader

    from edit_jax.train.dataset import _deserialize, read_manifest

    captions = []
    for bucket in read_manifest(dataset)["buckets"]:
        for name in bucket["files"]:
            reader = ArrayRecordReader(str(dataset / name))
            captions += [_deserialize(record)["caption"].tobytes().decode() for record in reader.read_all()]
            reader.close()
    return sorted(captions)


def test_a_captions_file_is_read_from_a_relative_path_with_file_and_caption_keys(tiny_pipeline, tmp_path, monkeypatch):
    folder = tmp_path / "photos"
    _write_photo(folder / "a.png")
    (folder / "a.txt").write_text("the sidecar, not read when a captions file is given")
    (tmp_path / "captions.jsonl").write_text(json.dumps({"file": "a.png", "caption": "from the captions file"}) + "\n\n")
    monkeypatch.chdir(tmp_path)
    assert main(["prepare-data", "photos", "data", "--model", str(tiny_pipeline), "--captions", "captions.jsonl",
                 "--resolution", "64", "--max-sequence-length", "16", "--quiet"]) == 0
    assert stored_captions(tmp_path / "data") == ["from the captions file"]


@pytest.mark.parametrize("line", ['{"file": "a.png"}', '{"file_name": "a.png", "text": null}', "not json", "[1, 2]"],
                         ids=["no-caption-key", "caption-not-text", "not-json", "not-an-object"])
def test_a_malformed_captions_line_is_one_clear_error_naming_it(tiny_pipeline, tmp_path, capsys, line):
    folder = tmp_path / "photos"
    _write_photo(folder / "a.png")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "fine"}) + "\n" + line + "\n")
    assert main(["prepare-data", str(folder), str(tmp_path / "data"), "--model", str(tiny_pipeline), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "metadata.jsonl line 2: expected" in err and "Traceback" not in err
    assert not (tmp_path / "data").exists() and not (tmp_path / "data.partial").exists()


def test_the_trainer_reads_a_prepared_dataset(tiny_pipeline, prepared, tmp_path):
    from edit_jax.checkpoints_convert import convert_checkpoint
    from edit_jax.train.config import TrainConfig
    from edit_jax.train.loop import train

    ckpt = convert_checkpoint("flux", tiny_pipeline / "transformer", tmp_path / "ckpt", dtype="float32", progress=False)
    metrics = train(TrainConfig(checkpoint=str(ckpt), data=str(prepared[0]), batch_size=1, steps=2, log_every=1,
                                run_dir=str(tmp_path / "run")), progress=False, describe_setup=False)
    assert np.isfinite(float(metrics["loss"]))


def test_an_interrupted_run_resumes_without_encoding_finished_chunks_again(tiny_pipeline, photos, tmp_path, monkeypatch):
    from edit_jax.pipelines import prepare_data as module
    from edit_jax.pipelines.text_encoders import FluxTextEncoder

    calls = []
    original = FluxTextEncoder.__call__

    def interrupted(self, prompts, cache=None, **kwargs):
        calls.append(list(prompts))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, prompts, cache, **kwargs)

    monkeypatch.setattr(FluxTextEncoder, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        module.prepare_data(photos, tmp_path / "data", tiny_pipeline, resolution=64, max_sequence_length=16, chunk=1,
                            progress=False)
    assert not (tmp_path / "data").exists() and (tmp_path / "data.partial").is_dir()
    monkeypatch.setattr(FluxTextEncoder, "__call__", lambda self, prompts, cache=None, **kwargs:
                        calls.append(list(prompts)) or original(self, prompts, cache, **kwargs))
    report = module.prepare_data(photos, tmp_path / "data", tiny_pipeline, resolution=64, max_sequence_length=16,
                                 chunk=1, progress=False)
    assert report["written"] == 3
    assert sum(len(c) for c in calls) == 4  # one caption encoded before the stop, the interrupted one again, one more


def test_images_without_a_usable_one_is_one_clear_error(tiny_pipeline, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"not an image")
    (folder / "broken.txt").write_text("x")
    assert main(["prepare-data", str(folder), str(tmp_path / "d"), "--model", str(tiny_pipeline), "--quiet"]) == 2
    assert "no usable images" in capsys.readouterr().err
    assert not (tmp_path / "d").exists() and not (tmp_path / "d.partial").exists()


@pytest.mark.parametrize("existing, message", [
    ("d", "is not an edit-jax dataset"),
    ("d.partial", "not an interrupted prepare-data run"),
], ids=["out-not-a-dataset", "staging-not-ours"])
def test_a_folder_prepare_data_did_not_write_is_refused_up_front_and_kept(tiny_pipeline, photos, tmp_path, capsys,
                                                                          existing, message):
    (tmp_path / existing).mkdir()
    (tmp_path / existing / "mine.txt").write_text("mine")
    args = ["prepare-data", str(photos), str(tmp_path / "d"), "--model", str(tiny_pipeline), "--quiet", "--overwrite"]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert (tmp_path / existing / "mine.txt").read_text() == "mine"


def test_a_qwen_image_dataset_holds_padded_embeddings_and_masks_the_trainer_reads(photos, tmp_path):
    from edit_jax.config import from_diffusers_config
    from tiny_pipeline import make_tiny_qwen_pipeline
    from edit_jax.train.dataset import check_fits, make_pipeline, read_manifest

    folder = tmp_path / "Qwen-Image-tiny"
    make_tiny_qwen_pipeline(folder)
    out = tmp_path / "data"
    assert main(["prepare-data", str(photos), str(out), "--model", str(folder), "--resolution", "64",
                 "--max-sequence-length", "256", "--quiet"]) == 0
    manifest = read_manifest(out)
    assert manifest["family"] == "qwen-image" and manifest["count"] == 3
    assert manifest["fields"]["prompt_embeds"]["shape"] == [256, 16]
    assert manifest["fields"]["prompt_embeds_mask"]["shape"] == [256]
    check_fits(manifest, from_diffusers_config(folder / "transformer" / "config.json", "qwen-image"), out)
    batch = next(iter(make_pipeline(out, batch_size=1, seed=0).to_iter_dataset()))
    mask = batch["encoder_hidden_states_mask"][0]
    assert 0 < mask.sum() < 256 and not batch["encoder_hidden_states"][0][mask == 0].any()  # zero padding, masked


def _photo_pixels(seed=0, size=(24, 16)):
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)


def _saved(image, path, **kwargs):
    image.save(path, **kwargs)
    from PIL import Image

    return Image.open(path)


def test_a_16_bit_grayscale_png_reads_as_its_8_bit_copy_not_saturated(tmp_path):
    from PIL import Image

    from edit_jax.pipelines.prepare_data import to_rgb

    gray8 = _photo_pixels()[..., 0]
    with _saved(Image.fromarray(gray8.astype(np.uint16) * 257), tmp_path / "g16.png") as opened:
        assert opened.mode.startswith("I")
        rgb = np.asarray(to_rgb(opened))
    assert rgb.shape == (*gray8.shape, 3) and (rgb == gray8[..., None]).all()


def test_a_palette_png_reads_as_its_colours(tmp_path):
    from PIL import Image

    from edit_jax.pipelines.prepare_data import to_rgb

    rgb = Image.fromarray(_photo_pixels()).quantize(16)
    with _saved(rgb, tmp_path / "p.png") as opened:
        assert opened.mode == "P"
        assert (np.asarray(to_rgb(opened)) == np.asarray(rgb.convert("RGB"))).all()


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparent_pixels_read_as_white_and_opaque_ones_as_they_are(tmp_path, mode):
    from PIL import Image

    from edit_jax.pipelines.prepare_data import to_rgb

    pixels = _photo_pixels()
    alpha = np.zeros(pixels.shape[:2], np.uint8)
    alpha[:, :8] = 255
    color = pixels if mode == "RGBA" else pixels[..., :1]
    with _saved(Image.fromarray(np.concatenate([color, alpha[..., None]], -1), mode), tmp_path / "a.png") as opened:
        rgb = np.asarray(to_rgb(opened))
    assert (rgb[:, 8:] == 255).all()
    assert (rgb[:, :8] == np.broadcast_to(color, pixels.shape)[:, :8]).all()


def test_a_cmyk_jpeg_reads_as_rgb(tmp_path):
    from PIL import Image

    from edit_jax.pipelines.prepare_data import to_rgb

    with _saved(Image.new("CMYK", (16, 8), (0, 255, 255, 0)), tmp_path / "c.jpg", quality=100) as opened:
        assert opened.mode == "CMYK"
        rgb = np.asarray(to_rgb(opened)).astype(int)
    assert (abs(rgb - [255, 0, 0]) <= 2).all()


def test_an_exif_rotated_jpeg_reads_upright(tmp_path):
    from PIL import Image

    from edit_jax.pipelines.prepare_data import to_rgb

    exif = Image.Exif()
    exif[0x0112] = 6  # the camera held upright: shown rotated 90 degrees clockwise
    with _saved(Image.fromarray(_photo_pixels(size=(24, 16))), tmp_path / "r.jpg", exif=exif) as opened:
        assert to_rgb(opened).size == (16, 24)


@pytest.mark.parametrize("image", ["F", "I"], ids=["float", "32-bit"])
def test_pixels_that_are_not_colours_are_unusable_naming_why(image):
    from PIL import Image

    from edit_jax.pipelines.prepare_data import UnusableImage, to_rgb

    pixels = np.full((8, 8), 0.5, np.float32) if image == "F" else np.full((8, 8), 1 << 20, np.int32)
    with pytest.raises(UnusableImage, match="mode F" if image == "F" else "outside the 16-bit range"):
        to_rgb(Image.fromarray(pixels, image))


def test_a_16_bit_png_gives_the_latents_of_its_8_bit_copy(tiny_pipeline, tmp_path):
    from PIL import Image

    from edit_jax.train.dataset import _deserialize, read_manifest

    folder = tmp_path / "photos"
    folder.mkdir()
    gray8 = np.random.default_rng(0).integers(0, 256, (64, 64), np.uint8)
    Image.fromarray(gray8).save(folder / "a8.png")
    Image.fromarray(gray8.astype(np.uint16) * 257).save(folder / "b16.png")
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": "the same photo"}) + "\n"
                                                   for n in ("a8.png", "b16.png")))
    out = tmp_path / "data"
    assert main(["prepare-data", str(folder), str(out), "--model", str(tiny_pipeline), "--resolution", "64",
                 "--max-sequence-length", "16", "--quiet"]) == 0
    from array_record.python.array_record_module import ArrayRecordReader

    (bucket,) = read_manifest(out)["buckets"]
    reader = ArrayRecordReader(str(out / bucket["files"][0]))
    first, second = (_deserialize(r)["latents"] for r in reader.read_all())
    reader.close()
    np.testing.assert_array_equal(first, second)


def test_a_refusal_before_any_image_is_encoded_leaves_no_staging_folder(tiny_pipeline, photos, tmp_path, monkeypatch,
                                                                       capsys):
    import sys

    monkeypatch.setitem(sys.modules, "torch", None)  # torch not installed
    assert main(["prepare-data", str(photos), str(tmp_path / "d"), "--model", str(tiny_pipeline), "--quiet"]) == 2
    assert "pip install" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_the_manifest_names_the_source_images_of_each_bucket(prepared):
    from edit_jax.train.dataset import read_manifest

    sources = {tuple(b["latent_shape"]): b["sources"] for b in read_manifest(prepared[0])["buckets"]}
    assert sources == {(4, 8, 8): ["square.png"], (4, 6, 10): ["wide.png"], (4, 10, 6): ["tall.png"]}


def test_order_channels_ranks_on_a_prepared_dataset(tiny_pipeline, prepared, tmp_path, capsys):
    from edit_jax.checkpoints_convert import convert_checkpoint
    from edit_jax.elastic.channel_order import order_mlp_channels
    from edit_jax.train.calibration import dataset_calibration

    ckpt = convert_checkpoint("flux", tiny_pipeline / "transformer", tmp_path / "ckpt", dtype="float32", progress=False)
    assert main(["order-channels", str(ckpt), str(tmp_path / "ordered"), "--calibration", str(prepared[0]),
                 "--batches", "2"]) == 0
    assert "random inputs" not in capsys.readouterr().err
    import edit_jax

    model, params = edit_jax.load(ckpt)
    calibration = dataset_calibration(prepared[0], model.config, batches=2)
    assert {tuple(c["hidden_states"].shape[1:]) for c in calibration} <= {(16, 16), (15, 16)}  # the buckets' grids
    random_order = order_mlp_channels(model.config, params, [dict(c, hidden_states=c["hidden_states"] * 0 + 1)
                                                            for c in calibration])[1]
    data_order = order_mlp_channels(model.config, params, calibration)[1]
    assert any((a != b).any() for a, b in zip(random_order, data_order))  # the data, not only its shapes, ranks
