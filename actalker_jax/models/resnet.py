"""Residual blocks and resamplers of the SVD UNet and temporal VAE (diffusers `resnet.py`), channels-last."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from actalker_jax.models.layers import AlphaBlender, Conv, Dense, Dtype, GroupNorm
from actalker_jax.sharding import constrain

FRAME_AXES = ("batch", None, None, "embed")  # (batch*frames, H, W, C)


class _ResnetBlock(nnx.Module):
    """norm1 -> SiLU -> conv1 (+ projected time embedding) -> norm2 -> SiLU -> conv2, plus a shortcut.

    x: (n, *spatial, C_in) -> (n, *spatial, C_out); temb: (n, [F,] temb_channels) broadcast over the
    remaining axes of x, or None.
    """

    KERNEL: tuple[int, ...] = ()

    def __init__(self, in_channels: int, out_channels: int, *, temb_channels: int | None, eps: float,
                 rngs: nnx.Rngs, norm_groups: int = 32, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        nkw = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm1 = GroupNorm(norm_groups, in_channels, epsilon=eps, **nkw)
        self.conv1 = Conv(in_channels, out_channels, self.KERNEL, **kw)
        self.time_emb_proj = (Dense(temb_channels, out_channels, axes=("mlp", "conv_out"), **kw)
                              if temb_channels is not None else None)
        self.norm2 = GroupNorm(norm_groups, out_channels, epsilon=eps, **nkw)
        self.conv2 = Conv(out_channels, out_channels, self.KERNEL, **kw)
        self.conv_shortcut = (Conv(in_channels, out_channels, (1,) * len(self.KERNEL), **kw)
                              if in_channels != out_channels else None)

    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        if self.time_emb_proj is not None and temb is not None:
            t = self.time_emb_proj(jax.nn.silu(temb))
            h = h + t.reshape(t.shape[:-1] + (1,) * (h.ndim - t.ndim) + t.shape[-1:])
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class ResnetBlock2D(_ResnetBlock):
    """diffusers ResnetBlock2D (default time-embedding norm, `norm_groups` GroupNorm groups: 32).

    x: (N, H, W, C), temb: (N, T).
    """

    KERNEL = (3, 3)

    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        return constrain(super().__call__(x, temb), FRAME_AXES)


class TemporalResnetBlock(_ResnetBlock):
    """diffusers TemporalResnetBlock: (3, 1, 1) convs over frames. x: (B, F, H, W, C), temb: (B, F, T)."""

    KERNEL = (3, 1, 1)


class SpatioTemporalResBlock(nnx.Module):
    """diffusers SpatioTemporalResBlock: spatial ResnetBlock2D, temporal ResnetBlock, AlphaBlender.

    x: (B*F, H, W, C_in), temb: (B*F, temb_channels) or None -> (B*F, H, W, C_out).
    """

    def __init__(self, in_channels: int, out_channels: int, *, temb_channels: int | None, eps: float,
                 rngs: nnx.Rngs, temporal_eps: float | None = None, merge_factor: float = 0.5,
                 switch_spatial_to_temporal_mix: bool = False, norm_groups: int = 32, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32):
        kw = dict(rngs=rngs, norm_groups=norm_groups, dtype=dtype, param_dtype=param_dtype)
        self.spatial_res_block = ResnetBlock2D(in_channels, out_channels, temb_channels=temb_channels, eps=eps, **kw)
        self.temporal_res_block = TemporalResnetBlock(
            out_channels, out_channels, temb_channels=temb_channels,
            eps=temporal_eps if temporal_eps is not None else eps, **kw)
        self.time_mixer = AlphaBlender(merge_factor, switch_spatial_to_temporal_mix=switch_spatial_to_temporal_mix,
                                       param_dtype=param_dtype)

    def __call__(self, x: jax.Array, temb: jax.Array | None, num_frames: int) -> jax.Array:
        h = self.spatial_res_block(x, temb)
        bf, height, width, channels = h.shape
        h5 = h.reshape(bf // num_frames, num_frames, height, width, channels)
        temb5 = temb.reshape(bf // num_frames, num_frames, -1) if temb is not None else None
        mixed = self.time_mixer(h5, self.temporal_res_block(h5, temb5))
        return mixed.reshape(bf, height, width, channels)


class Downsample2D(nnx.Module):
    """Stride-2 3x3 convolution (diffusers Downsample2D with use_conv=True).

    padding 1: symmetric (UNet); padding 0: pad right/bottom by one first (the VAE encoder).
    """

    def __init__(self, channels: int, out_channels: int, *, rngs: nnx.Rngs, padding: int = 1,
                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
        self.pad_right = padding == 0
        self.conv = Conv(channels, out_channels, (3, 3), strides=(2, 2), padding=(padding, padding), rngs=rngs,
                         dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.pad_right:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x)


def nearest_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """torch `F.interpolate(mode="nearest")` on (N, H, W, C): source index floor(dst * in / out)."""
    _, height, width, _ = x.shape
    rows = (np.arange(size[0]) * height) // size[0]
    cols = (np.arange(size[1]) * width) // size[1]
    return x[:, rows][:, :, cols]


class Upsample2D(nnx.Module):
    """Nearest-neighbour upsampling (x2, or to an explicit size) then a 3x3 conv (diffusers Upsample2D)."""

    def __init__(self, channels: int, out_channels: int, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32):
        self.conv = Conv(channels, out_channels, (3, 3), rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
        size = size or (2 * x.shape[1], 2 * x.shape[2])
        return self.conv(nearest_resize(x, size))
