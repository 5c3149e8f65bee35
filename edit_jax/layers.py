"""Parts shared by every model family: linears, norms, modulation, MLP, RoPE, attention.

Shapes: B batch, L tokens, D model width, H heads, K head dim, M MLP hidden width.
Every param is created with logical axis names (see `edit_jax.sharding`), so the models need no
change to be sharded.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from edit_jax.config import RuntimeConfig, resolve_attention
from edit_jax.sharding import constrain, gathered, logical_to_mesh

TOKENS = ("activation_batch", "activation_length", "activation_embed")  # [B, L, D]
HIDDEN = ("activation_batch", "activation_length", "activation_mlp")  # [B, L, M]
HEADS = ("activation_batch", "activation_length", "activation_heads", "activation_head_dim")  # [B, L, H, K]

Dtype = jnp.dtype


def dtype_of(name: str) -> Dtype:
    return jnp.dtype(name)


def channel_ranks(hidden_dim: int, groups: int) -> np.ndarray:
    """[M] int: which hidden channel (in the model's order, PyTorch's) each stored position holds.
    With G groups, stored position g * (M / G) + i holds channel i * G + g: the channels are dealt
    round robin to G groups, so the first m channels (G dividing m) are the first m / G positions
    of every group. Each group being a contiguous block, a width bucket then takes the same share
    of every tensor shard of the MLP axis when G is a multiple of the shard count; kept as a
    prefix of one axis, it would sit on the first shards and be moved to the others first."""
    per = hidden_dim // groups
    stored = np.arange(hidden_dim)
    return (stored % per) * groups + stored // per


def narrow(x: jax.Array, axis: int, width: int, groups: int = 1) -> jax.Array:
    """The stored positions of the first `width` hidden channels along `axis` of x (see
    `channel_ranks`): the first width / G positions of each of the G groups, in stored order.

    Args:
      x: an array. axis: the hidden-channel axis of x. width: channels kept. groups: G.
    """
    axis %= x.ndim
    size = x.shape[axis]
    if width == size:
        return x
    if groups == 1:
        return jax.lax.slice_in_dim(x, 0, width, axis=axis)
    grouped = x.reshape(x.shape[:axis] + (groups, size // groups) + x.shape[axis + 1 :])
    kept = jax.lax.slice_in_dim(grouped, 0, width // groups, axis=axis + 1)
    return kept.reshape(x.shape[:axis] + (width,) + x.shape[axis + 1 :])


def weight(module: nn.Module, name: str, init, axes: tuple[str, ...], shape: tuple[int, ...],
           collection: str = "params") -> jax.Array:
    """A kernel or bias of `module` with logical `axes`, in the runtime's param dtype (the router
    dtype for the "routers" collection).

    Args:
      module: the module that owns it. name: the param's name. init: its initializer.
      axes: logical axis names, one per dimension. shape: its shape. collection: "params" or "routers".
    """
    init = nn.with_logical_partitioning(init, axes)
    rt = module.runtime
    dtype = dtype_of(rt.router_dtype or rt.param_dtype if collection == "routers" else rt.param_dtype)
    if collection == "params":
        if module.has_variable("params", name):  # what module.param checks, without tracing the initializer
            value = nn.meta.unbox(module.get_variable("params", name))
            if value.shape != shape:
                raise flax.errors.ScopeParamShapeError(name, module.scope.path_text, value.shape, shape)
            return value
        return module.param(name, init, shape, dtype)
    return module.variable(collection, name, lambda: init(module.make_rng("params"), shape, dtype)).value


class Linear(nn.Module):
    """y = x @ kernel + bias, kernel [in, out] (PyTorch's Linear weight transposed).

    `axes` are the logical names of the kernel's (in, out) axes. An input narrower than
    `in_features` meets only the kernel's rows of its channels, and `out_size` keeps only the
    columns of the first `out_size` channels: static slices, so a narrow call really does fewer
    FLOPs (the elastic MLP width buckets). The channels are stored in `groups` groups (`narrow`,
    `channel_ranks`; 1: in order). `collection` puts the params in another variable collection (the
    E-DiT routers live in "routers", apart from the base "params").
    """

    features: int
    axes: tuple[str, str]
    runtime: RuntimeConfig
    use_bias: bool = True
    in_features: int | None = None  # needed only when called with fewer input features
    groups: int = 1
    collection: str = "params"
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()

    def _weight(self, name, init, axes, shape):
        return weight(self, name, init, axes, shape, self.collection)

    @nn.compact
    def __call__(self, x: jax.Array, out_size: int | None = None):
        kernel = gathered(self._weight("kernel", self.kernel_init, self.axes, (self.in_features or x.shape[-1], self.features)),
                          self.axes)
        if out_size is not None:
            kernel = narrow(kernel, 1, out_size, self.groups)
        dtype = dtype_of(self.runtime.dtype)
        y = jnp.dot(x.astype(dtype), narrow(kernel, 0, x.shape[-1], self.groups).astype(dtype))
        if self.use_bias:
            bias = gathered(self._weight("bias", self.bias_init, self.axes[1:], (self.features,)), self.axes[1:])
            if out_size is not None:
                bias = narrow(bias, 0, out_size, self.groups)
            y = y + bias.astype(dtype)
        return y


class JointLinear(nn.Module):
    """y = concat(x_1, ..., x_n) @ kernel + bias, with the kernel's input rows stored as one param
    per part: `parts` names each part's (param name, logical input axis, rows), in input order;
    `out_axis` is the output's logical axis. Each part meets its own kernel and the products are
    summed, so the concatenation is never written, and each kernel is sharded by its own input
    axis (FLUX single blocks' proj_out: attention rows like an output projection's, MLP rows like
    fc2's; as one param split over `tensor` in two halves, each device would need rows held by the
    other). A part narrower than its rows meets only the rows of its first channels (elastic width;
    stored in `groups` groups, see `narrow`). Initialised as one Linear over the whole input: one
    [sum(rows), features] kernel drawn, then split, so the values do not depend on the split.
    """

    features: int
    parts: tuple[tuple[str, str, int], ...]
    out_axis: str
    runtime: RuntimeConfig
    groups: int = 1
    use_bias: bool = True
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()

    def _kernels(self) -> list[jax.Array]:
        shapes = [(rows, self.features) for _, _, rows in self.parts]
        if all(self.has_variable("params", name) for name, _, _ in self.parts):
            return [weight(self, name, None, (axis, self.out_axis), shape)
                    for (name, axis, _), shape in zip(self.parts, shapes)]
        # one draw from the params stream for all parts (none per part): the same random stream
        # as one Linear's, so the split changes no initial value
        whole = self.kernel_init(self.make_rng("params"), (sum(r for r, _ in shapes), self.features),
                                 dtype_of(self.runtime.param_dtype))
        kernels, start = [], 0
        for (name, axis, rows), shape in zip(self.parts, shapes):
            part = nn.with_logical_partitioning(lambda start=start, rows=rows: whole[start : start + rows], (axis, self.out_axis))
            kernels.append(self.variable("params", name, part).value)
            start += rows
        return kernels

    @nn.compact
    def __call__(self, x: Sequence[jax.Array]):
        if len(x) != len(self.parts):
            raise ValueError(f"{self.name}: {len(x)} input parts for {len(self.parts)} kernels")
        dtype, y = dtype_of(self.runtime.dtype), 0
        for part, kernel, (_, axis, _) in zip(x, self._kernels(), self.parts):
            kernel = narrow(gathered(kernel, (axis, self.out_axis)), 0, part.shape[-1], self.groups)
            y = y + jnp.dot(part.astype(dtype), kernel.astype(dtype))
        if self.use_bias:
            bias = gathered(weight(self, "bias", self.bias_init, (self.out_axis,), (self.features,)), (self.out_axis,))
            y = y + bias.astype(dtype)
        return y


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm over the last axis without affine params, computed in float32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the last axis with a learned scale, computed in float32."""

    axis_name: str
    runtime: RuntimeConfig
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones_init(), (self.axis_name,)),
            (x.shape[-1],),
            dtype_of(self.runtime.param_dtype),
        )
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (x32 * scale.astype(jnp.float32)).astype(x.dtype)


