"""IP-adapter K/V sets in every cross-attention (ACTALKER_SPEC §2.4), as an `Attention.processor`.

Two extra key/value sets, j = 0 audio (32 tokens per frame), j = 1 motion (1 token per frame):

    spatial attn2:  out = Attn(q; ID) + sum_j scale_j * M_j ⊙ Attn(q; to_k_ip[j](c_j), to_v_ip[j](c_j))
    temporal attn2: out = Attn(q; ID) + sum_j scale_j * Attn(q; to_k_ip[j](mean_F c_j), to_v_ip[j](mean_F c_j))

M_j is region mask j on the token grid. masks="bicubic" (released): the mask resized with PyTorch's bicubic
kernel, soft values that may leave [0, 1] at box edges, exactly as the official processor multiplies them.
At a coarse grid they spill across the region's edge: on the demo's masks (32x32 frames, 8x8 and 16x16 grids)
the face-minus-mouth mask is 0.5-0.59 on tokens that are mostly mouth pixels in most clips and -0.09 to -0.2 on
the mouth's edge tokens, so the motion token reaches the mouth directly. masks="tokens" (ours): 1 on the tokens
the PCM branch of that region scans (`select_tokens`, bicubic value >= 1), 0 elsewhere: the same split of the grid
as the PCM layers'. The temporal attention never
receives masks and uses the tokens averaged over the window's frames; its queries of a whole clip are
one sequence (see TemporalBasicTransformerBlock), so the K/V projections run once per clip.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from actalker_jax.models.layers import Attention, Dense, Dtype
from actalker_jax.models.masks import bicubic_resize, select_tokens

TOKEN_KEYS = ("audio_tokens", "motion_tokens")
MASK_KEYS = ("mask_audio", "mask_motion")
IP_MASKS = ("bicubic", "tokens")


class IPAdapterProcessor(nnx.Module):
    """Official `IPAdapterAttnProcessor2_0` with two adapters; parameters `to_k_ip.{0,1}`, `to_v_ip.{0,1}`."""

    def __init__(self, inner_dim: int, cond_dim: int, *, temporal: bool, rngs: nnx.Rngs,
                 scales: tuple[float, ...] = (1.25, 1.25), masks: str = "bicubic", dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32):
        if masks not in IP_MASKS:
            raise ValueError(f"IP-adapter masks must be one of {IP_MASKS}, got {masks!r}")
        kw = dict(rngs=rngs, use_bias=False, axes=("embed", "heads"), dtype=dtype, param_dtype=param_dtype)
        self.temporal, self.scales, self.masks = temporal, tuple(scales), masks
        self.to_k_ip = nnx.List([Dense(cond_dim, inner_dim, **kw) for _ in TOKEN_KEYS])
        self.to_v_ip = nnx.List([Dense(cond_dim, inner_dim, **kw) for _ in TOKEN_KEYS])

    def init_from(self, attn: Attention, zero_values: bool = False) -> None:
        """Initialises every adapter's K/V with the layer's own to_k / to_v weights (as the official code).

        zero_values: V starts at zero instead, so the adapters add nothing at step 0 (used with the
        zero-init residual PCM, to leave a pretrained UNet unchanged at initialisation).
        """
        for to_k, to_v in zip(self.to_k_ip, self.to_v_ip):
            to_k.kernel.set_value(attn.to_k.kernel[...])
            value = attn.to_v.kernel[...]
            to_v.kernel.set_value(jnp.zeros_like(value) if zero_values else value)

    def token_weights(self, mask: jax.Array, grid: tuple[int, int]) -> jax.Array:
        """Image-resolution region mask (B, H, W) -> the weight of each token of `grid` (B, h, w) float32."""
        if self.masks == "tokens":
            return select_tokens(mask, grid).astype(jnp.float32).reshape(mask.shape[0], *grid)
        return bicubic_resize(mask, grid)

    def __call__(self, attn: Attention, q: jax.Array, conditions: dict, grid: tuple[int, int] | None = None
                 ) -> jax.Array:
        """q: (n, Lq, heads, dim_head) -> the adapters' sum, same shape.

        Spatial: n = B*F, Lq = h*w of `grid`. Temporal: n = B, Lq = h*w*F (one sequence per clip).
        """
        out = jnp.zeros(q.shape, jnp.float32)
        for j, (token_key, mask_key) in enumerate(zip(TOKEN_KEYS, MASK_KEYS)):
            tokens = conditions[token_key]  # (B, F, n_j, Dc)
            batch, frames = tokens.shape[:2]
            if self.temporal:
                context = jnp.mean(tokens.astype(jnp.float32), axis=1).astype(tokens.dtype)
            else:
                context = tokens.reshape((batch * frames,) + tokens.shape[2:])
            k = attn.split_heads(self.to_k_ip[j](context))
            v = attn.split_heads(self.to_v_ip[j](context))
            ip = attn.attend(q, k, v).astype(jnp.float32)
            if not self.temporal:
                if grid is None:
                    raise ValueError("the spatial IP-adapter processor needs the token grid (h, w)")
                mask = self.token_weights(conditions[mask_key], grid).reshape(batch, 1, grid[0] * grid[1])
                mask = jnp.broadcast_to(mask, (batch, frames, grid[0] * grid[1])).reshape(batch * frames, -1)
                ip = ip * mask.astype(q.dtype).astype(jnp.float32)[:, :, None, None]
            out = out + self.scales[j] * ip
        return out.astype(q.dtype)
