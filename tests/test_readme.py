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
    ('"tensor": 2', '"tensor": 1'),  # mesh axes: one CPU device
)


def readme_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_the_readme_has_python_snippets():
    assert len(readme_snippets()) >= 6


def test_every_readme_snippet_runs(tmp_path, monkeypatch):
    pytest.importorskip("diffrax")
    monkeypatch.chdir(tmp_path)
    flux, qwen = edit_jax.preset("flux-tiny").replace(guidance_embeds=True), edit_jax.preset("qwen-image-tiny")
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


def readme_commands(converting: bool = False) -> list[str]:
    """The `edit-jax ...` lines of README.md's bash blocks: with `converting`, those of the blocks
    that convert weights from /models; otherwise those that run on a fresh machine (no weights,
    TPU or cluster; the demo and usage synopses are tested elsewhere)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.DOTALL):
        if converting != ("/models" in block):
            continue
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith("edit-jax ") and (converting or not any(m in line for m in NEEDS_MORE)):
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


def test_readme_conversion_commands_run_as_written_on_tiny_sources(tmp_path, monkeypatch):
    """The README's /models/... sources, made tiny (diffusers' own test configs) in a temp folder."""
    import shlex

    from safetensors.torch import save_file

    from edit_jax.cli import main
    from tiny_pipeline import make_tiny_flux_pipeline, make_tiny_qwen_pipeline
    from test_convert_flux import diffusers_to_bfl
    from test_qwen_image import fake_release

    models = tmp_path / "models"
    flux = make_tiny_flux_pipeline(models / "FLUX.1-dev").transformer  # the whole pipeline, for generate
    save_file(diffusers_to_bfl(flux.state_dict(), 1, 1), models / "flux1-dev.safetensors")
    make_photos(tmp_path / "photos")
    qwen = make_tiny_qwen_pipeline(models / "Qwen-Image").transformer
    (models / "Elastic-DiT").mkdir()
    fake_release(qwen, models / "Elastic-DiT" / "model.safetensors")
    (tmp_path / "prompts.txt").write_text("a red fox in the snow\ntwo cats\n")
    substitutions = (("/models/", f"{models}/"),  # a BFL file carries no config: the tiny one's, given
                     ("--format bfl", f"--format bfl --config {models}/FLUX.1-dev/transformer/config.json"),
                     ("1024", "64"), ("--steps 28", "--steps 2"), ("steps=2000", "steps=2"),
                     ("batch_size=16", "batch_size=1"))  # make_photos' buckets hold one photo each
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))  # the embedding cache's default folder
    commands = readme_commands(converting=True)
    assert sum(c.startswith("edit-jax convert") for c in commands) == 4
    assert sum(c.startswith("edit-jax generate") for c in commands) == 3
    assert sum(c.startswith(("edit-jax order-channels", "edit-jax train")) for c in commands) == 2
    assert sum("prepare-data" in c for c in commands) == 2
    assert sum(c.startswith(("edit-jax encode-prompts", "edit-jax eval")) for c in commands) == 2
    for command in commands:
        for old, new in substitutions:
            command = command.replace(old, new)
        quiet = ["--quiet"] if command.startswith(("edit-jax generate", "edit-jax prepare-data", "edit-jax encode",
                                                   "edit-jax train")) else []
        assert main(shlex.split(command, comments=True)[1:] + quiet) == 0, command


def make_photos(folder):
    """Three captioned random photos of the size the README's prepare-data line (made tiny) takes."""
    import numpy as np
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, size in enumerate(((80, 80), (120, 70), (70, 120))):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), np.uint8)).save(folder / f"photo-{i}.png")
        (folder / f"photo-{i}.txt").write_text(f"photo number {i}")


def test_every_flag_of_the_readme_synopsis_is_one_its_command_takes():
    from edit_jax.cli import build_parser

    block = README.read_text().split("\n## CLI\n", 1)[1].split("```\n")[1]  # the section's first fenced block
    commands = build_parser()._subparsers._group_actions[0].choices
    named, command = [], None
    for line in block.splitlines():
        if line.startswith("edit-jax "):
            command = line.split()[1]
        for flag in re.findall(r"--[a-z][a-z-]*", line.split("#")[0]):
            named.append((command, flag))
    unknown = [(c, f) for c, f in named if f not in commands[c]._option_string_actions]
    assert len(named) > 40 and not unknown
