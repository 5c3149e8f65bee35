"""Reference models for parity tests: tiny diffusers models with random weights, and inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


def randomize_(module, seed: int = 0, scale: float = 0.1, matrices: bool = True):
    """Perturbs every parameter (norm scales and biases included) so no weight is trivially 1/0;
    with matrices=False only the vectors (torch's init already draws every matrix at random)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if matrices or p.ndim < 2:
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
    return module


def relative_error(ours, ref) -> float:
    """||ours - ref|| / ||ref|| over the whole array, in float64."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


FLUX_TINY = dict(  # diffusers' own FluxTransformer2DModel test config
    patch_size=1,
    in_channels=4,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    axes_dims_rope=(4, 4, 8),
)


def make_diffusers_flux(seed: int = 0, matrices: bool = True, **overrides):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**{**FLUX_TINY, **overrides}).eval()
    return randomize_(model, seed, matrices=matrices)


def flux_inputs(config: dict, batch: int, height: int, width: int, num_txt: int, seed: int = 0) -> dict:
    """NumPy float32 inputs for a FLUX forward on a height x width token grid."""
    rng = np.random.default_rng(seed)
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    inputs = dict(
        hidden_states=rng.standard_normal((batch, height * width, config["in_channels"])),
        encoder_hidden_states=rng.standard_normal((batch, num_txt, config["joint_attention_dim"])),
        pooled_projections=rng.standard_normal((batch, config["pooled_projection_dim"])),
        timestep=rng.uniform(0.05, 0.95, (batch,)),
        img_ids=np.stack([np.zeros(height * width), rows.ravel(), cols.ravel()], axis=-1),
        txt_ids=np.zeros((num_txt, 3)),
    )
    if config.get("guidance_embeds"):
        inputs["guidance"] = rng.uniform(1.0, 5.0, (batch,))
    return {k: v.astype(np.float32) for k, v in inputs.items()}


def run_diffusers(model, inputs: dict) -> np.ndarray:
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in inputs.items()}, return_dict=False)[0]
    return out.float().numpy()


QWEN_TINY = dict(  # diffusers' own QwenImageTransformer2DModel test config
    patch_size=2,
    in_channels=16,
    out_channels=4,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=4,
    joint_attention_dim=16,
    axes_dims_rope=(8, 4, 4),
)


def make_diffusers_qwen(seed: int = 0, **overrides):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    model = QwenImageTransformer2DModel(**{**QWEN_TINY, **overrides}).eval()
    return randomize_(model, seed)


def qwen_inputs(config: dict, batch: int, height: int, width: int, num_txt: int, seed: int = 0) -> dict:
    """NumPy inputs for a Qwen-Image forward on a height x width packed-token grid; img_shapes
    is the static (1, height, width)."""
    rng = np.random.default_rng(seed)
    return dict(
        hidden_states=rng.standard_normal((batch, height * width, config["in_channels"])).astype(np.float32),
        encoder_hidden_states=rng.standard_normal((batch, num_txt, config["joint_attention_dim"])).astype(np.float32),
        encoder_hidden_states_mask=np.ones((batch, num_txt), np.int64),
        timestep=rng.uniform(0.05, 0.95, (batch,)).astype(np.float32),
        img_shapes=(1, height, width),
    )


def run_diffusers_qwen(model, inputs: dict) -> np.ndarray:
    kwargs = {k: torch.from_numpy(v) for k, v in inputs.items() if k != "img_shapes"}
    batch = inputs["hidden_states"].shape[0]
    with torch.no_grad():
        out = model(**kwargs, img_shapes=[[inputs["img_shapes"]]] * batch, return_dict=False)[0]
    return out.float().numpy()


def hy3dgen_shapegen(name: str):
    """`hy3dgen.shapegen.<name>` (e.g. "pipelines", "schedulers") imported with hy3dgen's package
    __init__s left out (they import the app's image and mesh tools; the shape pipeline's own
    imports, torch, diffusers, einops, trimesh, scikit-image, stay real)."""
    import importlib
    import importlib.util
    import sys
    import types

    if "hy3dgen" not in sys.modules:
        spec = importlib.util.find_spec("hy3dgen")
        if spec is None:
            pytest.skip("hy3dgen is not installed: pip install --no-deps hy3dgen==2.0.2")
        root = spec.submodule_search_locations[0]
        for package, path in (("hy3dgen", root), ("hy3dgen.shapegen", f"{root}/shapegen"),
                              ("hy3dgen.shapegen.models", f"{root}/shapegen/models")):
            module = types.ModuleType(package)
            module.__path__ = [path]
            sys.modules[package] = module
    return importlib.import_module(f"hy3dgen.shapegen.{name}")


def exact_frequencies(max_period: float, half: int, denominator: float) -> torch.Tensor:
    """[half] float32 sinusoid frequencies exp(-ln(max_period) * j / denominator): the exponent
    in float32 as diffusers and hy3dgen compute it, the exp taken in float64 and rounded once, as
    `edit_jax.layers.timestep_frequencies` takes it. torch's float32 exp (MKL's) rounds a few
    frequencies one ulp off, which ones depending on the CPU's instruction set; at timesteps and
    guidance scaled by 1000 one ulp moves the velocity by ~1e-5, so with the references' own
    frequencies a parity test at 1e-5 passes or fails by machine."""
    exponent = -math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / denominator
    return torch.exp(exponent.double()).float()


def diffusers_timestep_embedding(timesteps, embedding_dim, flip_sin_to_cos=False, downscale_freq_shift=1, scale=1,
                                 max_period=10000):
    """diffusers' `get_timestep_embedding` with `exact_frequencies` (conftest installs it for the session)."""
    half = embedding_dim // 2
    freqs = exact_frequencies(max_period, half, half - downscale_freq_shift).to(timesteps.device)
    emb = scale * (timesteps[:, None].float() * freqs[None, :])
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    return torch.nn.functional.pad(emb, (0, 1, 0, 0)) if embedding_dim % 2 else emb


def hy3dgen_timestep_embedding(t, dim, max_period=10000, time_factor: float = 1000.0):
    """hy3dgen's `timestep_embedding` with `exact_frequencies`."""
    args = (time_factor * t)[:, None].float() * exact_frequencies(max_period, dim // 2, dim // 2)[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return embedding.to(t) if torch.is_floating_point(t) else embedding


def make_hy3dgen_dit(seed: int = 0, **overrides):
    """hy3dgen's Hunyuan3DDiT on a tiny config (the `hunyuan3d-tiny` preset's), every weight random,
    its sinusoid's frequencies correctly rounded (`exact_frequencies`)."""
    dit = hy3dgen_shapegen("models.denoisers.hunyuan3ddit")
    dit.timestep_embedding = hy3dgen_timestep_embedding
    kwargs = dict(in_channels=8, context_in_dim=24, hidden_size=32, mlp_ratio=4.0, num_heads=2, depth=2,
                  depth_single_blocks=2, axes_dim=[16], qkv_bias=True, guidance_embed=False)
    torch.manual_seed(seed)
    model = dit.Hunyuan3DDiT(**{**kwargs, **overrides}).eval()
    return randomize_(model, seed)
