"""Every Python snippet of README.md runs as written, in order, in one namespace (as a reader runs
them), on tiny checkpoints made at the README's own relative paths; only sizes are substituted."""

import re
from pathlib import Path

import pytest

import edit_jax
from edit_jax.checkpoint import save
from edit_jax.models import init_variables

README = Path(__file__).resolve().parents[1] / "README.md"

# sizes only, applied in this order: full-size images, token counts and step counts -> tiny ones
SUBSTITUTIONS = (
    ("height=64, width=64", "height=4, width=4"),  # example_inputs: packed latent tokens
    ("1024", "64"),  # pixels
    ("num_txt=256", "num_txt=8"),
    ("512", "8"),  # text tokens
    ("28", "2"),  # denoising steps
    ("cache_start=20", "cache_start=1"),
)


def readme_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_the_readme_has_python_snippets():
    assert len(readme_snippets()) >= 6


def test_every_readme_snippet_runs(tmp_path, monkeypatch):
    pytest.importorskip("diffrax")
    monkeypatch.chdir(tmp_path)
    flux, qwen = edit_jax.preset("flux-small"), edit_jax.preset("qwen-image-tiny")
    save("ckpt/flux-dev", flux, init_variables(flux)["params"])
    save("ckpt/qwen-image", qwen, init_variables(qwen)["params"])
    namespace: dict = {}
    for index, snippet in enumerate(readme_snippets()):
        for old, new in SUBSTITUTIONS:
            snippet = snippet.replace(old, new)
        try:
            exec(compile(snippet, f"README.md python snippet {index + 1}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"README snippet {index + 1} failed:\n{snippet}") from e
    assert namespace["ode_latents"].shape == namespace["noise"].shape
    assert namespace["heun_latents"].shape == namespace["noise"].shape


SHELL_SUBSTITUTIONS = (("steps=200", "steps=3"),)
NEEDS_MORE = ("/models", "run.yaml", "ckpt/", "--compile-only", "--distributed", "--coordinator", "[", "demo")


def readme_commands() -> list[str]:
    """The `edit-jax ...` lines of README.md's bash blocks that run on a fresh machine (no
    downloaded weights, TPU or cluster; the demo and usage synopses are tested elsewhere)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith("edit-jax ") and not any(m in line for m in NEEDS_MORE):
                commands.append(line)
    return commands


def test_readme_training_and_export_commands_run_as_written(tmp_path, monkeypatch):
    import shlex

    from edit_jax.cli import main

    monkeypatch.chdir(tmp_path)
    commands = readme_commands()
    assert any(c.startswith("edit-jax train") for c in commands) and any(c.startswith("edit-jax export") for c in commands)
    for command in commands:
        for old, new in SHELL_SUBSTITUTIONS:
            command = command.replace(old, new)
        assert main(shlex.split(command, comments=True)[1:] + (["--quiet"] if " train " in f" {command} " else [])) == 0, command
