"""One record per model family: what differs between FLUX, Qwen-Image and Hunyuan3D-2 is read from the family's
record, never from branches on the config's type outside the family modules."""

import ast
from pathlib import Path

import pytest

from edit_jax.config import PRESETS, FluxConfig
from edit_jax.models.registry import FAMILIES, build_model, example_inputs, family_of
from edit_jax.sampling.sampler import default_scheduler

REPO = Path(__file__).resolve().parents[1]
FAMILY_MODULES = {"edit_jax/models/flux.py", "edit_jax/models/qwen_image.py", "edit_jax/models/hunyuan3d.py",
                  "edit_jax/config.py"}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_has_a_family_record_whose_stacks_are_its_configs(name):
    config = PRESETS[name]
    family = family_of(config)
    assert family.name == config.family
    assert family.block_stacks == tuple(stack for stack, _, _ in config.block_stacks)
    assert set(family.block_modulations) == set(family.block_stacks)
    assert isinstance(build_model(config), family.transformer)


def test_a_config_of_no_known_family_is_a_clear_error():
    with pytest.raises(TypeError, match="no model family for config type dict; known: flux, qwen-image, hunyuan3d"):
        family_of({})


def test_example_inputs_hold_the_family_positions_and_prompt_extras():
    for name in ("flux-tiny", "qwen-image-tiny", "hunyuan3d-tiny"):
        config = PRESETS[name]
        family = family_of(config)
        inputs = example_inputs(config, batch=2, height=2, width=3, num_txt=4)
        assert set(family.positions(config, 2, 3, 4)) <= set(inputs)
        for key, (shape, _) in family.prompt_extras(config, 2, 4).items():
            assert inputs[key].shape == shape


def test_flux_dev_and_schnell_take_their_own_schedulers_and_guidance():
    dev, schnell = FluxConfig(guidance_embeds=True), FluxConfig()
    assert default_scheduler(dev) != default_scheduler(schnell)
    assert set(family_of(dev).guidance(dev, 3.5, 2)) == {"guidance"} and family_of(schnell).guidance(schnell, 3.5, 2) == {}


def test_no_module_outside_the_family_modules_branches_on_the_config_type():
    branches = []
    for package in ("edit_jax", "train", "eval", "pipelines", "checkpoints_convert"):
        for path in sorted((REPO / package).rglob("*.py")):
            if str(path.relative_to(REPO)) in FAMILY_MODULES:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance"
                        and any(getattr(a, "id", "") in ("FluxConfig", "QwenImageConfig", "Hunyuan3DConfig") for a in ast.walk(node.args[1]))):
                    branches.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not branches, f"branches on the model family outside its record: {branches}"
    assert set(FAMILIES) == {"flux", "qwen-image", "hunyuan3d"}
