"""Every Python snippet of README.md and docs/ runs as written, each page's in order in one namespace
(as a reader runs them), on tiny checkpoints made at the pages' own relative paths; only sizes are
substituted. Every `edit-jax` command of their bash blocks runs too, and every link between them
points at a file and heading that exist."""

import re
from pathlib import Path

import pytest

import edit_jax
from edit_jax.checkpoint import save
from edit_jax.models.registry import init_variables

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
# the order their commands run in: converting.md's export reads the run training.md's commands train
ORDER = ("walkthrough", "model", "sampling", "prompt-to-image", "image-to-mesh", "training", "converting", "evaluation",
         "checkpoint-format", "cli", "benchmarks", "architecture")
PAGES = [README, *sorted((REPO / "docs").glob("*.md"), key=lambda p: (ORDER + (p.stem,)).index(p.stem))]

# sizes only, applied in this order: full-size images, token counts and step counts -> tiny ones
SUBSTITUTIONS = (
    ("height=64, width=64", "height=4, width=4"),  # example_inputs: packed latent tokens
    ("1024", "64"),  # pixels
    ("num_txt=256", "num_txt=8"),
    ("512", "8"),  # text tokens
    ("28", "2"),  # denoising steps
    ("cache_start=20", "cache_start=1"),
    ('"tensor": 2', '"tensor": 1'),  # mesh axes: one CPU device
    ("steps=200", "steps=3"),  # training steps
)


def python_snippets(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.DOTALL)


def test_the_docs_have_python_snippets():
    assert sum(len(python_snippets(page)) for page in PAGES) >= 8


@pytest.mark.parametrize("page", [p for p in PAGES if python_snippets(p)], ids=lambda p: p.name)
def test_every_python_snippet_of_a_page_runs_in_order(page, tmp_path, monkeypatch):
    pytest.importorskip("diffrax")
    monkeypatch.chdir(tmp_path)
    snippets = python_snippets(page)
    tiny = {"ckpt/flux-dev": edit_jax.preset("flux-tiny").replace(guidance_embeds=True),
            "ckpt/qwen-image": edit_jax.preset("qwen-image-tiny")}
    for path, config in tiny.items():  # the checkpoints the page reads, tiny
        if any(f'"{path}"' in snippet for snippet in snippets):
            save(path, config, init_variables(config)["params"])
    namespace: dict = {}
    for index, snippet in enumerate(snippets):
        for old, new in SUBSTITUTIONS:
            snippet = snippet.replace(old, new)
        try:
            exec(compile(snippet, f"{page.name} python snippet {index + 1}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"{page.name} snippet {index + 1} failed:\n{snippet}") from e
    if page.name == "sampling.md":
        assert namespace["ode_latents"].shape == namespace["noise"].shape
        assert namespace["heun_latents"].shape == namespace["noise"].shape


def test_every_link_between_the_pages_points_at_a_file_and_heading_that_exist():
    def anchors(page: Path) -> set[str]:
        headings = re.findall(r"(?m)^#+ (.+)$", re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL))
        return {re.sub(r"[^a-z0-9 _-]", "", h.lower()).replace(" ", "-") for h in headings}

    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in anchors(linked)):
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert not broken, broken


SHELL_SUBSTITUTIONS = (("steps=200", "steps=3"),)
NEEDS_MORE = ("/models", "run.yaml", "ckpt/", "--compile-only", "--distributed", "--coordinator", "[", "demo")


def doc_commands(converting: bool = False) -> list[str]:
    """The `edit-jax ...` lines of the bash blocks of README.md and docs/: with `converting`, those of the blocks
    that convert weights from /models; otherwise those that run on a fresh machine (no weights,
    TPU or cluster; the demo and usage synopses are tested elsewhere)."""
    commands = []
    blocks = [b for page in PAGES for b in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.DOTALL)]
    for block in blocks:
        if converting != ("/models" in block):
            continue
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith("edit-jax ") and (converting or not any(m in line for m in NEEDS_MORE)):
                commands.append(line)
    return commands


