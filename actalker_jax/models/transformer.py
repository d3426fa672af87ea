"""Spatio-temporal transformer of the SVD UNet (diffusers `TransformerSpatioTemporalModel`), with hooks.

Hooks let a model built on this UNet insert modules without copying the block code:
  - `post_spatial`: a module per transformer layer called between the spatial block and the temporal
    block (ACTalker's PCM layer). Its output replaces the hidden states, exactly where the official
    code calls `mamba_blocks[i]`, hence the attribute name (parameter paths = checkpoint keys).
  - `cross_attention_processor`: a module inside the spatial and the temporal `attn2` adding attention
    output before `to_out` (IP-adapter K/V sets), stored as `attn2.processor`.
Both receive the `conditions` pytree the UNet was called with.
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from actalker_jax.models.layers import (AlphaBlender, Attention, Dense, Dtype, FeedForward, GroupNorm,
                                        LayerNorm, TimestepEmbedding, timestep_embedding)
from actalker_jax.sharding import constrain

TOKEN_AXES = ("batch", "length", "embed")

TEMPORAL_CONTEXTS = ("first_frame", "frame_mean")


@dataclasses.dataclass(frozen=True)
class TransformerSite:
    """Where a transformer sits in the UNet; given to hook factories.

    block: "down" | "mid" | "up"; block_index / attention_index: position in `down_blocks[i].attentions[j]`;
    layer_index: transformer layer inside it; temporal: whether the hook is for the temporal block
    (only for `cross_attention_processor`).
    """

    block: str
    block_index: int
    attention_index: int
    layer_index: int
    channels: int
    num_heads: int
    head_dim: int
    cross_attention_dim: int
    temporal: bool
    dtype: Any
    param_dtype: Any


HookFactory = Callable[[TransformerSite, nnx.Rngs], nnx.Module | None]


@dataclasses.dataclass(frozen=True)
class TransformerHooks:
    """Factories for modules inserted into every TransformerSpatioTemporalModel (None at a site: no module)."""

    post_spatial: HookFactory | None = None
    cross_attention_processor: HookFactory | None = None

    def build(self, factory: HookFactory | None, site: TransformerSite, rngs: nnx.Rngs) -> nnx.Module | None:
        return factory(site, rngs) if factory is not None else None


@dataclasses.dataclass(frozen=True)
class SiteIndex:
    """block kind and indices of a transformer in the UNet (without its channel sizes)."""

    block: str = "down"
    block_index: int = 0
    attention_index: int = 0


def _init_attention_and_ff(block: nnx.Module, dim, num_heads, head_dim, cross_attention_dim, processor, rngs, dtype,
                           param_dtype) -> None:
    """norm1/attn1 (self), norm2/attn2 (cross, with the optional processor), norm3/ff: diffusers' block layout."""
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    block.norm1 = LayerNorm(dim, **kw)
    block.attn1 = Attention(dim, heads=num_heads, dim_head=head_dim, rngs=rngs, **kw)
    block.norm2 = LayerNorm(dim, **kw)
    block.attn2 = Attention(dim, heads=num_heads, dim_head=head_dim, cross_attention_dim=cross_attention_dim,
                            processor=processor, rngs=rngs, **kw)
    block.norm3 = LayerNorm(dim, **kw)
    block.ff = FeedForward(dim, rngs=rngs, **kw)


class BasicTransformerBlock(nnx.Module):
    """diffusers BasicTransformerBlock (layer norms, self-attn, cross-attn, GEGLU ff). x: (N, L, C)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, cross_attention_dim: int, *, rngs: nnx.Rngs,
                 processor: nnx.Module | None = None, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
        _init_attention_and_ff(self, dim, num_heads, head_dim, cross_attention_dim, processor, rngs, dtype,
                               param_dtype)

    def __call__(self, x: jax.Array, context: jax.Array, conditions=None, grid: tuple[int, int] | None = None
                 ) -> jax.Array:
        """grid: the (h, w) token grid of x's L tokens (for cross-attention processors)."""
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context, conditions, grid) + x
        return constrain(self.ff(self.norm3(x)) + x, TOKEN_AXES)


