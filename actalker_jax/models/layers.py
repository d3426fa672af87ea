"""Primitive layers shared by the UNet and the VAE, channels-last, with logical axis names.

Parameter names follow PyTorch/diffusers (`kernel` <-> `weight`, `scale` <-> `weight` for norms,
`bias`) so that a module path joined by dots is the diffusers state-dict key (see convert.py).
Every module takes `dtype` (compute) and `param_dtype` (storage); normalisation statistics and
softmax are computed in float32 whatever the compute dtype.
"""

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from actalker_jax.sharding import LogicalAxes, constrain

Dtype = jnp.dtype | type


class ParamKeys:
    """Parameter keys derived from one base key by a Python counter: a drop-in for `rngs.params()`.

    Big models take thousands of keys. `nnx.Rngs` updates a counter Variable per key, which under
    `nnx.eval_shape` costs a slow tracer-sharding query each time (30 s for SVD-xt); model constructors
    wrap their `rngs` in ParamKeys once and pass it down instead.
    """

    def __init__(self, rngs: "nnx.Rngs | ParamKeys"):
        self._key = rngs.params()
        self._count = 0

    def params(self) -> jax.Array:
        self._count += 1
        return jax.random.fold_in(self._key, self._count)


def _torch_uniform(key, shape, fan_in, dtype):
    """PyTorch's default init for Linear/Conv weights and biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class Dense(nnx.Module):
    """y = x @ kernel + bias over the last axis. kernel (in, out), logical axes `axes`."""

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs, use_bias: bool = True,
                 axes: LogicalAxes = ("embed", "mlp"), dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32):
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype
        self.kernel = nnx.Param(_torch_uniform(rngs.params(), (in_features, out_features), in_features, param_dtype),
                                logical_axes=tuple(axes))
        self.bias = (nnx.Param(_torch_uniform(rngs.params(), (out_features,), in_features, param_dtype),
                               logical_axes=(axes[-1],)) if use_bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype), preferred_element_type=jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class Conv(nnx.Module):
    """N-d convolution, channels-last. kernel (*kernel_size, in, out) (HWIO / DHWIO).

    x: (batch, *spatial, in) -> (batch, *spatial', out). `padding` is per spatial dim, symmetric.
    """

    def __init__(self, in_features: int, out_features: int, kernel_size: Sequence[int], *, rngs: nnx.Rngs,
                 strides: Sequence[int] | None = None, padding: Sequence[int] | None = None,
                 use_bias: bool = True, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
        self.kernel_size = tuple(kernel_size)
        self.strides = tuple(strides or (1,) * len(self.kernel_size))
        self.padding = tuple(padding if padding is not None else (k // 2 for k in self.kernel_size))
        self.dtype = dtype
        fan_in = in_features * math.prod(self.kernel_size)
        axes = (None,) * len(self.kernel_size) + ("conv_in", "conv_out")
        self.kernel = nnx.Param(
            _torch_uniform(rngs.params(), self.kernel_size + (in_features, out_features), fan_in, param_dtype),
            logical_axes=axes)
        self.bias = (nnx.Param(_torch_uniform(rngs.params(), (out_features,), fan_in, param_dtype),
                               logical_axes=("conv_out",)) if use_bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        n = len(self.kernel_size)
        spatial = "DHW"[-n:] if n <= 3 else None
        if spatial is None:
            raise ValueError(f"Conv supports 1-3 spatial dims, got kernel_size {self.kernel_size}")
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), self.kernel[...].astype(self.dtype),
            window_strides=self.strides,
            padding=[(p, p) for p in self.padding],
            dimension_numbers=("N" + spatial + "C", spatial + "IO", "N" + spatial + "C"),
            preferred_element_type=jnp.float32,
        )
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class GroupNorm(nnx.Module):
    """torch.nn.GroupNorm on channels-last input: statistics over every axis but the first and the group.

    x: (n, ..., C). For per-frame norms pass (batch*frames, H, W, C); for the temporal blocks pass
    (batch, frames, H, W, C), which normalises across frames exactly as diffusers' 5-D GroupNorm does.
    """

    def __init__(self, num_groups: int, num_channels: int, *, epsilon: float, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32):
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels are not divisible into {num_groups} groups")
        self.num_groups, self.epsilon, self.dtype = num_groups, epsilon, dtype
        self.scale = nnx.Param(jnp.ones((num_channels,), param_dtype), logical_axes=(None,))
        self.bias = nnx.Param(jnp.zeros((num_channels,), param_dtype), logical_axes=(None,))

    def __call__(self, x: jax.Array) -> jax.Array:
        shape = x.shape
        xg = x.astype(jnp.float32).reshape(shape[:-1] + (self.num_groups, shape[-1] // self.num_groups))
        axes = tuple(range(1, xg.ndim - 2)) + (xg.ndim - 1,)
        mean = jnp.mean(xg, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True)
        y = ((xg - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(shape)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm over the last axis (statistics in float32)."""

    def __init__(self, num_features: int, *, epsilon: float = 1e-5, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32):
        self.epsilon, self.dtype = epsilon, dtype
        self.scale = nnx.Param(jnp.ones((num_features,), param_dtype), logical_axes=(None,))
        self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype), logical_axes=(None,))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool = True,
                       downscale_freq_shift: float = 0.0, max_period: float = 10000.0) -> jax.Array:
    """diffusers `get_timestep_embedding`: timesteps (n,) -> (n, dim) sinusoids, float32."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nnx.Module):
    """diffusers TimestepEmbedding: linear_1 -> SiLU -> linear_2."""

    def __init__(self, in_channels: int, time_embed_dim: int, *, rngs: nnx.Rngs, out_dim: int | None = None,
                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.linear_1 = Dense(in_channels, time_embed_dim, axes=("embed", "mlp"), **kw)
        self.linear_2 = Dense(time_embed_dim, out_dim or time_embed_dim, axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class GEGLU(nnx.Module):
    """diffusers GEGLU: proj to 2*inner, split [value, gate], value * gelu(gate) (exact erf GELU)."""

    def __init__(self, dim_in: int, dim_out: int, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32):
        self.proj = Dense(dim_in, dim_out * 2, axes=("embed", "mlp"), rngs=rngs, dtype=dtype,
                          param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        value, gate = jnp.split(self.proj(x), 2, axis=-1)
        return value * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
    """diffusers FeedForward with GEGLU: net = [GEGLU, Dropout(0), Linear] (indices as in diffusers)."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, dim_out: int | None = None, mult: int = 4,
                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
        inner = dim * mult
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.net = nnx.List([GEGLU(dim, inner, **kw), nnx.Dropout(0.0),
                             Dense(inner, dim_out or dim, axes=("mlp", "embed"), **kw)])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.net[0](x)
        x = constrain(x, ("batch",) + (None,) * (x.ndim - 2) + ("mlp",))
        return self.net[2](x)