def test_the_training_and_export_commands_of_the_docs_run_as_written(tmp_path, monkeypatch):
    import shlex

    from edit_jax.cli import main

    monkeypatch.chdir(tmp_path)
    commands = doc_commands()
    assert any(c.startswith("edit-jax train") for c in commands) and any(c.startswith("edit-jax export") for c in commands)
    for command in commands:
        for old, new in SHELL_SUBSTITUTIONS:
            command = command.replace(old, new)
        assert main(shlex.split(command, comments=True)[1:] + (["--quiet"] if " train " in f" {command} " else [])) == 0, command


def test_the_conversion_commands_of_the_docs_run_as_written_on_tiny_sources(tmp_path, monkeypatch):
    """The docs' /models/... sources, made tiny (diffusers' own test configs) in a temp folder."""
    import shlex

    from safetensors.torch import save_file

    from edit_jax.cli import main
    from tiny_pipeline import make_tiny_flux_pipeline, make_tiny_qwen_pipeline
    from test_convert_flux import diffusers_to_bfl
    from test_generate_3d import make_release, object_image
    from test_qwen_image import fake_release

    models = tmp_path / "models"
    flux = make_tiny_flux_pipeline(models / "FLUX.1-dev").transformer  # the whole pipeline, for generate
    save_file(diffusers_to_bfl(flux.state_dict(), 1, 1), models / "flux1-dev.safetensors")
    make_photos(tmp_path / "photos")
    qwen = make_tiny_qwen_pipeline(models / "Qwen-Image").transformer
    (models / "Elastic-DiT").mkdir()
    fake_release(qwen, models / "Elastic-DiT" / "model.safetensors")
    (tmp_path / "prompts.txt").write_text("a red fox in the snow\ntwo cats\n")
    make_release(models / "Hunyuan3D-2" / "hunyuan3d-dit-v2-0")
    object_image(tmp_path / "chair.png"), object_image(tmp_path / "lamp.png", (30, 50))
    substitutions = (("/models/", f"{models}/"),  # a BFL file carries no config: the tiny one's, given
                     ("--format bfl", f"--format bfl --config {models}/FLUX.1-dev/transformer/config.json"),
                     ("1024", "64"), ("--steps 28", "--steps 2"), ("steps=2000", "steps=2"),
                     ("batch_size=16", "batch_size=1"),  # make_photos' buckets hold one photo each
                     ("--out meshes/", "--out meshes/ --steps 2 --octree-resolution 8 --num-chunks 200"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))  # the embedding cache's default folder
    commands = doc_commands(converting=True)
    assert sum(c.startswith("edit-jax convert") for c in commands) == 5
    assert sum(c.startswith("edit-jax generate") for c in commands) == 4
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
    """Three captioned random photos of the size the walkthrough's prepare-data line (made tiny) takes."""
    import numpy as np
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, size in enumerate(((80, 80), (120, 70), (70, 120))):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), np.uint8)).save(folder / f"photo-{i}.png")
        (folder / f"photo-{i}.txt").write_text(f"photo number {i}")


def test_every_flag_of_the_cli_synopsis_is_one_its_command_takes():
    from edit_jax.cli import build_parser

    block = (REPO / "docs" / "cli.md").read_text().split("```\n")[1]  # the page's first fenced block
    commands = build_parser()._subparsers._group_actions[0].choices
    named, command = [], None
    for line in block.splitlines():
        if line.startswith("edit-jax "):
            command = line.split()[1]
        for flag in re.findall(r"--[a-z][a-z-]*", line.split("#")[0]):
            named.append((command, flag))
    unknown = [(c, f) for c, f in named if f not in commands[c]._option_string_actions]
    assert len(named) > 40 and not unknown


def test_every_demo_command_of_the_docs_gives_settings_the_demo_accepts():
    import shlex

    from edit_jax.cli import build_parser
    from edit_jax.eval.demo import SETTINGS, with_overrides

    blocks = [b for page in PAGES for b in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.DOTALL)]
    commands = [line for b in blocks for line in b.replace("\\\n", " ").splitlines() if line.startswith("edit-jax demo")]
    assert any("--set" in c for c in commands)
    for command in commands:
        args = build_parser().parse_args(shlex.split(command, comments=True)[1:])
        with_overrides(SETTINGS["full" if args.full else args.settings], args.set)  # a DemoError names a bad --set
