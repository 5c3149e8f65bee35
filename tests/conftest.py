"""Shared fixtures. The suite runs on the CPU: with libtpu installed (for compile-only runs),
JAX would otherwise try to start a TPU runtime in every process. Its programs are many and tiny,
so their compile time is most of the suite's and their run time next to nothing: LLVM's
optimisation of the generated code is turned down (about a sixth off the suite's time) and XLA CPU's
older elemental emitter generates the fused kernels (it compiles in about half the time of the
default fusion emitters), each program's LLVM module in one piece (split for parallel codegen,
it compiled about a tenth slower even on an idle machine). Numerics unchanged: the parity tests
hold at the same tolerances. Subprocesses inherit the flags. The suite starts some thirty Python
subprocesses: they read the project's bytecode from __pycache__ rather than each compile its
sources anew (0.3 s a process), also where the environment sets PYTHONDONTWRITEBYTECODE."""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False
FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                "--xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1")
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

import importlib.util  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from filelock import FileLock  # noqa: E402

# The costliest files first (their summed test seconds on 2 cores, most first): the suite runs with
# `--dist loadfile --no-loadscope-reorder`, so each file runs on one xdist worker (its module fixtures
# and compiled programs made once, not once per worker) and the workers take files in this order,
# the long ones while the short ones can still even out the end.
COSTLIEST_FIRST = ("test_train.py", "test_benchmarks.py", "test_demo.py", "test_docs.py", "test_sharding.py",
                   "test_step_cache.py", "test_learned_reuse.py", "test_cli.py", "test_elastic.py", "test_sampler.py",
                   "test_convert_flux.py", "test_generate.py", "test_qwen_image.py", "test_prepare_data.py",
                   "test_hunyuan3d.py", "test_generate_3d.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(COSTLIEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order


@pytest.fixture(autouse=True, scope="session")
def references_with_exact_frequencies():
    """diffusers' sinusoid timestep embedding with correctly rounded frequencies for the whole session
    (`reference.exact_frequencies`: with torch's own, parity at 1e-5 would depend on the CPU)."""
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("diffusers") is None:
        yield
        return
    import diffusers.models.embeddings
    from reference import diffusers_timestep_embedding

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(diffusers.models.embeddings, "get_timestep_embedding", diffusers_timestep_embedding)
        yield


@pytest.fixture(scope="session")
def once_per_session(tmp_path_factory):
    """once(name, make) -> (folder, result): make(folder) run once in the whole test session, by
    whichever xdist worker asks first (the others wait for it and read its result), for a costly
    result that several tests only read. The result must be JSON."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # every worker's basetemp sits in the session's
        root = root.parent

    def once(name: str, make) -> tuple[Path, object]:
        folder, done = root / name, root / f"{name}.json"
        with FileLock(f"{folder}.lock"):
            if not done.exists():
                shutil.rmtree(folder, ignore_errors=True)  # what an attempt that failed left
                folder.mkdir()
                done.write_text(json.dumps(make(folder)))
        return folder, json.loads(done.read_text())

    return once


@pytest.fixture
def save_diffusers(tmp_path):
    """Saves a diffusers model as a `transformer/` folder; returns the folder."""

    def save(model, name="transformer", **kwargs):
        path = tmp_path / "src" / name
        model.save_pretrained(path, **kwargs)
        return path

    return save


@pytest.fixture
def flux_small_ckpt(tmp_path):
    """A flux-small checkpoint without routers and a matching embeddings file."""
    import numpy as np

    import edit_jax
    from edit_jax.checkpoint import save

    config = edit_jax.preset("flux-small")
    save(tmp_path / "ckpt", config, edit_jax.init_params(config))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "emb.npz", prompt_embeds=rng.standard_normal((1, 8, 64)).astype(np.float32),
             pooled_prompt_embeds=rng.standard_normal((1, 32)).astype(np.float32))
    return tmp_path / "ckpt", tmp_path / "emb.npz"
