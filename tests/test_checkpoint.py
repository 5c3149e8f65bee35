"""Checkpoints: relative paths, overwriting only what the tool wrote, leftovers of killed writes,
and damage found before it becomes a traceback."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import edit_jax
from edit_jax.checkpoint import CheckpointError, load_routers, missing_array_files, save, verify_arrays
from edit_jax.models.registry import init_variables


@pytest.fixture(scope="module")
def tiny():
    config = edit_jax.preset("flux-tiny")
    return config, init_variables(config)


def test_every_read_accepts_a_relative_path(tiny, tmp_path, monkeypatch):
    config, variables = tiny
    monkeypatch.chdir(tmp_path)
    save("ckpt/flux", config, variables["params"], variables["routers"])

    model, params = edit_jax.load("ckpt/flux")
    routers = load_routers("ckpt/flux")

    np.testing.assert_array_equal(params["proj_out"]["kernel"], variables["params"]["proj_out"]["kernel"])
    assert routers is not None and missing_array_files("ckpt/flux") == [] and verify_arrays("ckpt/flux") == []


def test_overwrite_refuses_a_folder_that_is_not_a_checkpoint(tiny, tmp_path):
    config, variables = tiny
    precious = tmp_path / "photos"
    precious.mkdir()
    (precious / "holiday.jpg").write_bytes(b"\xff\xd8")

    with pytest.raises(CheckpointError, match="not an edit-jax checkpoint"):
        save(precious, config, variables["params"], overwrite=True)
    assert (precious / "holiday.jpg").read_bytes() == b"\xff\xd8"


@pytest.mark.parametrize("dst, protected", [("models/flux", "models/flux"), ("models/flux/out", "models/flux"),
                                            ("models", "models/flux"), ("models", "models/flux/w.safetensors")],
                         ids=["is-the-source", "inside-the-source", "holds-the-source", "holds-the-source-file"])
def test_a_checkpoint_never_overlaps_a_protected_source(tiny, tmp_path, dst, protected):
    config, variables = tiny
    (tmp_path / "models" / "flux").mkdir(parents=True)
    (tmp_path / "models" / "flux" / "w.safetensors").write_bytes(b"x")

    with pytest.raises(CheckpointError, match="the source"):
        save(tmp_path / dst, config, variables["params"], overwrite=True, protect=[tmp_path / protected])
    assert (tmp_path / "models" / "flux" / "w.safetensors").exists()


def test_overwrite_replaces_an_existing_checkpoint(tiny, tmp_path):
    config, variables = tiny
    save(tmp_path / "ckpt", config, variables["params"])
    doubled = {**variables["params"], "proj_out": {k: 2 * v for k, v in variables["params"]["proj_out"].items()}}

    save(tmp_path / "ckpt", config, doubled, overwrite=True)

    _, params = edit_jax.load(tmp_path / "ckpt")
    np.testing.assert_array_equal(params["proj_out"]["bias"], doubled["proj_out"]["bias"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_the_next_write_removes_folders_left_by_killed_writes(tiny, tmp_path, capsys):
    config, variables = tiny
    dead = [tmp_path / ".ckpt.incomplete-999999999-0badc0de", tmp_path / ".ckpt.incomplete-1234abcd",
            tmp_path / ".ckpt.old-999999999-0badc0de"]
    live = tmp_path / f".ckpt.incomplete-{os.getpid()}-0badc0de"  # a write still running
    other = tmp_path / ".other.incomplete-999999999-0badc0de"  # another destination's
    for folder in dead + [live, other]:
        (folder / "params").mkdir(parents=True)

    save(tmp_path / "ckpt", config, variables["params"])

    assert not any(f.exists() for f in dead)
    assert live.exists() and other.exists()
    assert "did not finish" in capsys.readouterr().err


SLOW_WRITE = """
import sys, time
import numpy as np
import edit_jax
from edit_jax.checkpoint import write_checkpoint

def groups():
    yield {"a": np.zeros((4, 4), np.float32)}
    print("first group written", flush=True)
    time.sleep(60)
    yield {"b": np.zeros((4,), np.float32)}

write_checkpoint(sys.argv[1], edit_jax.preset("flux-tiny"), {"params": groups()})
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_write_stopped_by_a_signal_leaves_nothing_behind(tmp_path, sig):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    # a shell's background job inherits SIGINT ignored, and Python then never raises KeyboardInterrupt
    default_signals = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITE, str(tmp_path / "ckpt")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, preexec_fn=default_signals)
    deadline = time.time() + 120
    while proc.stdout.readline().strip() != "first group written":
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
    assert any(p.name.startswith(".ckpt.incomplete-") for p in tmp_path.iterdir())

    proc.send_signal(sig)
    proc.wait(timeout=60)

    assert proc.returncode != 0
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def damaged(tiny, tmp_path):
    """A checkpoint whose array data files were deleted after it was written."""
    config, variables = tiny
    path = save(tmp_path / "ckpt", config, variables["params"])
    for data in path.glob("params/**/d/*"):
        data.unlink()
    return path


