"""Sharded execution on 8 simulated CPU devices (a subprocess: the device count is fixed when JAX
starts)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

PARTS = {"flux-tiny forwards": (6, 1), "qwen-image-tiny forwards": (6, 1), "flux-tiny commands": (4, 0)}


@pytest.fixture
def sharded_runs(once_per_session):
    """sharded_elastic.py's parts, run in one subprocess once for the session: {part: its output}."""
    def run(folder):
        script = Path(__file__).with_name("sharded_elastic.py")
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        done = subprocess.run([sys.executable, str(script), *(p.replace(" ", ":") for p in PARTS)], capture_output=True,
                              text=True, env=env, timeout=900)
        sections = {part.strip(): text for part, text in
                    (chunk.split("\n", 1) for chunk in re.split(r"^== ", done.stdout, flags=re.M)[1:])}
        return {"sections": sections, "stderr": done.stderr[-3000:]}

    return once_per_session("sharded-elastic", run)[1]


@pytest.mark.parametrize("part", PARTS)
def test_elastic_forwards_with_sharded_params_equal_unsharded(sharded_runs, part):
    errors, split = PARTS[part]
    output = sharded_runs["sections"].get(part, "")
    assert output and "Traceback" not in output, output + sharded_runs["stderr"]
    assert output.count("relative error") == errors
    assert output.count("modulation kernels stay split") == split


def test_a_mesh_axis_of_minus_one_takes_the_devices_the_others_leave():
    import pytest

    from edit_jax.sharding import make_mesh

    assert dict(make_mesh({"data": -1, "tensor": 1}).shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    with pytest.raises(ValueError, match="do not divide the 1 devices"):
        make_mesh({"data": -1, "tensor": 2})
    with pytest.raises(ValueError, match="at most one of them -1"):
        make_mesh({"data": -1, "fsdp": -1})
    with pytest.raises(ValueError, match="the axes are"):
        make_mesh({"model": 1})


def test_load_takes_shardings_or_a_mesh_not_both(tmp_path):
    import jax
    import pytest
    from jax.sharding import SingleDeviceSharding

    import edit_jax
    from edit_jax.checkpoint import save
    from edit_jax.sharding import make_mesh

    config = edit_jax.preset("flux-tiny")
    save(tmp_path / "ckpt", config, edit_jax.init_params(config))
    with pytest.raises(ValueError, match="give shardings or mesh, not both"):
        edit_jax.load(tmp_path / "ckpt", shardings=SingleDeviceSharding(jax.devices()[0]), mesh=make_mesh())


def test_a_mesh_with_explicit_axes_is_rejected_with_a_clear_message():
    import jax
    import pytest
    from jax.sharding import AxisType

    import edit_jax
    from edit_jax.placement import param_shardings
    from edit_jax.sharding import MESH_AXES

    mesh = jax.make_mesh((1, 1, 1), MESH_AXES, axis_types=(AxisType.Explicit,) * 3)
    with pytest.raises(ValueError, match="not Auto"):
        param_shardings(edit_jax.preset("flux-tiny"), mesh)


def test_axis_rule_changes_apply_inside_use_rules_only():
    import jax
    from jax.sharding import AxisType, PartitionSpec

    from edit_jax.sharding import MESH_AXES, logical_to_mesh, use_rules

    mesh = jax.sharding.AbstractMesh((2, 4, 2), MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    spec = PartitionSpec("layers", "embed", "mlp")
    assert logical_to_mesh(spec, mesh) == PartitionSpec(None, "fsdp", "tensor")
    with use_rules({"embed": None, "mlp": ["fsdp", "tensor"]}):
        assert logical_to_mesh(spec, mesh) == PartitionSpec(None, None, ("fsdp", "tensor"))
    assert logical_to_mesh(PartitionSpec("activation_batch", "activation_length"), mesh) == PartitionSpec(("data", "fsdp"), None)


def test_a_mesh_over_fewer_devices_than_there_are_says_to_span_them_all():
    import pytest

    from edit_jax.sharding import mesh_sizes

    assert mesh_sizes({"data": 2, "fsdp": 2}, 4) == {"data": 2, "fsdp": 2, "tensor": 1}
    with pytest.raises(ValueError, match=r"needs 2 devices, have 4 \(a mesh spans every device: set one axis to -1"):
        mesh_sizes({"data": 2}, 4)
