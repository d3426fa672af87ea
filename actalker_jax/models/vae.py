"""SVD temporal VAE (diffusers `AutoencoderKLTemporalDecoder`) in Flax NNX, channels-last.

    vae = AutoencoderKLTemporalDecoder(VAEConfig.svd(), rngs=nnx.Rngs(0))
    mean, logvar = vae.encode(images)              images (N, H, W, 3) -> each (N, H/8, W/8, 4)
    frames = vae.decode(z, num_frames=F)           z (N, h, w, 4), N = batch*F -> (N, 8h, 8w, 3)
    frames = decode_chunked(vae, z, F, 14)         the SVD pipeline's chunked `decode_latents`

The encoder is a per-image 2-D VAE encoder; the decoder mixes the frames of each clip (temporal
res-blocks and a final (3, 1, 1) convolution), so `decode` needs the clip length. Latents are
unscaled: multiply by `config.scaling_factor` for the UNet and divide by it before decoding.

Module attribute names mirror diffusers, so an NNX parameter path joined with "." is the diffusers
state-dict key (with `kernel`/`scale` for `weight`); see convert.py.
"""

import dataclasses
import numbers
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from actalker_jax.models.diffusers_config import DiffusersConfig
from actalker_jax.models.layers import Attention, Conv, Dtype, GroupNorm, ParamKeys
from actalker_jax.models.resnet import Downsample2D, ResnetBlock2D, SpatioTemporalResBlock, Upsample2D
from actalker_jax.sharding import constrain

DOWN_BLOCK_TYPES = ("DownEncoderBlock2D",)
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers DiagonalGaussianDistribution clamps the log-variance