class Modulation(nn.Module):
    """AdaLN modulation: `num_chunks` vectors [B, D] from Linear(SiLU(temb [B, D])); with `used`,
    only the first `used` chunks are computed (static kernel slice)."""

    num_chunks: int
    runtime: RuntimeConfig
    collection: str = "params"
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, temb: jax.Array, used: int | None = None) -> list[jax.Array]:
        dim, used = temb.shape[-1], used or self.num_chunks
        linear = Linear(
            self.num_chunks * dim, ("embed", "modulation"), self.runtime,
            collection=self.collection, kernel_init=self.kernel_init, name="linear",
        )
        return jnp.split(linear(nn.silu(temb), out_size=used * dim), used, axis=-1)


def stacked_modulation(params: dict, temb: jax.Array, dtype) -> jax.Array:
    """`Modulation` for a stack of L layers at once: params {"linear": {"kernel" [L, D, kD],
    "bias" [L, kD]}} (as nn.scan stacks them), temb [B, D] -> [L, B, kD], chunks unsplit. A
    batched matmul over the layer axis reads each layer's kernel in place, where a block in the
    scan would copy its layer's slice of the stack first.

    Under a mesh the kernels stay split as they are stored: SiLU(temb) (a few KB) is split as the
    kernels' rows, each chip multiplies its rows and the partial products are summed into
    replicated modulations. Left to itself, XLA gathered every layer's whole kernel at once (two
    copies of 6.3 GiB a chip for Qwen-Image in bfloat16: its router training no longer fit a v5e
    chip)."""
    kernel, bias = (params["linear"][k].astype(dtype) for k in ("kernel", "bias"))
    act = constrain(nn.silu(temb).astype(dtype), (None, "embed"))
    out = jnp.matmul(jnp.broadcast_to(act, (kernel.shape[0], *act.shape)), kernel) + bias[:, None, :]
    return constrain(out, (None, None, None))


