"""Model configs: frozen dataclasses, presets and readers for diffusers' `config.json`.

Architecture fields carry diffusers' names so a diffusers `transformer/config.json` maps onto them
one to one. Runtime fields (dtypes, attention implementation, remat) say how to run, not what the
model is; they are not compared when a checkpoint is matched against a config.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
from typing import Any, ClassVar

ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash", "tokamax")
REMAT_POLICIES = ("none", "full", "dots")
ACTIVATIONS = ("gelu_tanh", "sigmoid_gelu")
DTYPES = ("float32", "bfloat16", "float16")
WIDTH_BUCKETS = (0.25, 0.5, 0.75, 1.0)  # E-DiT MLP width buckets S, fractions of M
WIDTH_GROUPS = (8, 4, 2, 1)  # the choices of `width_groups` when it is not given, first that fits


class ConfigError(ValueError):
    """A config that cannot describe a model: unknown keys, bad values, unsupported features."""


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """How to run a model, independent of its weights.

    param_dtype: dtype the params are stored in; router_dtype: the routers' (e.g. float32 routers
    training beside a bfloat16 frozen base), param_dtype when None. dtype: compute dtype of matmuls and the residual
    stream; norms, RoPE and softmax always run in float32. attention: "auto" (default: "cudnn" on an
    NVIDIA GPU in bfloat16/float16, the kernel measured there, else "xla"), "xla" (any backend),
    "cudnn" (GPU, bfloat16/float16 only), "splash" (TPU: Pallas splash attention, a flash kernel
    that never materialises the [L, L] scores) or "tokamax" (the `tokamax` package's attention, which
    picks its fastest kernel for the device: Pallas Mosaic flash attention on Hopper/Blackwell GPUs
    and TPUs, Pallas Triton on other GPUs, else XLA). remat: "none", "full" (recompute each block in the
    backward pass) or "dots" (save matmul outputs without batch dims).
    """

    param_dtype: str = "float32"
    dtype: str = "float32"
    attention: str = "auto"
    remat: str = "none"
    router_dtype: str | None = None  # the routers' param dtype; None: param_dtype

    def __post_init__(self):
        _check_choice("param_dtype", self.param_dtype, DTYPES)
        if self.router_dtype is not None:
            _check_choice("router_dtype", self.router_dtype, DTYPES)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("attention", self.attention, ATTENTION_IMPLEMENTATIONS)
        if self.attention == "tokamax" and importlib.util.find_spec("tokamax") is None:
            raise ConfigError("attention='tokamax' needs the tokamax package: pip install 'edit-jax[tokamax]'")
        _check_choice("remat", self.remat, REMAT_POLICIES)


def resolve_dtype(dtype: str) -> str:
    """A run's dtype: "auto" is bfloat16 where JAX runs on a GPU or TPU and float32 on CPU (the dtype
    of the diffusers parity tests); any of DTYPES stays as it is."""
    import jax

    if dtype == "auto":
        return "float32" if jax.default_backend() == "cpu" else "bfloat16"
    _check_choice("dtype", dtype, DTYPES)
    return dtype


def resolve_attention(attention: str, dtype) -> str:
    """The attention implementation a model of compute `dtype` runs: "auto" is "cudnn" on an NVIDIA
    GPU in bfloat16 or float16 (cuDNN's flash kernels, the ones this project times there) and "xla"
    elsewhere; any other choice stays as it is."""
    import jax
    import numpy as np

    if attention != "auto":
        return attention
    device = jax.devices()[0]
    nvidia = device.platform == "gpu" and "nvidia" in device.device_kind.lower()
    return "cudnn" if nvidia and np.dtype(dtype) in (np.dtype("bfloat16"), np.dtype("float16")) else "xla"


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {choices}")


class TransformerConfig:
    """What every model config shares: derived widths, validation of the common fields, and
    copying with changes. Subclasses are frozen dataclasses with diffusers' field names."""

    def _check_common(self, layer_counts: tuple[str, ...]) -> None:
        object.__setattr__(self, "axes_dims_rope", tuple(self.axes_dims_rope))
        object.__setattr__(self, "width_buckets", tuple(self.width_buckets))
        if isinstance(self.runtime, dict):
            object.__setattr__(self, "runtime", RuntimeConfig(**self.runtime))
        _check_choice("activation", self.activation, ACTIVATIONS)
        for name in layer_counts:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ConfigError(
                f"axes_dims_rope {self.axes_dims_rope} must sum to attention_head_dim {self.attention_head_dim}"
            )
        if any(d % 2 for d in self.axes_dims_rope):
            raise ConfigError(f"axes_dims_rope {self.axes_dims_rope} must all be even")
        self._check_width_groups()

    def _check_width_groups(self) -> None:
        widths = [round(s * self.mlp_hidden_dim) for s in self.width_buckets]
        if self.width_groups is None:
            object.__setattr__(self, "width_groups", next(g for g in WIDTH_GROUPS if all(w % g == 0 for w in widths)))
        if not isinstance(self.width_groups, int) or self.width_groups < 1 or any(w % self.width_groups for w in widths):
            raise ConfigError(f"width_groups={self.width_groups!r} must be a positive int dividing every width bucket's "
                              f"channel count {widths} (1 always does)")

    @property
    def block_stacks(self) -> tuple[tuple[str, int, str], ...]:
        """(params name, layers, block kind) of each scanned block stack, in scan order; the kind
        is "dual" (a dual-stream MMDiT block) or "single" (a FLUX single-stream block)."""
        raise NotImplementedError

    @property
    def num_blocks(self) -> int:
        """Every routed block, in scan order (FLUX: double-stream, then single-stream)."""
        return sum(layers for _, layers, _ in self.block_stacks)

    @property
    def inner_dim(self) -> int:
        """D, the width of the residual stream."""
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp_hidden_dim(self) -> int:
        """M, the hidden width of every MLP (4D for the real models)."""
        return int(self.inner_dim * self.mlp_ratio)

    @property
    def output_channels(self) -> int:
        return self.patch_size**2 * (self.out_channels or self.in_channels)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def with_runtime(self, **changes):
        known = [f.name for f in dataclasses.fields(RuntimeConfig)]
        unknown = sorted(set(changes) - set(known))
        if unknown:
            raise ConfigError(f"unknown runtime option(s) {unknown}; known: {', '.join(known)}")
        return dataclasses.replace(self, runtime=dataclasses.replace(self.runtime, **changes))

    def architecture(self) -> dict[str, Any]:
        """The fields that define the model (everything but `runtime`)."""
        d = config_to_dict(self)
        d.pop("runtime")
        return d


@dataclasses.dataclass(frozen=True)
class FluxConfig(TransformerConfig):
    """FLUX.1 transformer (diffusers `FluxTransformer2DModel`)."""

    family: ClassVar[str] = "flux"

    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    mlp_ratio: float = 4.0
    activation: str = "gelu_tanh"
    router_hidden: int = 128
    width_buckets: tuple[float, ...] = WIDTH_BUCKETS
    width_groups: int | None = None  # G: how the MLP hidden channels are stored, see `edit_jax.elastic`
    runtime: RuntimeConfig = RuntimeConfig()

    def __post_init__(self):
        self._check_common(("num_layers", "num_single_layers"))

    @property
    def block_stacks(self) -> tuple[tuple[str, int, str], ...]:
        return (("transformer_blocks", self.num_layers, "dual"),
                ("single_transformer_blocks", self.num_single_layers, "single"))


def proj_out_parts(cfg: FluxConfig) -> tuple[tuple[str, str, int], ...]:
    """The FLUX single blocks' proj_out input [attention D; MLP M] as `JointLinear.parts`: two
    kernels (name, logical axis of their rows, rows), sharded like an attention output
    projection's and like fc2's. The checkpoint format and the converters read it too."""
    return ("kernel_attn", "heads", cfg.inner_dim), ("kernel_mlp", "mlp", cfg.mlp_hidden_dim)


@dataclasses.dataclass(frozen=True)
class QwenImageConfig(TransformerConfig):
    """Qwen-Image transformer (diffusers `QwenImageTransformer2DModel`).

    activation: "gelu_tanh" as diffusers, or "sigmoid_gelu" (x * sigmoid(1.702 x)) as the released
    E-DiT checkpoint was trained with. zero_cond_t (Qwen-Image-Edit-2511): the reference images'
    tokens (every image after the first in `img_shapes`) are modulated from the time embedding
    at t = 0. Diffusers features we do not implement (use_additional_t_cond, use_layer3d_rope,
    guidance_embeds) are rejected, never ignored.
    """

    family: ClassVar[str] = "qwen-image"

    patch_size: int = 2
    in_channels: int = 64
    out_channels: int | None = 16
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    zero_cond_t: bool = False
    use_additional_t_cond: bool = False
    use_layer3d_rope: bool = False
    mlp_ratio: float = 4.0
    activation: str = "gelu_tanh"
    router_hidden: int = 128
    width_buckets: tuple[float, ...] = WIDTH_BUCKETS
    width_groups: int | None = None  # G: how the MLP hidden channels are stored, see `edit_jax.elastic`
    runtime: RuntimeConfig = RuntimeConfig()

    def __post_init__(self):
        self._check_common(("num_layers",))
        unsupported = [f for f in ("use_additional_t_cond", "use_layer3d_rope", "guidance_embeds")
                       if getattr(self, f)]
        if unsupported:
            raise ConfigError(f"Qwen-Image config features not implemented in edit-jax: {unsupported}")
        if len(self.axes_dims_rope) != 3:
            raise ConfigError(f"axes_dims_rope {self.axes_dims_rope} must have 3 sizes (frame, row, column)")

    @property
    def block_stacks(self) -> tuple[tuple[str, int, str], ...]:
        return (("transformer_blocks", self.num_layers, "dual"),)


@dataclasses.dataclass(frozen=True)
class Hunyuan3DConfig(TransformerConfig):
    """Hunyuan3D-2's shape DiT (hy3dgen `Hunyuan3DDiT`): FLUX.1's double- and single-stream
    blocks over shape latent tokens, conditioned on image features, without RoPE or a pooled
    vector. Fields take FLUX's names; hy3dgen's: depth = num_layers, depth_single_blocks =
    num_single_layers, num_heads = num_attention_heads, hidden_size = num_attention_heads *
    attention_head_dim, context_in_dim = joint_attention_dim, guidance_embed = guidance_embeds,
    axes_dim = axes_dims_rope (checked, unused: the release passes no positions), time_factor
    (which hy3dgen uses as its sinusoid's max_period, `edit_jax.models.hunyuan3d`).
    qkv_bias=False (no q, k, v biases) is rejected, never ignored.
    """

    family: ClassVar[str] = "hunyuan3d"

    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 16
    num_single_layers: int = 32
    attention_head_dim: int = 64
    num_attention_heads: int = 16
    joint_attention_dim: int = 1536
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (64,)
    time_factor: float = 1000.0
    qkv_bias: bool = True
    mlp_ratio: float = 4.0
    activation: str = "gelu_tanh"
    router_hidden: int = 128
    width_buckets: tuple[float, ...] = WIDTH_BUCKETS
    width_groups: int | None = None  # G: how the MLP hidden channels are stored, see `edit_jax.elastic`
    runtime: RuntimeConfig = RuntimeConfig()

    def __post_init__(self):
        self._check_common(("num_layers", "num_single_layers"))
        if not self.qkv_bias:
            raise ConfigError("Hunyuan3D-2 DiT with qkv_bias=False is not implemented in edit-jax")
        if self.patch_size != 1 or (self.out_channels or self.in_channels) != self.in_channels:
            raise ConfigError("Hunyuan3D-2 DiT has patch_size 1 and as many output channels as input channels")

    @property
    def block_stacks(self) -> tuple[tuple[str, int, str], ...]:
        return (("transformer_blocks", self.num_layers, "dual"),
                ("single_transformer_blocks", self.num_single_layers, "single"))


MODEL_CONFIGS = {"flux": FluxConfig, "qwen-image": QwenImageConfig, "hunyuan3d": Hunyuan3DConfig}

PRESETS: dict[str, Any] = {
    "flux-dev": FluxConfig(guidance_embeds=True),
    "flux-schnell": FluxConfig(guidance_embeds=False),
    # diffusers' own FluxTransformer2DModel test config
    "flux-tiny": FluxConfig(
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        in_channels=4,
        axes_dims_rope=(4, 4, 8),
    ),
    # a few blocks of each kind, still fast on CPU: the default of `edit-jax demo`
    "flux-small": FluxConfig(
        num_layers=2,
        num_single_layers=4,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=64,
        pooled_projection_dim=32,
        in_channels=16,
        axes_dims_rope=(8, 12, 12),
        guidance_embeds=True,
    ),
    "qwen-image": QwenImageConfig(),
    "hunyuan3d-2": Hunyuan3DConfig(),
    # a few blocks of each kind, for tests
    "hunyuan3d-tiny": Hunyuan3DConfig(num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                                      joint_attention_dim=24, in_channels=8, axes_dims_rope=(16,)),
    # diffusers' own QwenImageTransformer2DModel test config
    "qwen-image-tiny": QwenImageConfig(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=16,
        axes_dims_rope=(8, 4, 4),
    ),
}


def preset(name: str):
    """A preset config by name (see `PRESETS`)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def config_to_dict(config) -> dict[str, Any]:
    d = dataclasses.asdict(config)
    d["axes_dims_rope"] = list(d["axes_dims_rope"])
    d["width_buckets"] = list(d["width_buckets"])
    return d


def config_from_dict(family: str, d: dict[str, Any]):
    """Inverse of `config_to_dict`; unknown keys are an error that names them."""
    cls = MODEL_CONFIGS.get(family)
    if cls is None:
        raise ConfigError(f"unknown model family {family!r}; known: {', '.join(MODEL_CONFIGS)}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown {family} config keys: {unknown}")
    return cls(**d)


DIFFUSERS_CLASSES = {"FluxTransformer2DModel": "flux", "QwenImageTransformer2DModel": "qwen-image"}
# Keys of released config.json files that diffusers' model class takes no argument for and drops:
# Qwen/Qwen-Image's transformer config was written by a diffusers whose QwenImageTransformer2DModel
# still had an unused pooled_projection_dim (768). Nothing reads it, so neither do we.
INERT_DIFFUSERS_KEYS = {"qwen-image": ("pooled_projection_dim",)}


def read_json_object(path: str | Path) -> dict[str, Any]:
    """A JSON file holding an object (a config.json), or one ConfigError naming the file."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{path} is not a readable JSON file: {e}") from e
    if not isinstance(value, dict):
        raise ConfigError(f"{path} holds a JSON {type(value).__name__}, not an object of settings")
    return value


def from_diffusers_config(source: str | Path | dict[str, Any], family: str | None = None):
    """Reads a diffusers transformer config (a dict, a config.json, or the folder holding it).

    Keys we do not implement are an error that names them, never silently dropped.
    """
    if not isinstance(source, dict):
        path = Path(source)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"no diffusers config.json at {path}")
        source = read_json_object(path)
    d = dict(source)
    class_name = d.get("_class_name")
    if family is None:
        if class_name not in DIFFUSERS_CLASSES:
            raise ConfigError(
                f"cannot tell the model family of diffusers class {class_name!r}; "
                f"known classes: {', '.join(DIFFUSERS_CLASSES)}"
            )
        family = DIFFUSERS_CLASSES[class_name]
    elif class_name is not None and DIFFUSERS_CLASSES.get(class_name, family) != family:
        raise ConfigError(f"config is for {class_name}, not a {family} model")
    # keys starting with "_" are diffusers' own bookkeeping (class name, version, defaults used)
    inert = INERT_DIFFUSERS_KEYS.get(family, ())
    return config_from_dict(family, {k: v for k, v in d.items() if not k.startswith("_") and k not in inert})