class TemporalBasicTransformerBlock(nnx.Module):
    """diffusers TemporalBasicTransformerBlock: attention over frames at each spatial position.

    x: (B, F, L, C) -> (B, F, L, C); context: (B, S, D), one context per clip.
    The cross-attention queries of all positions and frames of a clip attend to the same clip context,
    so they are computed as one (B, L*F) query sequence instead of broadcasting the context to B*L rows.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int, cross_attention_dim: int, *, rngs: nnx.Rngs,
                 processor: nnx.Module | None = None, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
        self.norm_in = LayerNorm(dim, dtype=dtype, param_dtype=param_dtype)
        self.ff_in = FeedForward(dim, dim_out=dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        _init_attention_and_ff(self, dim, num_heads, head_dim, cross_attention_dim, processor, rngs, dtype,
                               param_dtype)

    def __call__(self, x: jax.Array, context: jax.Array, conditions=None) -> jax.Array:
        batch, frames, length, channels = x.shape
        x = x.transpose(0, 2, 1, 3).reshape(batch * length, frames, channels)
        x = self.ff_in(self.norm_in(x)) + x
        x = self.attn1(self.norm1(x)) + x
        clip_tokens = x.reshape(batch, length * frames, channels)
        clip_tokens = self.attn2(self.norm2(clip_tokens), context, conditions) + clip_tokens
        x = clip_tokens.reshape(batch * length, frames, channels)
        x = self.ff(self.norm3(x)) + x
        return x.reshape(batch, length, frames, channels).transpose(0, 2, 1, 3)


class TransformerSpatioTemporalModel(nnx.Module):
    """diffusers TransformerSpatioTemporalModel. x: (B*F, H, W, C) -> (B*F, H, W, C).

    encoder_hidden_states: (B*F, S, D) (the UNet repeats the clip context per frame).
    `temporal_context`: "first_frame" (diffusers: the temporal cross-attention attends to frame 0's
    context) or "frame_mean" (ACTalker: the mean over the window's frames).
    """

    def __init__(self, num_heads: int, head_dim: int, in_channels: int, cross_attention_dim: int, *,
                 rngs: nnx.Rngs, num_layers: int = 1, site: SiteIndex = SiteIndex(),
                 hooks: TransformerHooks = TransformerHooks(), temporal_context: str = "first_frame",
                 norm_groups: int = 32, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
        if temporal_context not in TEMPORAL_CONTEXTS:
            raise ValueError(f"temporal_context must be one of {TEMPORAL_CONTEXTS}, got {temporal_context!r}")
        inner = num_heads * head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.temporal_context = temporal_context
        self.norm = GroupNorm(norm_groups, in_channels, epsilon=1e-6, **kw)
        self.proj_in = Dense(in_channels, inner, axes=("embed", "embed"), rngs=rngs, **kw)

        def make_site(layer, temporal):
            return TransformerSite(site.block, site.block_index, site.attention_index, layer, inner, num_heads,
                                   head_dim, cross_attention_dim, temporal, dtype, param_dtype)

        def processor(layer, temporal):
            return hooks.build(hooks.cross_attention_processor, make_site(layer, temporal), rngs)

        self.transformer_blocks = nnx.List([
            BasicTransformerBlock(inner, num_heads, head_dim, cross_attention_dim, processor=processor(i, False),
                                  rngs=rngs, **kw) for i in range(num_layers)])
        self.temporal_transformer_blocks = nnx.List([
            TemporalBasicTransformerBlock(inner, num_heads, head_dim, cross_attention_dim,
                                          processor=processor(i, True), rngs=rngs, **kw)
            for i in range(num_layers)])
        post_spatial = [hooks.build(hooks.post_spatial, make_site(i, False), rngs) for i in range(num_layers)]
        self.mamba_blocks = nnx.List(post_spatial) if any(m is not None for m in post_spatial) else None
        self.time_pos_embed = TimestepEmbedding(in_channels, in_channels * 4, out_dim=in_channels, rngs=rngs, **kw)
        self.time_mixer = AlphaBlender(0.5, param_dtype=param_dtype)
        self.proj_out = Dense(inner, in_channels, axes=("embed", "embed"), rngs=rngs, **kw)
        self.in_channels, self.dtype = in_channels, dtype

    def clip_context(self, encoder_hidden_states: jax.Array, num_frames: int) -> jax.Array:
        """(B*F, S, D) per-frame context -> (B, S, D) context of the temporal cross-attention."""
        per_clip = encoder_hidden_states.reshape((-1, num_frames) + encoder_hidden_states.shape[1:])
        if self.temporal_context == "first_frame":
            return per_clip[:, 0]
        return jnp.mean(per_clip.astype(jnp.float32), axis=1).astype(per_clip.dtype)

    def __call__(self, x: jax.Array, encoder_hidden_states: jax.Array, num_frames: int, conditions=None) -> jax.Array:
        bf, height, width, channels = x.shape
        batch = bf // num_frames
        residual = x
        time_context = self.clip_context(encoder_hidden_states, num_frames)
        h = self.proj_in(self.norm(x).reshape(bf, height * width, channels))
        h = constrain(h, TOKEN_AXES)
        frame_ids = jnp.tile(jnp.arange(num_frames), batch)
        frame_emb = self.time_pos_embed(timestep_embedding(frame_ids, channels).astype(self.dtype))[:, None, :]
        for i, (block, temporal_block) in enumerate(zip(self.transformer_blocks, self.temporal_transformer_blocks)):
            h = block(h, encoder_hidden_states, conditions, (height, width))
            if self.mamba_blocks is not None and self.mamba_blocks[i] is not None:
                h = self.mamba_blocks[i](h, encoder_hidden_states=encoder_hidden_states, conditions=conditions,
                                         num_frames=num_frames, grid=(height, width))
            h_mix = (h + frame_emb).reshape(batch, num_frames, height * width, -1)
            h_mix = temporal_block(h_mix, time_context, conditions).reshape(bf, height * width, -1)
            h = self.time_mixer(h, h_mix)
        out = self.proj_out(h).reshape(bf, height, width, channels)
        return out + residual