def modulations_ahead(model: nn.Module, stacks: dict[str, tuple[str, ...]], temb: jax.Array, dtype,
                      given: Sequence[dict] | None = None) -> list[dict] | None:
    """Per block stack {modulation name: [L, B, kD]}: the AdaLN modulations of every block, which
    read only temb, computed ahead of the block scan (`stacked_modulation`); the blocks take
    their layer's row instead of applying their `Modulation`. None at init (the blocks create
    their params). stacks: {stack name: the names of its blocks' Modulation submodules}.
    given: the same, computed by the caller for this temb (`edit_jax.models.block_modulations`,
    e.g. for every step of a sampling run at once): checked and returned.

    Args:
      model: the transformer (inside its call). stacks, given: above. temb: [B, D].
      dtype: the compute dtype.
    """
    if model.is_initializing():
        if given is not None:
            raise ValueError("block_modulations were given at init: the blocks create their params there")
        return None
    params = model.variables["params"]
    if given is not None:
        check_block_modulations(given, params, stacks, temb.shape)
        return list(given)
    return stack_modulations(params, stacks, temb, dtype)


def stack_modulations(params: dict, stacks: dict[str, tuple[str, ...]], temb: jax.Array, dtype) -> list[dict]:
    """`modulations_ahead` from the model's params: per stack {name: [L, B, kD]} for temb [B, D].

    Args:
      params: the model's params. stacks: {stack name: its Modulation submodules' names}.
      temb: [B, D]. dtype: the compute dtype.
    """
    return [{name: stacked_modulation(params[stack][name], temb, dtype) for name in names} for stack, names in stacks.items()]


