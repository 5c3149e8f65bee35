"""The training dataset: ArrayRecord files with a manifest, and its grain pipeline."""

import numpy as np
import pytest

import edit_jax
from edit_jax.config import ConfigError
from edit_jax.train.dataset import batch_iterator, check_fits, make_pipeline, read_manifest, write_dataset


def flux_examples(count, height=4, width=4, seed=0, txt=4, width_txt=32):
    rng = np.random.default_rng(seed)
    return [dict(latents=rng.standard_normal((1, height, width)).astype(np.float32),
                 prompt_embeds=rng.standard_normal((txt, width_txt)).astype(np.float32),
                 pooled_prompt_embeds=rng.standard_normal(32).astype(np.float32), caption=f"example {i}")
            for i in range(count)]


@pytest.fixture
def two_buckets(tmp_path):
    return write_dataset(tmp_path / "ds", "flux", flux_examples(12) + flux_examples(8, height=2, seed=1))


def batches(path, count, **kwargs):
    it = iter(make_pipeline(path, **kwargs).to_iter_dataset())
    return it, [next(it) for _ in range(count)]


def test_the_manifest_records_family_count_fields_and_one_bucket_per_latent_shape(two_buckets):
    manifest = read_manifest(two_buckets)
    assert (manifest["family"], manifest["count"]) == ("flux", 20)
    assert [(b["latent_shape"], b["count"]) for b in manifest["buckets"]] == [([1, 2, 4], 8), ([1, 4, 4], 12)]
    assert manifest["fields"]["prompt_embeds"]["shape"] == [4, 32]


def test_a_batch_never_mixes_latent_shapes(two_buckets):
    _, got = batches(two_buckets, 10, batch_size=4, seed=0)
    assert {b["latents"].shape for b in got} == {(4, 2, 4), (4, 4, 4)}  # packed: [B, N, 4C]
    assert all(tuple(b["grid"]) in ((1, 2), (2, 2)) for b in got)


def test_the_pipeline_is_deterministic_for_a_seed(two_buckets):
    a, b, c = (batches(two_buckets, 5, batch_size=4, seed=s)[1] for s in (0, 0, 1))
    assert all(np.array_equal(x["latents"], y["latents"]) for x, y in zip(a, b))
    assert any(not np.array_equal(x["latents"], y["latents"]) for x, y in zip(a, c))


def test_process_slices_are_disjoint_and_cover_the_data(tmp_path):
    path = write_dataset(tmp_path / "ds", "flux", flux_examples(12))
    seen = []
    for process in range(3):  # one epoch: 12 examples over 3 processes, batches of 2
        _, got = batches(path, 2, batch_size=2, seed=0, process_index=process, process_count=3)
        seen.append({tuple(row.ravel()[:3]) for b in got for row in b["latents"]})
    assert all(len(s) == 4 for s in seen)
    assert len(set.union(*seen)) == 12


def test_the_iterator_reads_only_prefetch_batches_ahead(tmp_path, monkeypatch):
    import time

    import edit_jax.train.dataset

    path = write_dataset(tmp_path / "ds", "flux", flux_examples(12))
    read = []
    fields = edit_jax.train.dataset._training_fields
    monkeypatch.setattr(edit_jax.train.dataset, "_training_fields", lambda record: read.append(1) or fields(record))
    it = batch_iterator(make_pipeline(path, batch_size=2, seed=0), prefetch=3)
    next(it)
    time.sleep(0.5)  # time for the threads to fill what they may
    assert 2 <= len(read) <= (1 + 3) * 2  # the batch taken and 3 ahead (grain's default: hundreds)


def test_the_iterator_state_round_trips(two_buckets):
    it, _ = batches(two_buckets, 3, batch_size=4, seed=0)
    state = it.get_state()
    expected = next(it)
    again = iter(make_pipeline(two_buckets, batch_size=4, seed=0).to_iter_dataset())
    again.set_state(state)
    np.testing.assert_array_equal(next(again)["latents"], expected["latents"])


@pytest.mark.parametrize("preset, message", [("qwen-image-tiny", "is for flux"), ("flux-small", "latent channels")])
def test_a_dataset_that_does_not_fit_the_model_is_a_clear_error(two_buckets, preset, message):
    with pytest.raises(ConfigError, match=message):
        check_fits(read_manifest(two_buckets), edit_jax.preset(preset), two_buckets)


def test_examples_missing_a_field_are_refused_and_nothing_is_left(tmp_path):
    bad = flux_examples(2)
    del bad[1]["pooled_prompt_embeds"]
    with pytest.raises(ConfigError, match="needs"):
        write_dataset(tmp_path / "ds", "flux", bad)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage, message", [("truncate", "cannot read the ArrayRecord files"),
                                             ("delete-records", "should hold 12 examples")])
def test_a_damaged_dataset_is_one_error_naming_it(two_buckets, damage, message):
    import json

    manifest = read_manifest(two_buckets)
    big = next(b for b in manifest["buckets"] if b["count"] == 12)
    if damage == "truncate":
        file = two_buckets / big["files"][0]
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    else:  # a manifest from a larger copy than the files beside it
        small = next(b for b in manifest["buckets"] if b["count"] == 8)
        big["files"] = small["files"]
        (two_buckets / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=message):
        make_pipeline(two_buckets, batch_size=4, seed=0)


def _with_sources(examples, prefix):
    return [{**e, "source": f"{prefix}-{i}.png"} for i, e in enumerate(examples)]


def test_buckets_smaller_than_a_global_batch_are_left_out_with_a_warning_naming_them(tmp_path, capsys):
    path = write_dataset(tmp_path / "ds", "flux", _with_sources(flux_examples(8), "square")
                         + _with_sources(flux_examples(2, height=2, seed=1), "wide"))

    _, got = batches(path, 6, batch_size=4, seed=0)

    assert all(b["latents"].shape[1] == 4 for b in got)  # only the 4x4-latent bucket
    err = capsys.readouterr().err
    assert "training on 8 of 10 examples" in err and "32x16 px: 2 (wide-0.png, wide-1.png)" in err


def test_a_dataset_with_no_bucket_of_one_global_batch_is_one_error_saying_what_to_do(tmp_path):
    path = write_dataset(tmp_path / "ds", "flux", flux_examples(3) + flux_examples(2, height=2, seed=1))
    with pytest.raises(ConfigError, match="no aspect bucket holds one global batch of 4 .* lower batch_size to at most 3"):
        make_pipeline(path, batch_size=2, seed=0, process_count=2)


def test_a_folder_of_images_given_as_the_dataset_says_to_run_prepare_data(tmp_path):
    from edit_jax.train.dataset import read_manifest

    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"is a folder of images \(1, e.g. cat.jpg\), not a dataset: .*"
                                          r"`edit-jax prepare-data .*photos data/photos --model PIPELINE_DIR`"):
        read_manifest(tmp_path / "photos")