def test_missing_array_data_is_found_without_reading_arrays(damaged):
    assert any("missing data file" in p for p in missing_array_files(damaged))


def test_loading_a_checkpoint_with_missing_array_data_is_one_clear_error(damaged):
    with pytest.raises(CheckpointError, match="incomplete"):
        edit_jax.load(damaged)


def test_verify_names_arrays_with_non_finite_values(tiny, tmp_path):
    config, variables = tiny
    params = {**variables["params"], "proj_out": {**variables["params"]["proj_out"],
                                                  "bias": np.full_like(variables["params"]["proj_out"]["bias"], np.nan)}}
    save(tmp_path / "ckpt", config, params)

    assert verify_arrays(tmp_path / "ckpt") == ["params/proj_out/bias: 4 non-finite values"]


def test_a_checkpoint_for_another_config_lists_what_does_not_fit(tiny, tmp_path):
    config, variables = tiny
    save(tmp_path / "ckpt", config, variables["params"])
    from edit_jax.checkpoint import load_params
    from edit_jax.models.registry import abstract_params

    with pytest.raises(CheckpointError, match="does not fit the model config"):
        load_params(tmp_path / "ckpt", abstract_params(edit_jax.preset("flux-small")))


def test_an_unknown_runtime_option_to_load_is_one_error_listing_the_known_ones(tiny, tmp_path):
    from edit_jax.config import ConfigError

    config, variables = tiny
    save(tmp_path / "ckpt", config, variables["params"])
    with pytest.raises(ConfigError, match=r"unknown runtime option\(s\) \['attn'\]; known: param_dtype, dtype, "):
        edit_jax.load(tmp_path / "ckpt", attn="xla")


@pytest.fixture
def format_1(tiny, tmp_path):
    """The tiny FLUX params saved as format 1 wrote them: each single block's proj_out one kernel."""
    import json

    from edit_jax.checkpoint import write_checkpoint

    config, variables = tiny
    blocks = variables["params"]["single_transformer_blocks"]
    proj_out = blocks["proj_out"]
    joined = {"kernel": np.concatenate([proj_out["kernel_attn"], proj_out["kernel_mlp"]], axis=1), "bias": proj_out["bias"]}
    params = {**variables["params"], "single_transformer_blocks": {**blocks, "proj_out": joined}}
    path = write_checkpoint(tmp_path / "v1", config, {"params": [params]})
    meta = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**meta, "version": 1}))
    return path


def test_a_format_1_checkpoint_loads_with_its_proj_out_kernel_split(tiny, format_1):
    from jax.sharding import NamedSharding, PartitionSpec

    from edit_jax.checkpoint import load_params
    from edit_jax.models.registry import abstract_params
    from edit_jax.sharding import make_mesh

    config, variables = tiny
    on_mesh = NamedSharding(make_mesh({"data": 1}), PartitionSpec())
    for shardings in (None, on_mesh):
        params = load_params(format_1, abstract_params(config), shardings)
        for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(variables["params"])):
            np.testing.assert_array_equal(got, want)


def test_a_format_1_checkpoint_lists_and_reads_the_split_kernels(tiny, format_1):
    from edit_jax.checkpoint import flatten, params_metadata, read_array

    config, variables = tiny
    listed = flatten(params_metadata(format_1))
    want = {k: v.shape for k, v in flatten(variables["params"]).items()}

    assert {k: shape for k, (shape, _) in listed.items()} == want
    np.testing.assert_array_equal(read_array(format_1, "params", "single_transformer_blocks/proj_out/kernel_mlp"),
                                  variables["params"]["single_transformer_blocks"]["proj_out"]["kernel_mlp"])
    assert verify_arrays(format_1) == []


def test_a_format_1_checkpoint_exports_the_same_tensors_as_format_2(tiny, format_1, tmp_path):
    from safetensors.numpy import load_file

    from edit_jax.checkpoints_convert.export import export_checkpoint

    config, variables = tiny
    current = save(tmp_path / "v2", config, variables["params"])
    a = load_file(export_checkpoint(format_1, tmp_path / "a", progress=False) / "diffusion_pytorch_model.safetensors")
    b = load_file(export_checkpoint(current, tmp_path / "b", progress=False) / "diffusion_pytorch_model.safetensors")

    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_a_checkpoint_of_an_unknown_format_version_is_one_clear_error(tiny, format_1):
    import json

    meta = json.loads((format_1 / "config.json").read_text())
    (format_1 / "config.json").write_text(json.dumps({**meta, "version": 4}))
    with pytest.raises(CheckpointError, match=r"format version 4 is not one this edit-jax reads \(1, 2, 3\)"):
        edit_jax.load(format_1)