def check_block_modulations(given: Sequence[dict], params: dict, stacks: dict[str, tuple[str, ...]], temb_shape) -> None:
    """Raises ValueError unless `given` holds one {name: [L, B, kD]} per block stack, as the
    model's params and this batch make them.

    Args:
      given: the caller's modulations. params: the model's params. stacks: as
        `modulations_ahead`'s. temb_shape: (B, D).
    """
    if len(given) != len(stacks):
        raise ValueError(f"block_modulations holds {len(given)} entries, expected one per block stack ({len(stacks)})")
    for i, (mods, (stack, names)) in enumerate(zip(given, stacks.items())):
        if not isinstance(mods, dict) or set(mods) != set(names):
            found = sorted(mods) if isinstance(mods, dict) else type(mods).__name__
            raise ValueError(f"block_modulations[{i}] ({stack}) holds {found}, expected {sorted(names)}")
        for name in names:
            layers, _, width = params[stack][name]["linear"]["kernel"].shape
            expected = (layers, temb_shape[0], width)
            if tuple(mods[name].shape) != expected:
                raise ValueError(f"block_modulations[{i}][{name!r}] has shape {tuple(mods[name].shape)}, expected "
                                 f"{list(expected)} (layers, batch, chunks x inner_dim): computed for another model or batch?")


def modulation_chunks(module: nn.Module, temb: jax.Array, given: jax.Array | None, num_chunks: int) -> list[jax.Array]:
    """The `num_chunks` modulation vectors [B, D]: split from `given` [B, kD] (computed ahead by
    `modulations_ahead`) or computed by `module` (a `Modulation`) from temb.

    Args:
      module: the block's `Modulation`. temb: [B, D]. given: [B, kD] or None.
      num_chunks: k.
    """
    return module(temb) if given is None else jnp.split(given, num_chunks, axis=-1)


def per_token(v: jax.Array) -> jax.Array:
    """A modulation vector [B, D] as [B, 1, D]; per-token ones [B, L, D] as they are."""
    return v[:, None, :] if v.ndim == 2 else v


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """x [B, L, D] * (1 + scale) + shift, shift and scale [B, D] or per token [B, L, D]."""
    return x * (1 + per_token(scale)) + per_token(shift)


def split_modulation(own: jax.Array, other: jax.Array, start: int, num_tokens: int) -> jax.Array:
    """Per token [B, L, D]: `own` [B, D] for tokens before `start`, `other` [B, D] from there on
    (an elementwise choice, which XLA can fuse into the op that reads it).

    Args:
      own, other: [B, D]. start: the first token of `other`. num_tokens: L.
    """
    later = (jnp.arange(num_tokens) >= start)[None, :, None]
    return jnp.where(later, other[:, None, :], own[:, None, :])


def gelu_tanh(x: jax.Array) -> jax.Array:
    """tanh-approximate GELU, 0.5 x (1 + tanh(z)), written as x * sigmoid(2 z): the same function,
    but XLA's CPU tanh is ~10x less accurate than its sigmoid."""
    z = math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)
    return x * jax.nn.sigmoid(2.0 * z)


def activation_fn(name: str):
    """MLP activations: tanh-GELU (diffusers) or x * sigmoid(1.702 x) (the E-DiT release)."""
    if name == "gelu_tanh":
        return gelu_tanh
    if name == "sigmoid_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    raise ValueError(f"unknown activation {name!r}")


def sow_hidden_magnitude(module: nn.Module, hidden: jax.Array) -> None:
    """Records mean |hidden| per channel ([M], over batch and tokens) in the "intermediates"
    collection when it is mutable (MLP channel ordering reads it); free otherwise."""
    if module.is_mutable_collection("intermediates"):
        module.sow("intermediates", "hidden_magnitude", jnp.mean(jnp.abs(hidden.astype(jnp.float32)), axis=(0, 1)))