@dataclasses.dataclass(frozen=True)
class VAEConfig(DiffusersConfig):
    """diffusers `AutoencoderKLTemporalDecoder` config keys (same defaults as diffusers).

    `sample_size` and `force_upcast` do not change the model; they are kept for round-trips, and
    `force_upcast` tells callers (as in diffusers pipelines) to run the VAE in float32.
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    sample_size: int = 32
    scaling_factor: float = 0.18215
    force_upcast: bool = True

    def __post_init__(self):
        object.__setattr__(self, "down_block_types", tuple(self.down_block_types))
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        if len(self.down_block_types) != len(self.block_out_channels):
            raise ValueError(f"VAEConfig: {len(self.down_block_types)} down_block_types for "
                             f"{len(self.block_out_channels)} block_out_channels; they must be equal")
        for kind in self.down_block_types:
            if kind not in DOWN_BLOCK_TYPES:
                raise ValueError(f"VAEConfig.down_block_types: unsupported block {kind!r}; "
                                 f"supported: {DOWN_BLOCK_TYPES}")
        for c in self.block_out_channels:
            if not isinstance(c, int) or c <= 0 or c % 32:
                raise ValueError(f"VAEConfig.block_out_channels: {c!r} is not a positive multiple of 32 "
                                 "(GroupNorm groups)")
        for name in ("in_channels", "out_channels", "layers_per_block", "latent_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"VAEConfig.{name} must be a positive int, got {value!r}")

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each side: 2 ** (number of blocks - 1)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def svd(cls) -> "VAEConfig":
        """The VAE of stabilityai/stable-video-diffusion-img2vid(-xt) (vae/config.json)."""
        return cls(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                   block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                   sample_size=768, scaling_factor=0.18215, force_upcast=True)

    @classmethod
    def tiny(cls) -> "VAEConfig":
        """A small random-init VAE for tests and CPU demos (downsample factor 2)."""
        return cls(down_block_types=("DownEncoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
                   latent_channels=4, sample_size=32)


def _check_frames(n: int, num_frames: int) -> None:
    if not isinstance(num_frames, numbers.Integral) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
    if n % num_frames:
        raise ValueError(f"{n} latent frames are not a whole number of clips of num_frames={num_frames}")


class DownEncoderBlock2D(nnx.Module):
    """diffusers DownEncoderBlock2D: ResnetBlock2D x num_layers, then a stride-2 conv (right/bottom padded).

    x: (N, H, W, C_in) -> (N, H // 2, W // 2, C_out) with downsampling, else (N, H, W, C_out).
    """

    def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, add_downsample: bool,
                 rngs: nnx.Rngs, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.resnets = nnx.List([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels=None, eps=1e-6, **kw)
            for i in range(num_layers)])
        self.downsamplers = (nnx.List([Downsample2D(out_channels, out_channels, padding=0, **kw)])
                             if add_downsample else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


def _spatial_attention(attn: Attention, x: jax.Array) -> jax.Array:
    """Self-attention over the H*W positions of each image: (N, H, W, C) -> (N, H, W, C)."""
    n, height, width, channels = x.shape
    return attn(x.reshape(n, height * width, channels)).reshape(n, height, width, channels)


def _vae_attention(channels: int, *, rngs: nnx.Rngs, dtype: Dtype, param_dtype: Dtype) -> Attention:
    """The single-head, group-normed, residual self-attention of both VAE mid-blocks."""
    return Attention(channels, heads=1, dim_head=channels, qkv_bias=True, norm_num_groups=32, norm_eps=1e-6,
                     residual_connection=True, rngs=rngs, dtype=dtype, param_dtype=param_dtype)


class UNetMidBlock2D(nnx.Module):
    """diffusers UNetMidBlock2D as used by the VAE encoder (no temb): resnet, (attention, resnet) x num_layers.

    x: (N, H, W, C) -> (N, H, W, C).
    """

    def __init__(self, in_channels: int, *, rngs: nnx.Rngs, num_layers: int = 1, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.attentions = nnx.List([_vae_attention(in_channels, **kw) for _ in range(num_layers)])
        self.resnets = nnx.List([ResnetBlock2D(in_channels, in_channels, temb_channels=None, eps=1e-6, **kw)
                                 for _ in range(num_layers + 1)])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(_spatial_attention(attn, x))
        return x


class Encoder(nnx.Module):
    """diffusers vae.Encoder with double_z: images (N, H, W, C_in) -> moments (N, h, w, 2 * latent_channels)."""

    def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        channels = config.block_out_channels
        self.conv_in = Conv(config.in_channels, channels[0], (3, 3), **kw)
        self.down_blocks = nnx.List([
            DownEncoderBlock2D(channels[max(i - 1, 0)], c, num_layers=config.layers_per_block,
                               add_downsample=i < len(channels) - 1, **kw)
            for i, c in enumerate(channels)])
        self.mid_block = UNetMidBlock2D(channels[-1], **kw)
        self.conv_norm_out = GroupNorm(32, channels[-1], epsilon=1e-6, dtype=dtype, param_dtype=param_dtype)
        self.conv_out = Conv(channels[-1], 2 * config.latent_channels, (3, 3), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


def _temporal_res_block(in_channels: int, out_channels: int, *, rngs: nnx.Rngs, dtype: Dtype,
                        param_dtype: Dtype) -> SpatioTemporalResBlock:
    """The decoder's SpatioTemporalResBlock: no temb, learned mix initialised at 0, mix switched."""
    return SpatioTemporalResBlock(in_channels, out_channels, temb_channels=None, eps=1e-6, temporal_eps=1e-5,
                                  merge_factor=0.0, switch_spatial_to_temporal_mix=True, rngs=rngs, dtype=dtype,
                                  param_dtype=param_dtype)


class MidBlockTemporalDecoder(nnx.Module):
    """diffusers MidBlockTemporalDecoder: spatio-temporal resnet, (attention, resnet) x (num_layers - 1).

    x: (B*F, H, W, C_in) -> (B*F, H, W, C_out). diffusers builds one attention whatever num_layers is.
    """

    def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, rngs: nnx.Rngs,
                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.attentions = nnx.List([_vae_attention(in_channels, **kw)])
        self.resnets = nnx.List([_temporal_res_block(in_channels if i == 0 else out_channels, out_channels, **kw)
                                 for i in range(num_layers)])

    def __call__(self, x: jax.Array, num_frames: int) -> jax.Array:
        x = self.resnets[0](x, None, num_frames)
        for resnet, attn in zip(self.resnets[1:], self.attentions):
            x = resnet(_spatial_attention(attn, x), None, num_frames)
        return x


class UpBlockTemporalDecoder(nnx.Module):
    """diffusers UpBlockTemporalDecoder: spatio-temporal resnets, then nearest x2 upsampling and a conv.

    x: (B*F, H, W, C_in) -> (B*F, 2H, 2W, C_out) (or (B*F, H, W, C_out) without upsampling).
    """

    def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, add_upsample: bool,
                 rngs: nnx.Rngs, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.resnets = nnx.List([_temporal_res_block(in_channels if i == 0 else out_channels, out_channels, **kw)
                                 for i in range(num_layers)])
        self.upsamplers = nnx.List([Upsample2D(out_channels, out_channels, **kw)]) if add_upsample else None

    def __call__(self, x: jax.Array, num_frames: int) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x, None, num_frames)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class TemporalDecoder(nnx.Module):
    """diffusers TemporalDecoder: latents (B*F, h, w, latent_channels) -> frames (B*F, H, W, out_channels)."""

    def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        channels = tuple(reversed(config.block_out_channels))
        self.conv_in = Conv(config.latent_channels, channels[0], (3, 3), **kw)
        self.mid_block = MidBlockTemporalDecoder(channels[0], channels[0], num_layers=config.layers_per_block, **kw)
        self.up_blocks = nnx.List([
            UpBlockTemporalDecoder(channels[max(i - 1, 0)], c, num_layers=config.layers_per_block + 1,
                                   add_upsample=i < len(channels) - 1, **kw)
            for i, c in enumerate(channels)])
        self.conv_norm_out = GroupNorm(32, channels[-1], epsilon=1e-6, dtype=dtype, param_dtype=param_dtype)
        self.conv_out = Conv(channels[-1], config.out_channels, (3, 3), **kw)
        self.time_conv_out = Conv(config.out_channels, config.out_channels, (3, 1, 1), **kw)

    def __call__(self, z: jax.Array, num_frames: int) -> jax.Array:
        _check_frames(z.shape[0], num_frames)
        x = self.conv_in(z)
        x = self.mid_block(x, num_frames)
        for block in self.up_blocks:
            x = block(x, num_frames)
        x = self.conv_out(jax.nn.silu(self.conv_norm_out(x)))
        n, height, width, channels = x.shape
        x = self.time_conv_out(x.reshape(n // num_frames, num_frames, height, width, channels))
        return x.reshape(n, height, width, channels)


class AutoencoderKLTemporalDecoder(nnx.Module):
    """diffusers AutoencoderKLTemporalDecoder (the SVD VAE): 2-D KL encoder, temporal decoder.

    encode: images (N, H, W, in_channels) in [-1, 1] -> (mean, logvar), each (N, H/f, W/f, latent_channels),
      f = config.downsample_factor; logvar clamped to [-30, 20] like diffusers' DiagonalGaussianDistribution.
    decode: z (B*F, h, w, latent_channels), num_frames=F (static) -> (B*F, h*f, w*f, out_channels);
      frames of one clip are consecutive. Equals diffusers' `decode(z, num_frames).sample` (the
      image_only_indicator is all zeros there).
    """

    def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32):
        rngs = ParamKeys(rngs)
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.config = config
        self.encoder = Encoder(config, **kw)
        self.decoder = TemporalDecoder(config, **kw)
        self.quant_conv = Conv(2 * config.latent_channels, 2 * config.latent_channels, (1, 1), **kw)

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """images (N, H, W, in_channels) -> (mean, logvar), each (N, h, w, latent_channels)."""
        if images.ndim != 4 or images.shape[-1] != self.config.in_channels:
            raise ValueError(f"encode expects images (N, H, W, {self.config.in_channels}), got shape {images.shape}")
        moments = self.quant_conv(self.encoder(constrain(images, ("batch", None, None, None))))
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z: jax.Array, num_frames: int) -> jax.Array:
        """z (B*F, h, w, latent_channels), num_frames=F -> frames (B*F, H, W, out_channels)."""
        if z.ndim != 4 or z.shape[-1] != self.config.latent_channels:
            raise ValueError(f"decode expects latents (N, h, w, {self.config.latent_channels}), got shape {z.shape}")
        return self.decoder(constrain(z, ("batch", None, None, None)), num_frames)

    def decode_chunked(self, z: jax.Array, num_frames: int, decode_chunk_size: int | None,
                       *, per_clip: bool = False) -> jax.Array:
        """`decode_chunked(self, ...)`; see there."""
        return decode_chunked(self, z, num_frames, decode_chunk_size, per_clip=per_clip)