_FLASH_DTYPES = (jnp.bfloat16, jnp.float16)
FORCE_XLA_ATTENTION = False  # set by flops.matmul_flops: count attention through its matmuls


def _cudnn_shapes_ok(q: jax.Array, k: jax.Array) -> bool:
    """Shapes cuDNN's flash attention takes in training too: even query / key lengths, head dim a multiple of 8
    up to 128. Its backward checks the lengths only when the gradient is built (jax 0.11.2 on an H100 raised
    "Unsupported sequence length Q 4096, KV 1" for SVD-xt's one-token cross-attention), after any try/except
    around the forward call, so unsupported shapes must not reach it."""
    length, keys, dim_head = q.shape[1], k.shape[1], q.shape[-1]
    return length % 2 == 0 and keys % 2 == 0 and dim_head % 8 == 0 and dim_head <= 128


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float) -> jax.Array:
    """softmax(q k^T scale) v on (batch, L, heads, dim_head) inputs -> (batch, L, heads, dim_head).

    On CUDA GPUs with bf16/fp16 inputs this is cuDNN's fused flash attention (no (L, S) score matrix in
    memory: the SVD-xt top level has L = S = 4096 tokens per frame); where cuDNN rejects the shapes or
    dtype, and on other backends, XLA's attention with a float32 softmax. `jax.nn.dot_product_attention`
    alone never picks cuDNN by itself (implementation=None means XLA).
    """
    flash = not FORCE_XLA_ATTENTION and jax.default_backend() == "gpu"
    if flash and q.dtype in _FLASH_DTYPES and q.dtype == k.dtype == v.dtype and _cudnn_shapes_ok(q, k):
        try:
            return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
        except (ValueError, NotImplementedError, RuntimeError):  # shapes / cuDNN version it does not support
            pass
    return jax.nn.dot_product_attention(q, k, v, scale=scale)