class MLP(nn.Module):
    """fc2(act(fc1(x))): x [B, L, D] -> [B, L, D] through M hidden channels.

    `width` (static) keeps only the first `width` hidden channels: fc1 columns and fc2 rows, of
    channels stored in `groups` groups (`narrow`). `hidden_mask` [B, M or width] multiplies the
    hidden activations, in stored order (per-sample widths, and the straight-through width mask in
    training).
    """

    hidden_dim: int
    activation: str
    runtime: RuntimeConfig
    groups: int = 1

    @nn.compact
    def __call__(self, x, width: int | None = None, hidden_mask: jax.Array | None = None):
        dim = x.shape[-1]
        h = Linear(self.hidden_dim, ("embed", "mlp"), self.runtime, groups=self.groups, name="fc1")(x, out_size=width)
        h = constrain(activation_fn(self.activation)(h), HIDDEN)
        sow_hidden_magnitude(self, h)
        if hidden_mask is not None:
            h = h * hidden_mask[:, None, :].astype(h.dtype)
        fc2 = Linear(dim, ("mlp", "embed"), self.runtime, in_features=self.hidden_dim, groups=self.groups, name="fc2")
        return fc2(h)


def timestep_frequencies(dim: int = 256, max_period: float = 10000.0) -> np.ndarray:
    """The dim // 2 sinusoid frequencies exp(-ln(max_period) * j / (dim // 2)), float32.

    A constant: the exponent is rounded to float32 as diffusers does, the exp taken in float64
    and rounded once. Timesteps reach 1000, so one ulp of a frequency moves an angle by ~1e-5.
    """
    half = dim // 2
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
    return np.exp(exponent.astype(np.float64)).astype(np.float32)


def timestep_embedding(
    timesteps: jax.Array,
    dim: int = 256,
    max_period: float = 10000.0,
    scale: float = 1.0,
) -> jax.Array:
    """Sinusoidal embedding [B, dim] of timesteps [B], cos first (diffusers' flip_sin_to_cos=True,
    downscale_freq_shift=0), in float32.

    Args:
      timesteps: [B]. dim: the embedding's width. max_period: the lowest frequency's period.
      scale: multiplies the timesteps first.
    """
    freqs = timestep_frequencies(dim, max_period)
    args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
    args = scale * args
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepEmbedding(nn.Module):
    """linear_2(SiLU(linear_1(x))): diffusers' TimestepEmbedding and PixArtAlphaTextProjection."""

    dim: int
    in_axis: str
    runtime: RuntimeConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = Linear(self.dim, (self.in_axis, "embed"), self.runtime, name="linear_1")(x)
        return Linear(self.dim, ("embed_in", "embed"), self.runtime, name="linear_2")(nn.silu(x))