def _map_chunks(fn: Callable[[jax.Array], jax.Array], x: jax.Array, axis: int, size: int) -> jax.Array:
    """Applies fn to consecutive chunks of x along `axis` (the last one may be shorter), concatenated.

    Equal-size chunks run one after another under `lax.map` (one trace, one chunk's memory at a time);
    a shorter remainder is one more call. fn keeps the chunk's extent along `axis`.
    """
    length = x.shape[axis]
    n_full, rest = divmod(length, size)
    outs = []
    if n_full == 1:
        outs.append(fn(jax.lax.slice_in_dim(x, 0, size, axis=axis)))
    elif n_full > 1:
        full = jax.lax.slice_in_dim(x, 0, n_full * size, axis=axis)
        full = jnp.moveaxis(full.reshape(x.shape[:axis] + (n_full, size) + x.shape[axis + 1:]), axis, 0)
        y = jnp.moveaxis(jax.lax.map(fn, full), 0, axis)
        outs.append(y.reshape(y.shape[:axis] + (n_full * size,) + y.shape[axis + 2:]))
    if rest:
        outs.append(fn(jax.lax.slice_in_dim(x, n_full * size, length, axis=axis)))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=axis)


def decode_chunked(vae: AutoencoderKLTemporalDecoder, z: jax.Array, num_frames: int,
                   decode_chunk_size: int | None, *, per_clip: bool = False) -> jax.Array:
    """Decodes (B*F, h, w, C) latents a chunk of frames at a time -> (B*F, H, W, out_channels).

    per_clip=False (default) is the SVD pipeline's `decode_latents` (without its 1/scaling_factor):
    the flat frame axis is cut into chunks of `decode_chunk_size` frames, the last one possibly
    shorter, and every chunk is decoded as ONE clip of its own length. So the output equals
    `concat_i vae.decode(z[i*c:(i+1)*c], num_frames=len(chunk_i))` and, because the decoder mixes
    frames (3-frame temporal convolutions, GroupNorm statistics over a clip's frames), it equals
    `vae.decode(z, num_frames)` only when every chunk is exactly one clip: decode_chunk_size ==
    num_frames, or a single clip (B == 1) and decode_chunk_size >= num_frames. A chunk shorter than
    a clip cuts its temporal context; with B > 1 a chunk may hold frames of two clips and decodes
    them as one clip, as the pipeline does.

    per_clip=True cuts each clip's frame axis instead (chunk j of every clip decoded together, each
    as its own clip): the same as the pipeline for B == 1, never mixes clips, and equals
    `vae.decode(z, num_frames)` whenever decode_chunk_size >= num_frames.

    decode_chunk_size=None decodes everything at once: `vae.decode(z, num_frames)`.
    Shapes are static; equal-size chunks run sequentially under `lax.map` (jit-friendly).
    """
    _check_frames(z.shape[0], num_frames)
    if decode_chunk_size is None:
        return vae.decode(z, num_frames)
    if not isinstance(decode_chunk_size, numbers.Integral) or decode_chunk_size < 1:
        raise ValueError(f"decode_chunk_size must be a positive int or None, got {decode_chunk_size!r}")
    decode_chunk_size = int(decode_chunk_size)
    if not per_clip:
        return _map_chunks(lambda zc: vae.decode(zc, zc.shape[0]), z, 0, decode_chunk_size)
    batch = z.shape[0] // num_frames
    z5 = z.reshape((batch, num_frames) + z.shape[1:])

    def decode_clip_chunk(zc: jax.Array) -> jax.Array:
        frames = vae.decode(zc.reshape((-1,) + zc.shape[2:]), zc.shape[1])
        return frames.reshape(zc.shape[:2] + frames.shape[1:])

    out = _map_chunks(decode_clip_chunk, z5, 1, decode_chunk_size)
    return out.reshape((-1,) + out.shape[2:])