class Attention(nnx.Module):
    """diffusers `Attention` (SDPA processor): multi-head attention on token sequences.

    x: (batch, L, query_dim); context: (batch, S, cross_attention_dim) or None for self-attention.
    Optional `group_norm` before the projections and a residual connection (the VAE's mid-block
    attention). `processor`, if given, is an extension module called on the query heads that returns
    extra attention output of shape (batch, L, heads, dim_head) added before `to_out` (IP-adapter K/V
    sets): `processor(attn, q, conditions, grid)` with the `conditions` and token `grid` (h, w) passed
    to __call__.
    """

    def __init__(self, query_dim: int, *, heads: int, dim_head: int, rngs: nnx.Rngs,
                 cross_attention_dim: int | None = None, qkv_bias: bool = False,
                 norm_num_groups: int | None = None, norm_eps: float = 1e-5, residual_connection: bool = False,
                 processor: nnx.Module | None = None, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32):
        inner = heads * dim_head
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.heads, self.dim_head, self.dtype = heads, dim_head, dtype
        self.residual_connection = residual_connection
        self.group_norm = (GroupNorm(norm_num_groups, query_dim, epsilon=norm_eps, dtype=dtype,
                                     param_dtype=param_dtype) if norm_num_groups else None)
        kv_dim = cross_attention_dim or query_dim
        self.to_q = Dense(query_dim, inner, use_bias=qkv_bias, axes=("embed", "heads"), **kw)
        self.to_k = Dense(kv_dim, inner, use_bias=qkv_bias, axes=("embed", "heads"), **kw)
        self.to_v = Dense(kv_dim, inner, use_bias=qkv_bias, axes=("embed", "heads"), **kw)
        self.to_out = nnx.List([Dense(inner, query_dim, axes=("heads", "embed"), **kw)])
        self.processor = processor

    def split_heads(self, x: jax.Array) -> jax.Array:
        """(batch, L, heads*dim_head) -> (batch, L, heads, dim_head)."""
        return x.reshape(x.shape[:-1] + (self.heads, self.dim_head))

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        """Scaled dot-product attention on (batch, L, heads, dim_head) inputs (cuDNN flash on GPU)."""
        return dot_product_attention(q, k, v, scale=self.dim_head ** -0.5)

    def __call__(self, x: jax.Array, context: jax.Array | None = None, conditions=None,
                 grid: tuple[int, int] | None = None) -> jax.Array:
        residual = x
        if self.group_norm is not None:
            x = self.group_norm(x[:, :, None, :])[:, :, 0, :]
        context = x if context is None else context
        q = self.split_heads(self.to_q(x))
        out = self.attend(q, self.split_heads(self.to_k(context)), self.split_heads(self.to_v(context)))
        if self.processor is not None:
            out = out + self.processor(self, q, conditions, grid)
        out = constrain(out.reshape(out.shape[:2] + (-1,)), ("batch", "length", "heads"))
        out = self.to_out[0](out)
        return out + residual if self.residual_connection else out


class AlphaBlender(nnx.Module):
    """diffusers AlphaBlender with a learned `mix_factor` (image_only_indicator all zeros).

    `merge_strategy` "learned_with_images" (UNet) and "learned" both give alpha = sigmoid(mix_factor);
    `switch_spatial_to_temporal_mix` (temporal VAE decoder) uses 1 - alpha.
    out = alpha * x_spatial + (1 - alpha) * x_temporal.
    """

    def __init__(self, alpha: float, *, switch_spatial_to_temporal_mix: bool = False,
                 param_dtype: Dtype = jnp.float32):
        self.switch = switch_spatial_to_temporal_mix
        self.mix_factor = nnx.Param(jnp.full((1,), alpha, param_dtype), logical_axes=(None,))

    def __call__(self, x_spatial: jax.Array, x_temporal: jax.Array) -> jax.Array:
        alpha = jax.nn.sigmoid(self.mix_factor[...].astype(jnp.float32))
        if self.switch:
            alpha = 1.0 - alpha
        alpha = alpha.astype(x_spatial.dtype)
        return alpha * x_spatial + (1.0 - alpha) * x_temporal