def rope_frequencies(
    positions: jax.Array, axes_dims: tuple[int, ...], theta: float = 10000.0
) -> tuple[jax.Array, jax.Array]:
    """cos, sin [L, K] for positions [L, n_axes]; axis i fills axes_dims[i] channels, each
    frequency repeated for its adjacent (real, imaginary) pair. Frequencies are float64
    constants rounded once; angles and their cos/sin are float32."""
    cos, sin = [], []
    for i, d in enumerate(axes_dims):
        omega = (1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)).astype(np.float32)
        angles = positions[:, i].astype(jnp.float32)[:, None] * omega[None, :]
        cos.append(jnp.repeat(jnp.cos(angles), 2, axis=-1))
        sin.append(jnp.repeat(jnp.sin(angles), 2, axis=-1))
    return jnp.concatenate(cos, axis=-1), jnp.concatenate(sin, axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array | None, sin: jax.Array | None) -> jax.Array:
    """Rotates adjacent channel pairs of x [B, L, H, K] by the angles in cos, sin [L, K]; x as it
    is where there are none (a model without positions, Hunyuan3D-2)."""
    if cos is None:
        return x
    x32 = x.astype(jnp.float32)
    pairs = x32.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    out = x32 * cos[None, :, None, :] + rotated * sin[None, :, None, :]
    return out.astype(x.dtype)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_mask: jax.Array | None = None,
    implementation: str = "xla",
) -> jax.Array:
    """Softmax attention over q, k, v [B, L, H, K] -> [B, L, H*K].

    key_mask [B, L] (True = attend) hides padded keys. implementation: "auto"
    (`edit_jax.config.resolve_attention` for q's dtype; "xla", with a warning, where the chosen
    kernel's own checks refuse these inputs), "xla", "cudnn" (GPU only,
    bfloat16/float16; where it cannot run it falls back to "xla" with a warning), "splash" (TPU,
    `splash_attention`) or "tokamax" (`tokamax_attention`).

    Args:
      q, k, v: [B, L, H, K]. key_mask, implementation: above.
    """
    if implementation == "auto":
        chosen = resolve_attention(implementation, q.dtype)
        if chosen == "xla":
            return attention(q, k, v, key_mask, "xla")
        try:  # the checks of cuDNN's kernels (version, shapes, layout) run as it is traced
            return attention(q, k, v, key_mask, chosen)
        except (NotImplementedError, ValueError, RuntimeError) as e:
            warnings.warn(f"attention='auto': {chosen} cannot run here ({str(e).strip()[:200]}): using 'xla'", stacklevel=2)
            return attention(q, k, v, key_mask, "xla")
    if implementation == "splash":
        return splash_attention(q, k, v, key_mask)
    if implementation == "tokamax":
        return tokamax_attention(q, k, v, key_mask)
    if implementation == "cudnn" and (jax.default_backend() != "gpu" or q.dtype not in (jnp.bfloat16, jnp.float16)):
        warnings.warn(f"attention='cudnn' needs a GPU and bfloat16/float16 (here: {jax.default_backend()}, "
                      f"{q.dtype}): using 'xla'", stacklevel=2)
        implementation = "xla"
    if key_mask is not None and implementation == "cudnn":
        # cuDNN would take a mask as a full [B, 1, L, L] bias, read by every head: as key lengths it
        # runs its padding-mask kernels instead
        return attention_by_key_lengths(q, k, v, key_mask, implementation)
    mask = None if key_mask is None else key_mask[:, None, None, :].astype(bool)
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
    return out.reshape(*out.shape[:2], -1)


def attention_by_key_lengths(q, k, v, key_mask, implementation: str) -> jax.Array:
    """`attention` with its key mask given as lengths: each row's keys and values reordered so that
    its valid keys come first (softmax attention does not depend on the keys' order), then only the
    first sum(key_mask) keys attended to. q, k, v [B, L, H, K], key_mask [B, L] -> [B, L, H*K].

    Args:
      q, k, v: [B, L, H, K]. key_mask: [B, L] bool. implementation: as `attention`'s.
    """
    order = jnp.argsort(jnp.logical_not(key_mask).astype(jnp.int32), axis=1, stable=True)[:, :, None, None]
    k, v = (jnp.take_along_axis(x, order, axis=1) for x in (k, v))
    lengths = jnp.sum(key_mask.astype(jnp.int32), axis=1)
    out = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation=implementation)
    return out.reshape(*out.shape[:2], -1)