def test_a_checkpoint_from_before_width_groups_reads_its_channels_in_order(tiny, tmp_path):
    import json

    from edit_jax.checkpoint import load_config

    config, variables = tiny
    path = save(tmp_path / "v2", config, variables["params"])
    meta = json.loads((path / "config.json").read_text())
    del meta["config"]["width_groups"]
    (path / "config.json").write_text(json.dumps({**meta, "version": 2}))

    assert config.width_groups > 1 and load_config(path).width_groups == 1


def files_of(path: Path) -> dict[Path, os.stat_result]:
    return {f.relative_to(path): f.stat() for f in path.rglob("*") if f.is_file()}


def test_params_saved_from_a_checkpoint_that_stores_them_so_are_hard_links_to_its_files(tiny, tmp_path, capsys):
    config, variables = tiny
    base = save(tmp_path / "base", config, variables["params"])
    trained = save(tmp_path / "trained", config, variables["params"], variables["routers"], params_from=base)
    assert "trained/params: hard links to the files of" in capsys.readouterr().err

    ours, theirs = files_of(trained / "params"), files_of(base / "params")
    assert ours.keys() == theirs.keys() and all(ours[f].st_ino == theirs[f].st_ino for f in ours)
    model, params = edit_jax.load(trained)
    jax.tree.map(np.testing.assert_array_equal, params, variables["params"])
    assert load_routers(trained) is not None and verify_arrays(trained) == []


def test_a_base_linked_into_a_checkpoint_outlives_the_base(tiny, tmp_path):
    import shutil

    config, variables = tiny
    base = save(tmp_path / "base", config, variables["params"])
    trained = save(tmp_path / "trained", config, variables["params"], params_from=base)
    shutil.rmtree(base)

    jax.tree.map(np.testing.assert_array_equal, edit_jax.load(trained)[1], variables["params"])


def test_params_a_checkpoint_stores_in_another_dtype_are_written_not_linked(tiny, tmp_path, capsys):
    config, variables = tiny
    half = jax.tree.map(lambda x: x.astype("bfloat16"), variables["params"])
    base = save(tmp_path / "base", config.with_runtime(param_dtype="bfloat16"), half)
    trained = save(tmp_path / "trained", config, variables["params"], params_from=base)

    assert "it stores them in bfloat16, and these are float32" in capsys.readouterr().err

    assert not {s.st_ino for s in files_of(trained).values()} & {s.st_ino for s in files_of(base).values()}
    jax.tree.map(np.testing.assert_array_equal, edit_jax.load(trained)[1], variables["params"])


def test_params_from_a_checkpoint_on_a_filesystem_that_cannot_link_are_written(tiny, tmp_path, monkeypatch, capsys):
    import errno

    config, variables = tiny
    base = save(tmp_path / "base", config, variables["params"])

    def cross_device(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link", str(src))

    monkeypatch.setattr(os, "link", cross_device)
    trained = save(tmp_path / "trained", config, variables["params"], params_from=base)

    err = capsys.readouterr().err
    assert "trained/params: cannot hard-link the files of" in err and "Invalid cross-device link" in err

    jax.tree.map(np.testing.assert_array_equal, edit_jax.load(trained)[1], variables["params"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "trained"]


def test_a_checkpoint_written_over_has_another_stored_identity(tiny, tmp_path):
    from edit_jax.checkpoint import stored_identity

    config, variables = tiny
    base = save(tmp_path / "base", config, variables["params"])
    before = stored_identity(base)
    save(base, config, variables["params"], overwrite=True)

    assert stored_identity(base) != before and stored_identity(tmp_path / "gone") is None


class NotOnHost:
    """An array's shape and dtype, which cannot be read to the host."""

    def __init__(self, array):
        self.shape, self.dtype = array.shape, array.dtype

    def __array__(self, *args, **kwargs):
        raise AssertionError("read to the host")


def test_params_that_are_hard_linked_are_never_read_to_the_host(tiny, tmp_path):
    config, variables = tiny
    base = save(tmp_path / "base", config, variables["params"])
    trained = save(tmp_path / "trained", config, jax.tree.map(NotOnHost, variables["params"]), params_from=base)

    jax.tree.map(np.testing.assert_array_equal, edit_jax.load(trained)[1], variables["params"])
