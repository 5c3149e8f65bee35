"""Compile-only runs for TPU slices on this CPU host (libtpu compiles for a topology without its
chips). Skipped where libtpu is not installed (it is 700 MB; CI does not install it)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                       reason="compile-only needs libtpu: pip install \"jax[tpu]==<jax's version>\""),
    pytest.mark.skipif(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") != "1",
                       reason="one process at a time may hold libtpu: run `python -m pytest tests/test_compile_only.py`"
                              " on its own (without -n)"),
]
REPO = Path(__file__).resolve().parents[1]


def compile_only(*overrides, topology="v5e:2x2"):
    args = [sys.executable, "-m", "edit_jax.cli", "train", *overrides, "--compile-only", "--topology", topology]
    # one process at a time may hold libtpu, so these run one after another
    done = subprocess.run(args, env={**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"},
                          capture_output=True, text=True, timeout=1800)
    if "{" not in done.stdout:
        raise AssertionError(f"compile-only printed no report (exit {done.returncode}): {done.stderr[-2000:]}")
    start = done.stdout.index("{")
    return done.returncode, json.loads(done.stdout[start: done.stdout.rindex("}") + 1]), done.stderr


@pytest.mark.parametrize("attention", ["xla", "splash"])
def test_the_train_step_of_a_tiny_config_compiles_for_a_tpu_slice(attention):
    code, report, err = compile_only("preset=qwen-image-tiny", "batch_size=8", "height=8", "width=8", "num_txt=64",
                                     f"attention={attention}", "mesh.data=2", "mesh.fsdp=2")
    assert code == 0, err[-3000:]
    assert (report["chips"], report["device_kind"], report["fits"]) == (4, "TPU v5 lite", True)
    assert (report["param_dtype"], report["dtype"]) == ("bfloat16", "bfloat16")  # auto, for a TPU
    assert (report["attention"], report["router_dtype"]) == (attention, "float32")
    assert list(report)[0] == "chip" and report["chip"] == "v5e (TPU v5 lite), 15.75 GiB HBM per chip"
    assert "start-up lines on stderr" in err and "harmless" in err


def test_a_cloud_slice_name_compiles_for_its_topology():
    code, report, err = compile_only("preset=flux-tiny", "batch_size=4", "height=4", "width=4", "num_txt=8",
                                     "mesh.data=4", topology="v5litepod-4")
    assert code == 0, err[-3000:]
    assert (report["chips"], report["device_kind"], report["topology"]) == (4, "TPU v5 lite", "v5litepod-4")


def test_full_size_flux_dev_router_training_at_batch_16_fits_a_v5e_4x4_slice():
    code, report, err = compile_only("preset=flux-dev", "batch_size=16", "height=64", "width=64", "num_txt=512",
                                     "remat=full", topology="v5e:4x4")
    assert code == 0, err[-3000:]
    assert report["fits"] and report["per_chip_gib"] <= 16