def _heads_spec(shape) -> PartitionSpec | None:
    """The mesh axes of q [B, L, H, K] under the set mesh (None when no mesh is set): what a
    kernel that XLA cannot partition itself runs per shard of."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else logical_to_mesh(PartitionSpec(*HEADS), mesh, shape=shape)


def tokamax_attention(q, k, v, key_mask=None) -> jax.Array:
    """Softmax attention through tokamax (the `tokamax` extra), which picks its fastest kernel for
    the device: Pallas Mosaic flash attention on Hopper/Blackwell GPUs and TPUs, Pallas Triton on
    other GPUs, else XLA.
    q, k, v [B, L, H, K] -> [B, L, H*K]; key_mask [B, L] (True = attend) hides padded keys. Under a
    mesh (jax.set_mesh) the kernel runs per shard of the batch and head axes the rules give.

    Args:
      q, k, v: [B, L, H, K]. key_mask: [B, L] bool, or None.
    """
    import tokamax
    from absl import flags

    if not flags.FLAGS.is_parsed():  # tokamax reads its options from absl flags, else parsing sys.argv (ours)
        flags.FLAGS.mark_as_parsed()
    mask = None if key_mask is None else key_mask[:, None, None, :].astype(bool)
    spec = _heads_spec(q.shape)
    sharding = None if spec is None else NamedSharding(jax.sharding.get_abstract_mesh(), spec)
    out = tokamax.dot_product_attention(q, k, v, mask=mask, q_sharding=sharding)
    return out.reshape(*out.shape[:2], -1)


SPLASH_BLOCKS = (512, 256, 128)  # kernel tile sizes tried, largest first; one must divide L


def splash_attention(q, k, v, key_mask=None, interpret: bool | None = None) -> jax.Array:
    """Softmax attention through Pallas's TPU splash attention (a flash kernel: the [L, L] scores
    are never materialised): q, k, v [B, L, H, K] -> [B, L, H*K]. Padded keys (key_mask False) form
    a second segment that valid queries never see. Under a mesh (jax.set_mesh) the kernel runs per
    shard (shard_map over the batch and head axes the rules give); interpret: run the kernel as
    plain JAX (CPU tests; default: when the backend is not a TPU).

    Args:
      q, k, v: [B, L, H, K]. key_mask: [B, L] bool, or None. interpret: above.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernels
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    batch, length, heads, dim = q.shape
    block = next((b for b in SPLASH_BLOCKS if length % b == 0), None)
    if block is None:
        raise ValueError(f"splash attention needs a sequence length divisible by 128; got {length} tokens "
                         "(choose an image and text length that add up to a multiple of 128, or attention='xla')")
    interpret = jax.default_backend() != "tpu" if interpret is None else interpret
    sizes = kernels.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                               block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    mesh = jax.sharding.get_abstract_mesh()
    spec = PartitionSpec(None, None, None, None) if mesh.empty else _heads_spec(q.shape)
    head_axis = spec[2]
    local_heads = heads // (1 if head_axis is None else int(np.prod([mesh.shape[a] for a in np.atleast_1d(head_axis)])))
    kernel = kernels.make_splash_mha(masks.MultiHeadMask([masks.FullMask((length, length))] * local_heads),
                                     head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret)
    segments = jnp.zeros((batch, length), jnp.int32) if key_mask is None else (~key_mask.astype(bool)).astype(jnp.int32)

    def attend(q, k, v, segments):  # [b, L, h, K] per shard
        to_heads = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731 - [b, h, L, K], the kernel's layout
        ids = jax.vmap(lambda s: kernels.SegmentIds(q=s, kv=s))(segments)
        out = jax.vmap(kernel)(to_heads(q * (dim ** -0.5)).astype(q.dtype), to_heads(k), to_heads(v), segment_ids=ids)
        return jnp.swapaxes(out, 1, 2)

    if mesh.empty:
        out = attend(q, k, v, segments)
    else:
        out = jax.shard_map(attend, in_specs=(spec, spec, spec, PartitionSpec(spec[0], None)), out_specs=spec,
                            check_vma=False)(q, k, v, segments)
    return out.reshape(batch, length, heads * dim)


def check_values(name: str, x, valid, expected: str) -> None:
    """Raises ValueError naming `name` when x is concrete (not traced under jit, where values are
    unknown) and `valid(np.asarray(x))` is False.

    Args:
      name: what the error calls x. x: an array (or None: nothing checked). valid: a predicate
        on the numpy values. expected: what valid values are, for the error.
    """
    if x is None or isinstance(x, jax.core.Tracer):
        return
    if not bool(valid(np.asarray(x))):
        raise ValueError(f"{name} must be {expected}, got {np.asarray(x).ravel()[:8]}")


def check_timestep(timestep) -> None:
    """timestep is sigma in [0, 1] (the pipelines pass t / 1000), not diffusers' 0-1000 scale."""
    check_values("timestep", timestep, lambda t: np.all((t >= 0) & (t <= 1)),
                 "sigma in [0, 1] (divide diffusers' 0-1000 timesteps by 1000)")


def remat_policy(name: str):
    """Maps RuntimeConfig.remat to a jax.checkpoint policy (None: no remat)."""
    if name == "none":
        return None
    if name == "full":
        return jax.checkpoint_policies.nothing_saveable
    if name == "dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    raise ValueError(f"unknown remat policy {name!r}")


