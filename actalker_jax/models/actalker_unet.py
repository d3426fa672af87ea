"""The ACTalker UNet: the SVD UNet with PCM layers and IP-adapter K/V sets inserted through its hooks.

    unet = ACTalkerUNet(UNetConfig.svd_xt(temporal_context="frame_mean"), PCMConfig(), rngs=nnx.Rngs(0))
    eps = unet(sample (B, F, h, w, 8), timestep (B,), id_tokens (B, 1, Dc), audio_tokens (B, F, 32, Dc),
               motion_tokens (B, F, 1, Dc), added_time_ids (B, 3), *, pose_feature=None | (B, h, w, C0) |
               (B, F, h, w, C0), mask_audio (B, H, W), mask_motion (B, H, W)) -> (B, F, h, w, 4)

Tokens arrive already gated (the official UNet contract); masks are at image resolution, H = f*h for the
autoencoder's factor f (8 for the SVD VAE; the demo's pixel-unshuffle uses 4).
PCM layers sit in the 15 cross-attention down/up transformers (not in the mid block); IP-adapters in
all 32 attn2 layers (spatial and temporal, mid block included). ACTalker's temporal cross-attention
context is the frame mean (spec §2.4): use `temporal_context="frame_mean"` in the UNetConfig (the
presets of models/actalker.py do). Parameter paths are the official `unet-N.pth` keys.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from actalker_jax.models.ip_adapter import IP_MASKS, IPAdapterProcessor
from actalker_jax.models.layers import Dtype
from actalker_jax.models.pcm import CONDITION_PLACEMENTS, RESIDUALS, SCAN_OVER, PCMLayer
from actalker_jax.models.transformer import TransformerHooks, TransformerSite
from actalker_jax.models.unet import UNetConfig, UNetSpatioTemporalConditionModel


@dataclasses.dataclass(frozen=True)
class PCMConfig:
    """PCM and IP-adapter options; defaults are the released code's (spec §3, §2.4).

    residual "zero_init_residual" (ours) also starts the IP-adapter V projections at zero, so the whole
    ACTalker UNet equals the SVD UNet it was built from at step 0. enabled=False (ablation) builds no PCM
    layers: the audio and motion tokens then reach the UNet through the IP-adapter cross-attention only.
    """

    enabled: bool = True
    d_state: int = 16
    expand: int = 2
    scan_over: str = "frame"
    residual: str = "replace"
    condition_placement: str = "end"
    scan_impl: str = "auto"
    ip_scales: tuple[float, float] = (1.25, 1.25)
    ip_masks: str = "bicubic"

    def __post_init__(self):
        object.__setattr__(self, "ip_scales", tuple(self.ip_scales))
        if self.scan_over not in SCAN_OVER:
            raise ValueError(f"PCMConfig.scan_over must be one of {SCAN_OVER}, got {self.scan_over!r}")
        if self.residual not in RESIDUALS:
            raise ValueError(f"PCMConfig.residual must be one of {RESIDUALS}, got {self.residual!r}")
        if self.condition_placement not in CONDITION_PLACEMENTS:
            raise ValueError(f"PCMConfig.condition_placement must be one of {CONDITION_PLACEMENTS}, "
                             f"got {self.condition_placement!r}")
        if self.ip_masks not in IP_MASKS:
            raise ValueError(f"PCMConfig.ip_masks must be one of {IP_MASKS}, got {self.ip_masks!r}")
        if len(self.ip_scales) != 2:
            raise ValueError(f"PCMConfig.ip_scales needs (audio, motion) scales, got {self.ip_scales}")


def actalker_hooks(pcm: PCMConfig) -> TransformerHooks:
    """PCM after every spatial block of the down/up transformers; IP-adapters in every attn2."""

    def post_spatial(site: TransformerSite, rngs: nnx.Rngs):
        if site.block == "mid" or not pcm.enabled:
            return None
        return PCMLayer(site.channels, site.cross_attention_dim, rngs=rngs, d_state=pcm.d_state, expand=pcm.expand,
                        scan_over=pcm.scan_over, residual=pcm.residual,
                        condition_placement=pcm.condition_placement, scan_impl=pcm.scan_impl, dtype=site.dtype,
                        param_dtype=site.param_dtype)

    def processor(site: TransformerSite, rngs: nnx.Rngs):
        return IPAdapterProcessor(site.channels, site.cross_attention_dim, temporal=site.temporal, rngs=rngs,
                                  scales=pcm.ip_scales, masks=pcm.ip_masks, dtype=site.dtype,
                                  param_dtype=site.param_dtype)

    return TransformerHooks(post_spatial=post_spatial, cross_attention_processor=processor)


def _attention_layers(unet: UNetSpatioTemporalConditionModel):
    """Every TransformerSpatioTemporalModel of the UNet, in the official registration order (down, up, mid)."""
    for block in list(unet.down_blocks) + list(unet.up_blocks):
        for transformer in block.attentions or ():
            yield transformer
    yield from unet.mid_block.attentions


class ACTalkerUNet(UNetSpatioTemporalConditionModel):
    """SVD UNet + PCM + IP-adapters. See the module docstring for the call."""

    def __init__(self, config: UNetConfig, pcm: PCMConfig = PCMConfig(), *, rngs: nnx.Rngs,
                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, remat: Mapping[str, str] | None = None):
        super().__init__(config, rngs=rngs, hooks=actalker_hooks(pcm), dtype=dtype, param_dtype=param_dtype,
                         remat=remat)
        self.pcm_config = pcm
        self.init_ip_adapters()

    def init_ip_adapters(self) -> None:
        """Sets every IP-adapter K/V from its attn2's K/V (again after loading pretrained UNet weights)."""
        for attn in self._attn2_layers():
            attn.processor.init_from(attn, zero_values=self.pcm_config.residual == "zero_init_residual")

    def _attn2_layers(self):
        """Every attn2, in the official registration order: down, up, mid; spatial blocks before temporal."""
        for transformer in _attention_layers(self):
            for block in list(transformer.transformer_blocks) + list(transformer.temporal_transformer_blocks):
                yield block.attn2

    def ip_processors(self) -> list[IPAdapterProcessor]:
        """IP processors in the official `adapter_module-N.pth` order (its index i)."""
        return [attn.processor for attn in self._attn2_layers()]

    def __call__(self, sample: jax.Array, timestep: jax.Array, id_tokens: jax.Array, audio_tokens: jax.Array,
                 motion_tokens: jax.Array, added_time_ids: jax.Array, *, pose_feature: jax.Array | None = None,
                 mask_audio: jax.Array, mask_motion: jax.Array) -> jax.Array:
        batch, frames, height, width, _ = sample.shape
        for name, tokens in (("audio_tokens", audio_tokens), ("motion_tokens", motion_tokens)):
            if tokens.ndim != 4 or tokens.shape[:2] != (batch, frames):
                raise ValueError(f"{name} must be (B={batch}, F={frames}, n, Dc), got {tokens.shape}")
        for name, mask in (("mask_audio", mask_audio), ("mask_motion", mask_motion)):
            if (mask.ndim != 3 or mask.shape[0] != batch or mask.shape[1] % height or mask.shape[2] % width
                    or mask.shape[1] // height != mask.shape[2] // width):
                raise ValueError(f"{name} must be (B={batch}, H, W) at image resolution, an integer multiple of the "
                                 f"latent {(height, width)} (8x for the SVD VAE), got {mask.shape}")
        if pose_feature is not None:
            if pose_feature.ndim == 4:
                pose_feature = jnp.broadcast_to(pose_feature[:, None], (batch, frames) + pose_feature.shape[1:])
            if pose_feature.shape[:4] != (batch, frames, height, width):
                raise ValueError(f"pose_feature must be (B, h, w, C0) or (B, F, h, w, C0) at the latent size, "
                                 f"got {pose_feature.shape}")
        conditions: dict[str, Any] = dict(audio_tokens=audio_tokens.astype(self.dtype),
                                          motion_tokens=motion_tokens.astype(self.dtype),
                                          mask_audio=mask_audio.astype(jnp.float32),
                                          mask_motion=mask_motion.astype(jnp.float32))
        return super().__call__(sample, timestep, id_tokens, added_time_ids, conv_in_residual=pose_feature,
                                conditions=conditions)
