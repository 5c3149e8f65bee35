"""Shared fixtures. The suite runs on the CPU: with libtpu installed (for compile-only runs),
JAX would otherwise try to start a TPU runtime in every process. Its programs are many and tiny,
so their compile time is most of the suite's and their run time next to nothing: LLVM's
optimisation of the generated code is turned down (about a sixth off the suite's time) and XLA CPU's
older elemental emitter generates the fused kernels (it compiles in about half the time of the
default fusion emitters). Numerics unchanged: the parity tests hold at the same tolerances.
Subprocesses inherit the flags."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                "--xla_cpu_use_fusion_emitters=false")
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

import pytest  # noqa: E402


@pytest.fixture
def save_diffusers(tmp_path):
    """Saves a diffusers model as a `transformer/` folder; returns the folder."""

    def save(model, name="transformer", **kwargs):
        path = tmp_path / "src" / name
        model.save_pretrained(path, **kwargs)
        return path

    return save