def split_heads(x: jax.Array, head_dim: int) -> jax.Array:
    """[B, L, H*K] -> [B, L, H, K]."""
    return x.reshape(*x.shape[:-1], -1, head_dim)


class JointAttention(nn.Module):
    """Dual-stream attention (FLUX double blocks, Qwen-Image blocks).

    Image and text tokens get their own q/k/v projections and QK RMSNorms, then attend jointly
    over the sequence [text, image] with RoPE; each stream gets its own output projection.
    img [B, N, D], txt [B, T, D], cos/sin [T + N, K], key_mask [B, T + N] or None.
    Returns (img_out [B, N, D], txt_out [B, T, D]).
    """

    num_heads: int
    head_dim: int
    runtime: RuntimeConfig
    eps: float = 1e-6

    @nn.compact
    def __call__(self, img, txt, cos, sin, key_mask=None):
        inner = self.num_heads * self.head_dim
        dim = img.shape[-1]

        def qkv(x, names, norm_names):
            q, k, v = (Linear(inner, ("embed", "heads"), self.runtime, name=n)(x) for n in names)
            q, k, v = (constrain(split_heads(t, self.head_dim), HEADS) for t in (q, k, v))
            q = RMSNorm("head_dim", self.runtime, self.eps, name=norm_names[0])(q)
            k = RMSNorm("head_dim", self.runtime, self.eps, name=norm_names[1])(k)
            return q, k, v

        iq, ik, iv = qkv(img, ("to_q", "to_k", "to_v"), ("norm_q", "norm_k"))
        tq, tk, tv = qkv(txt, ("add_q_proj", "add_k_proj", "add_v_proj"), ("norm_added_q", "norm_added_k"))
        q = apply_rope(jnp.concatenate([tq, iq], axis=1), cos, sin)
        k = apply_rope(jnp.concatenate([tk, ik], axis=1), cos, sin)
        v = jnp.concatenate([tv, iv], axis=1)
        out = attention(q, k, v, key_mask, self.runtime.attention)
        num_txt = txt.shape[1]
        img_out = Linear(dim, ("heads", "embed"), self.runtime, name="to_out")(out[:, num_txt:])
        txt_out = Linear(dim, ("heads", "embed"), self.runtime, name="to_add_out")(out[:, :num_txt])
        return img_out, txt_out


def scan_blocks(block_cls, length: int, runtime: RuntimeConfig, num_broadcast: int, lazy: bool = False):
    """Stacks `block_cls` `length` times under nn.scan: params (and routers) get a leading
    "layers" axis and the block compiles once. The block maps (carry, per_layer, *broadcast)
    -> (carry, per_layer_output): `per_layer` is scanned over its leading axis.

    lazy: the params and routers are not sliced per iteration but passed whole ([length, ...]);
    the block slices its layer where it uses it (`edit_jax.elastic.layer_view`), so a block that
    is skipped never reads its weights, and a call may scan any run of the layers (as many as its
    per-layer inputs hold). Apply only: init needs the sliced form.

    Args:
      block_cls: the block's module class. length: layers. runtime: the model's RuntimeConfig
        (its remat policy applies per block). num_broadcast: the block's arguments after
        (carry, per_layer) that every layer shares. lazy: above.
    """
    policy = remat_policy(runtime.remat)
    if policy is not None:
        block_cls = nn.remat(block_cls, policy=policy, prevent_cse=False)
    if lazy:
        return nn.scan(
            block_cls,
            variable_axes={"intermediates": 0},
            variable_broadcast=("params", "routers"),
            split_rngs={"params": False},
            in_axes=(0,) + (nn.broadcast,) * num_broadcast,
        )  # its length is its per-layer inputs' (the layer indices): it can run any slice of the stack
    return nn.scan(
        block_cls,
        variable_axes={"params": 0, "routers": 0, "intermediates": 0},
        split_rngs={"params": True},
        in_axes=(0,) + (nn.broadcast,) * num_broadcast,
        length=length,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
