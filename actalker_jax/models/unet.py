"""SVD spatio-temporal UNet (diffusers `UNetSpatioTemporalConditionModel`) in Flax NNX, channels-last.

    unet = UNetSpatioTemporalConditionModel(UNetConfig.svd_xt(), rngs=nnx.Rngs(0))
    out = unet(sample, timestep, encoder_hidden_states, added_time_ids)
      sample (B, F, H, W, C_in), timestep (B,) or scalar (SVD passes c_noise = ln(sigma) / 4),
      encoder_hidden_states (B, S, D_cross), added_time_ids (B, 3) -> (B, F, H, W, C_out)

Module attribute names mirror diffusers, so an NNX parameter path joined with "." is the diffusers
state-dict key (with `kernel`/`scale` for `weight`); see convert.py.
"""

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from actalker_jax.models.diffusers_config import DiffusersConfig
from actalker_jax.models import remat as remat_lib
from actalker_jax.models.layers import Conv, Dtype, GroupNorm, ParamKeys, TimestepEmbedding, timestep_embedding
from actalker_jax.models.resnet import Downsample2D, SpatioTemporalResBlock, Upsample2D
from actalker_jax.models.transformer import (TEMPORAL_CONTEXTS, SiteIndex, TransformerHooks,
                                             TransformerSpatioTemporalModel)
from actalker_jax.sharding import constrain

DOWN_BLOCK_TYPES = ("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal")
UP_BLOCK_TYPES = ("CrossAttnUpBlockSpatioTemporal", "UpBlockSpatioTemporal")


def _per_block(value, n: int, name: str) -> tuple:
    if isinstance(value, int):
        return (value,) * n
    value = tuple(value)
    if len(value) != n:
        raise ValueError(f"UNetConfig.{name} has {len(value)} entries, expected one per block ({n})")
    if not all(isinstance(v, int) for v in value):
        raise ValueError(f"UNetConfig.{name} must hold ints, got {value}")
    return value


@dataclasses.dataclass(frozen=True)
class UNetConfig(DiffusersConfig):
    """diffusers `UNetSpatioTemporalConditionModel` config keys, plus `temporal_context` and `norm_num_groups` (ours).

    `temporal_context`: "first_frame" (diffusers / SVD) or "frame_mean" (ACTalker's temporal cross-attention).
    `norm_num_groups`: groups of every GroupNorm (diffusers hard-codes 32). SVD's narrowest level has 320 channels,
    10 per group; a 32-wide level with 32 groups normalises each channel alone (an instance norm, which removes
    every channel's spatial mean, e.g. a clip's colours, at `conv_norm_out`), so small models may use fewer groups.
    """

    OWN_FIELDS = ("temporal_context", "norm_num_groups")

    sample_size: int | None = None
    in_channels: int = 8
    out_channels: int = 4
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlockSpatioTemporal",) * 3 + ("DownBlockSpatioTemporal",)
    up_block_types: tuple[str, ...] = ("UpBlockSpatioTemporal",) + ("CrossAttnUpBlockSpatioTemporal",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    addition_time_embed_dim: int = 256
    projection_class_embeddings_input_dim: int = 768
    layers_per_block: int | tuple[int, ...] = 2
    cross_attention_dim: int | tuple[int, ...] = 1024
    transformer_layers_per_block: int | tuple[int, ...] = 1
    num_attention_heads: int | tuple[int, ...] = (5, 10, 20, 20)
    num_frames: int = 25
    temporal_context: str = "first_frame"
    norm_num_groups: int = 32

    def __post_init__(self):
        for name in ("down_block_types", "up_block_types", "block_out_channels"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("layers_per_block", "cross_attention_dim", "transformer_layers_per_block", "num_attention_heads"):
            value = getattr(self, name)
            if not isinstance(value, int):
                object.__setattr__(self, name, tuple(value))
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"UNetConfig: {len(self.down_block_types)} down and {len(self.up_block_types)} up block "
                             f"types for {n} block_out_channels; they must be equal")
        for kind in self.down_block_types:
            if kind not in DOWN_BLOCK_TYPES:
                raise ValueError(f"UNetConfig.down_block_types: unknown block {kind!r}; known: {DOWN_BLOCK_TYPES}")
        for kind in self.up_block_types:
            if kind not in UP_BLOCK_TYPES:
                raise ValueError(f"UNetConfig.up_block_types: unknown block {kind!r}; known: {UP_BLOCK_TYPES}")
        groups = self.norm_num_groups
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"UNetConfig.norm_num_groups must be a positive int, got {groups!r}")
        for c in self.block_out_channels:
            if c % groups:
                raise ValueError(f"UNetConfig.block_out_channels: {c} is not a multiple of {groups} "
                                 f"(norm_num_groups, the GroupNorm groups)")
        if self.temporal_context not in TEMPORAL_CONTEXTS:
            raise ValueError(f"UNetConfig.temporal_context must be one of {TEMPORAL_CONTEXTS}, "
                             f"got {self.temporal_context!r}")
        heads = self.heads_per_block
        for c, h in zip(self.block_out_channels, heads):
            if c % h:
                raise ValueError(f"UNetConfig: {c} channels are not divisible by {h} attention heads")

    def to_diffusers(self) -> dict:
        """The diffusers constructor kwargs; diffusers' SVD UNet only has 32 GroupNorm groups."""
        if self.norm_num_groups != 32:
            raise ValueError(f"UNetConfig.norm_num_groups={self.norm_num_groups}: diffusers' "
                             f"UNetSpatioTemporalConditionModel hard-codes 32 groups")
        return super().to_diffusers()

    @property
    def heads_per_block(self) -> tuple[int, ...]:
        return _per_block(self.num_attention_heads, len(self.block_out_channels), "num_attention_heads")

    @property
    def cross_attention_dims(self) -> tuple[int, ...]:
        return _per_block(self.cross_attention_dim, len(self.block_out_channels), "cross_attention_dim")

    @property
    def layers_per_block_list(self) -> tuple[int, ...]:
        return _per_block(self.layers_per_block, len(self.block_out_channels), "layers_per_block")

    @property
    def transformer_layers(self) -> tuple[int, ...]:
        return _per_block(self.transformer_layers_per_block, len(self.block_out_channels),
                          "transformer_layers_per_block")

    @classmethod
    def svd_xt(cls, **overrides) -> "UNetConfig":
        """stabilityai/stable-video-diffusion-img2vid-xt(-1-1) `unet/config.json`."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides) -> "UNetConfig":
        """A two-level model for tests and the CPU demo (block widths 32 / 64)."""
        return cls(**{**dict(
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
            up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=24,
            layers_per_block=1, cross_attention_dim=32, num_attention_heads=(2, 4), num_frames=4), **overrides})


class _Blocks(nnx.Module):
    """Common constructor pieces of the four block types."""

    def _transformer(self, channels, heads, cross_dim, layers, site, hooks, temporal_context, norm_groups, rngs, kw):
        return TransformerSpatioTemporalModel(heads, channels // heads, channels, cross_dim, num_layers=layers,
                                              site=site, hooks=hooks, temporal_context=temporal_context,
                                              norm_groups=norm_groups, rngs=rngs, **kw)


class DownBlock(_Blocks):
    """CrossAttnDownBlockSpatioTemporal (with_attention) or DownBlockSpatioTemporal. x: (B*F, H, W, C)."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, *, num_layers: int,
                 with_attention: bool, add_downsample: bool, rngs: nnx.Rngs, heads: int = 1,
                 cross_attention_dim: int = 1024, transformer_layers: int = 1, block_index: int = 0,
                 hooks: TransformerHooks = TransformerHooks(), temporal_context: str = "first_frame",
                 norm_groups: int = 32, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        eps = 1e-6 if with_attention else 1e-5
        self.resnets = nnx.List([
            SpatioTemporalResBlock(in_channels if i == 0 else out_channels, out_channels,
                                   temb_channels=temb_channels, eps=eps, norm_groups=norm_groups, rngs=rngs, **kw)
            for i in range(num_layers)])
        self.attentions = nnx.List([
            self._transformer(out_channels, heads, cross_attention_dim, transformer_layers,
                              SiteIndex("down", block_index, i), hooks, temporal_context, norm_groups, rngs, kw)
            for i in range(num_layers)]) if with_attention else None
        self.downsamplers = (nnx.List([Downsample2D(out_channels, out_channels, rngs=rngs, **kw)])
                             if add_downsample else None)

    def __call__(self, x, temb, context, num_frames, conditions=None):
        """Returns (x, skips): the output and every intermediate state that feeds the up path."""
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb, num_frames)
            if self.attentions is not None:
                x = self.attentions[i](x, context, num_frames, conditions)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class MidBlock(_Blocks):
    """UNetMidBlockSpatioTemporal: resnet, transformer, resnet (eps 1e-5)."""

    def __init__(self, channels: int, temb_channels: int, *, heads: int, cross_attention_dim: int,
                 transformer_layers: int, rngs: nnx.Rngs, hooks: TransformerHooks = TransformerHooks(),
                 temporal_context: str = "first_frame", norm_groups: int = 32, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.resnets = nnx.List([SpatioTemporalResBlock(channels, channels, temb_channels=temb_channels, eps=1e-5,
                                                        norm_groups=norm_groups, rngs=rngs, **kw) for _ in range(2)])
        self.attentions = nnx.List([self._transformer(channels, heads, cross_attention_dim, transformer_layers,
                                                      SiteIndex("mid", 0, 0), hooks, temporal_context, norm_groups,
                                                      rngs, kw)])

    def __call__(self, x, temb, context, num_frames, conditions=None):
        x = self.resnets[0](x, temb, num_frames)
        x = self.attentions[0](x, context, num_frames, conditions)
        return self.resnets[1](x, temb, num_frames)


class UpBlock(_Blocks):
    """CrossAttnUpBlockSpatioTemporal (with_attention) or UpBlockSpatioTemporal (eps 1e-6)."""

    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int, temb_channels: int, *,
                 num_layers: int, with_attention: bool, add_upsample: bool, rngs: nnx.Rngs, heads: int = 1,
                 cross_attention_dim: int = 1024, transformer_layers: int = 1, block_index: int = 0,
                 hooks: TransformerHooks = TransformerHooks(), temporal_context: str = "first_frame",
                 norm_groups: int = 32, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        resnets = []
        for i in range(num_layers):
            skip_channels = in_channels if i == num_layers - 1 else out_channels
            resnet_in = prev_output_channel if i == 0 else out_channels
            resnets.append(SpatioTemporalResBlock(resnet_in + skip_channels, out_channels, temb_channels=temb_channels,
                                                  eps=1e-6, norm_groups=norm_groups, rngs=rngs, **kw))
        self.resnets = nnx.List(resnets)
        self.attentions = nnx.List([
            self._transformer(out_channels, heads, cross_attention_dim, transformer_layers,
                              SiteIndex("up", block_index, i), hooks, temporal_context, norm_groups, rngs, kw)
            for i in range(num_layers)]) if with_attention else None
        self.upsamplers = nnx.List([Upsample2D(out_channels, out_channels, rngs=rngs, **kw)]) if add_upsample else None

    def __call__(self, x, skips, temb, context, num_frames, conditions=None, upsample_size=None):
        """skips: the matching down-path states, consumed last-first; upsample_size: (H, W) after upsampling."""
        for i, resnet in enumerate(self.resnets):
            x = jnp.concatenate([x, skips[-1 - i]], axis=-1)
            x = resnet(x, temb, num_frames)
            if self.attentions is not None:
                x = self.attentions[i](x, context, num_frames, conditions)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


class UNetSpatioTemporalConditionModel(nnx.Module):
    """The SVD UNet. See the module docstring for the call signature.

    `hooks` insert extra modules into every spatio-temporal transformer (transformer.TransformerHooks).
    """

    def __init__(self, config: UNetConfig, *, rngs: nnx.Rngs, hooks: TransformerHooks = TransformerHooks(),
                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, remat: Mapping[str, str] | None = None):
        self.config, self.dtype = config, dtype
        rngs = ParamKeys(rngs)
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        channels = config.block_out_channels
        heads, cross = config.heads_per_block, config.cross_attention_dims
        layers, tlayers = config.layers_per_block_list, config.transformer_layers
        time_embed_dim = channels[0] * 4
        common = dict(hooks=hooks, temporal_context=config.temporal_context, norm_groups=config.norm_num_groups,
                      rngs=rngs, **kw)

        self.conv_in = Conv(config.in_channels, channels[0], (3, 3), rngs=rngs, **kw)
        self.time_embedding = TimestepEmbedding(channels[0], time_embed_dim, rngs=rngs, **kw)
        self.add_embedding = TimestepEmbedding(config.projection_class_embeddings_input_dim, time_embed_dim,
                                               rngs=rngs, **kw)
        down = []
        for i, kind in enumerate(config.down_block_types):
            down.append(DownBlock(channels[max(i - 1, 0)], channels[i], time_embed_dim, num_layers=layers[i],
                                  with_attention=kind.startswith("CrossAttn"),
                                  add_downsample=i < len(channels) - 1, heads=heads[i], cross_attention_dim=cross[i],
                                  transformer_layers=tlayers[i], block_index=i, **common))
        self.down_blocks = nnx.List(down)
        self.mid_block = MidBlock(channels[-1], time_embed_dim, heads=heads[-1], cross_attention_dim=cross[-1],
                                  transformer_layers=tlayers[-1], **common)
        rev_channels, rev_heads, rev_cross = channels[::-1], heads[::-1], cross[::-1]
        rev_layers, rev_tlayers = layers[::-1], tlayers[::-1]
        up = []
        for i, kind in enumerate(config.up_block_types):
            up.append(UpBlock(rev_channels[min(i + 1, len(channels) - 1)], rev_channels[max(i - 1, 0)],
                              rev_channels[i], time_embed_dim, num_layers=rev_layers[i] + 1,
                              with_attention=kind.startswith("CrossAttn"), add_upsample=i < len(channels) - 1,
                              heads=rev_heads[i], cross_attention_dim=rev_cross[i], transformer_layers=rev_tlayers[i],
                              block_index=i, **common))
        self.up_blocks = nnx.List(up)
        self.conv_norm_out = GroupNorm(config.norm_num_groups, channels[0], epsilon=1e-5, **kw)
        self.conv_out = Conv(channels[0], config.out_channels, (3, 3), rngs=rngs, **kw)
        self.remat = remat_lib.normalize(remat, self.block_names())

    def block_names(self) -> tuple[str, ...]:
        """Names of the blocks that can be rematerialised (models/remat.py)."""
        return (tuple(f"down_blocks.{i}" for i in range(len(self.down_blocks))) + ("mid_block",)
                + tuple(f"up_blocks.{i}" for i in range(len(self.up_blocks))))

    def __call__(self, sample: jax.Array, timestep: jax.Array | float, encoder_hidden_states: jax.Array,
                 added_time_ids: jax.Array, *, conv_in_residual: jax.Array | None = None,
                 conditions=None) -> jax.Array:
        """sample (B, F, H, W, C_in) -> (B, F, H, W, C_out).

        conv_in_residual: optional (B, F, H, W, C0) added to the conv_in output (ACTalker's pose guider).
        conditions: any pytree handed unchanged to the transformer hooks.
        """
        cfg = self.config
        if sample.ndim != 5 or sample.shape[-1] != cfg.in_channels:
            raise ValueError(f"sample must be (B, F, H, W, {cfg.in_channels}), got {sample.shape}")
        batch, frames, height, width, _ = sample.shape
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != batch:
            raise ValueError(f"encoder_hidden_states must be (B={batch}, S, D), got {encoder_hidden_states.shape}")
        if added_time_ids.shape[0] != batch:
            raise ValueError(f"added_time_ids must be (B={batch}, n), got {added_time_ids.shape}")
        timesteps = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32).reshape(-1), (batch,))

        emb = self.time_embedding(timestep_embedding(timesteps, cfg.block_out_channels[0]).astype(self.dtype))
        n_ids = added_time_ids.shape[1]
        time_ids = timestep_embedding(added_time_ids.reshape(-1), cfg.addition_time_embed_dim)
        emb = emb + self.add_embedding(time_ids.reshape(batch, n_ids * cfg.addition_time_embed_dim).astype(emb.dtype))
        emb = jnp.repeat(emb, frames, axis=0)
        context = jnp.repeat(encoder_hidden_states.astype(self.dtype), frames, axis=0)

        x = sample.reshape((batch * frames, height, width, cfg.in_channels))
        x = constrain(self.conv_in(x), ("batch", None, None, "embed"))
        if conv_in_residual is not None:
            x = x + conv_in_residual.reshape(x.shape).astype(x.dtype)

        def down(block, x, emb, context, conditions):
            return block(x, emb, context, frames, conditions)

        skips = [x]
        for i, block in enumerate(self.down_blocks):
            x, block_skips = remat_lib.call(self.remat, f"down_blocks.{i}", down, block, x, emb, context, conditions)
            skips.extend(block_skips)
        x = remat_lib.call(self.remat, "mid_block", down, self.mid_block, x, emb, context, conditions)
        for i, block in enumerate(self.up_blocks):
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            size = tuple(skips[-1].shape[1:3]) if block.upsamplers is not None else None
            x = remat_lib.call(self.remat, f"up_blocks.{i}", _up_block_fn(frames, size), block, x, block_skips, emb,
                               context, conditions)

        x = self.conv_out(jax.nn.silu(self.conv_norm_out(x)))
        return x.reshape((batch, frames) + x.shape[1:])


def _up_block_fn(frames: int, upsample_size: tuple[int, int] | None):
    """An up block's call with its static arguments bound (remat traces only the array arguments)."""

    def up(block, x, skips, emb, context, conditions):
        return block(x, skips, emb, context, frames, conditions, upsample_size=upsample_size)

    return up


def count_params(module: nnx.Module) -> int:
    """Number of parameters (works on `nnx.eval_shape` results: nothing is allocated)."""
    return sum(int(v.size) for v in jax.tree.leaves(nnx.state(module, nnx.Param)))
