"""Parallel-Control Mamba (PCM) layer: two masked, bidirectional Mamba-1 branches (ACTALKER_SPEC §3).

One branch per control signal: audio -> mouth region, motion -> the rest of the face. For branch b:

    u_b   = in_proj_b(x)                                      (BF, L, D), D = 2C
    e     = SiLU(id_proj(id token)),  c_b = SiLU(cond_proj_b(condition tokens))
    seq_b = [u_b (region tokens); e; c_b]                      one sequence per frame ("frame")
    y_b   = SSM_fwd(seq_b) + SSM_rev(seq_b)                    Mamba-1 scan, two directions, own parameters
    u_b   <- y_b on the region tokens, u_b elsewhere           (the official scatter-back)
    out   = out_proj(LayerNorm(u_audio + u_motion))            (BF, L, C)

The official code gathers the region tokens with `nonzero()` (one index set per batch, batch 1). Here
the full sequence is scanned with a per-sample mask that makes non-region tokens transparent
(`selective_scan(mask=...)`): the same result, static shapes, any batch, per-sample masks.

Region selection: the image-resolution mask is resized to the token grid with PyTorch's bicubic
kernel and a token is kept iff int(value) != 0 (models/masks.py), exactly like the official code.

Options (defaults = the released code):
  scan_over "frame": one sequence per frame (released). "video": one sequence per clip over all frames
    of the window (the paper), built as [frame 0 tokens; e; c_0; frame 1 tokens; e; c_1; ...]: each
    frame's ID and condition tokens follow that frame's image tokens, so the forward direction carries
    frame f's conditions into frame f+1 onwards and the reverse direction into frame f and earlier.
  residual "replace": the output replaces the hidden states (released). "zero_init_residual": x + out
    with out_proj initialised to zero, so a pretrained UNet is unchanged at step 0.
  condition_placement "end": seq_b = [region tokens; e; c_b] (released): only the reverse scan carries e and c_b
    into the image tokens, reaching the region's last tokens (bottom right) first and its first tokens (top left)
    through every region token in between. "both_ends" (ours, a research variant, no new parameters):
    seq_b = [reversed(c_b); e; region tokens; e; c_b], so the forward scan also carries the conditions, from the
    region's first token on (`python -m actalker_jax.evaluate reach` measures the difference).

Parameter names and layouts are the official checkpoint's (spec §10): raw tensors `x_proj_weight`
(K, R+2N, D), `dt_projs_weight` (K, D, R), `dt_projs_bias` (K, D), `A_logs` (K*D, N), `Ds` (K*D,).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from actalker_jax.kernels.selective_scan import selective_scan
from actalker_jax.models.layers import Dense, Dtype, LayerNorm
from actalker_jax.models.masks import select_tokens

SCAN_OVER = ("frame", "video")
RESIDUALS = ("replace", "zero_init_residual")
CONDITION_PLACEMENTS = ("end", "both_ends")
DIRECTIONS = 2


class MaskSSM(nnx.Module):
    """One Mask-SSM unit (official `SS2D_Unit`): a forward and a reverse selective scan, summed.

    B and C are shared across the D channels of a direction. seq (n, T, D), mask (n, T) -> (n, T, D).
    """

    def __init__(self, d_inner: int, *, rngs: nnx.Rngs, d_state: int = 16, dt_rank: int | None = None,
                 dt_min: float = 1e-3, dt_max: float = 1e-1, dt_floor: float = 1e-4, scan_impl: str = "auto",
                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
        rank = dt_rank or math.ceil(d_inner / 32)
        self.d_inner, self.d_state, self.dt_rank = d_inner, d_state, rank
        self.scan_impl, self.dtype = scan_impl, dtype
        k = DIRECTIONS
        bound = 1.0 / math.sqrt(d_inner)
        self.x_proj_weight = nnx.Param(
            jax.random.uniform(rngs.params(), (k, rank + 2 * d_state, d_inner), param_dtype, -bound, bound),
            logical_axes=(None, None, "mlp"))
        dt_std = rank ** -0.5
        self.dt_projs_weight = nnx.Param(
            jax.random.uniform(rngs.params(), (k, d_inner, rank), param_dtype, -dt_std, dt_std),
            logical_axes=(None, "mlp", None))
        dt = jnp.exp(jax.random.uniform(rngs.params(), (k, d_inner), jnp.float32,
                                        math.log(dt_min), math.log(dt_max)))
        dt = jnp.maximum(dt, dt_floor)
        self.dt_projs_bias = nnx.Param((dt + jnp.log(-jnp.expm1(-dt))).astype(param_dtype),
                                       logical_axes=(None, "mlp"))
        a_log = np.log(np.tile(np.arange(1, d_state + 1, dtype=np.float32), (k * d_inner, 1)))
        self.A_logs = nnx.Param(jnp.asarray(a_log, param_dtype), logical_axes=("mlp", "state"))
        self.Ds = nnx.Param(jnp.ones((k * d_inner,), param_dtype), logical_axes=("mlp",))

    def __call__(self, seq: jax.Array, mask: jax.Array) -> jax.Array:
        d, n, r = self.d_inner, self.d_state, self.dt_rank
        seq = seq.astype(self.dtype)
        out = None
        for k in range(DIRECTIONS):
            projected = jnp.einsum("ntd,cd->ntc", seq, self.x_proj_weight[k].astype(self.dtype),
                                   preferred_element_type=jnp.float32)
            dt_low, b, c = projected[..., :r], projected[..., r:r + n], projected[..., r + n:]
            delta = jnp.einsum("ntr,dr->ntd", dt_low.astype(self.dtype), self.dt_projs_weight[k].astype(self.dtype))
            y = selective_scan(
                seq, delta, -jnp.exp(self.A_logs[k * d:(k + 1) * d].astype(jnp.float32)), b.astype(self.dtype),
                c.astype(self.dtype), D=self.Ds[k * d:(k + 1) * d].astype(jnp.float32),
                delta_bias=self.dt_projs_bias[k].astype(jnp.float32), delta_softplus=True, mask=mask,
                reverse=k == 1, impl=self.scan_impl)
            out = y if out is None else out + y
        return out


class PCMLayer(nnx.Module):
    """Official `SS2D_cond_v10`. x (B*F, L, C) -> (B*F, L, C); see the module docstring.

    Call with the per-frame ID token (B*F, 1, Dc), the conditions dict of the ACTalker UNet
    (`audio_tokens` (B, F, Na, Dc), `motion_tokens` (B, F, Nm, Dc), `mask_audio` / `mask_motion`
    (B, H, W) at image resolution), the number of frames and the token grid (h, w) of this level.
    """

    def __init__(self, channels: int, cond_dim: int, *, rngs: nnx.Rngs, d_state: int = 16, expand: int = 2,
                 scan_over: str = "frame", residual: str = "replace", condition_placement: str = "end",
                 scan_impl: str = "auto", dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
        if scan_over not in SCAN_OVER:
            raise ValueError(f"scan_over must be one of {SCAN_OVER}, got {scan_over!r}")
        if residual not in RESIDUALS:
            raise ValueError(f"pcm residual must be one of {RESIDUALS}, got {residual!r}")
        if condition_placement not in CONDITION_PLACEMENTS:
            raise ValueError(f"pcm condition_placement must be one of {CONDITION_PLACEMENTS}, "
                             f"got {condition_placement!r}")
        d = expand * channels
        kw = dict(rngs=rngs, use_bias=False, dtype=dtype, param_dtype=param_dtype)
        self.scan_over, self.residual, self.dtype = scan_over, residual, dtype
        self.condition_placement = condition_placement
        self.in_proj1 = Dense(channels, d, axes=("embed", "mlp"), **kw)
        self.in_proj2 = Dense(channels, d, axes=("embed", "mlp"), **kw)
        self.id_proj = Dense(cond_dim, d, axes=("embed", "mlp"), **kw)
        self.audio_proj = Dense(cond_dim, d, axes=("embed", "mlp"), **kw)
        self.exp_proj = Dense(cond_dim, d, axes=("embed", "mlp"), **kw)
        unit_kw = dict(rngs=rngs, d_state=d_state, dt_rank=math.ceil(channels / 16), scan_impl=scan_impl, dtype=dtype,
                       param_dtype=param_dtype)
        self.audio_unit = MaskSSM(d, **unit_kw)
        self.exp_unit = MaskSSM(d, **unit_kw)
        self.out_norm = LayerNorm(d, dtype=dtype, param_dtype=param_dtype)
        self.out_proj = Dense(d, channels, axes=("mlp", "embed"), **kw)
        if residual == "zero_init_residual":
            self.out_proj.kernel.set_value(jnp.zeros((d, channels), param_dtype))

    def _branch(self, u, id_token, cond, keep, unit, num_frames):
        """u (BF, L, D), id_token (BF, 1, D), cond (BF, n, D), keep (BF, L) -> u with the region rescanned."""
        bf, length, d = u.shape
        tail = jnp.concatenate([id_token.astype(u.dtype), cond.astype(u.dtype)], axis=1)  # [e; c]
        head = tail[:, ::-1] if self.condition_placement == "both_ends" else tail[:, :0]  # [reversed(c); e] or none
        seq = jnp.concatenate([head, u, tail], axis=1)
        mask = jnp.concatenate([jnp.ones(head.shape[:2], jnp.bool_), keep, jnp.ones(tail.shape[:2], jnp.bool_)],
                               axis=1)
        start = head.shape[1]
        if self.scan_over == "video":
            steps = seq.shape[1]
            y = unit(seq.reshape(bf // num_frames, num_frames * steps, d),
                     mask.reshape(bf // num_frames, num_frames * steps)).reshape(bf, steps, d)
        else:
            y = unit(seq, mask)
        return jnp.where(keep[..., None], y[:, start:start + length].astype(u.dtype), u)

    def __call__(self, x: jax.Array, *, encoder_hidden_states: jax.Array, conditions: dict, num_frames: int,
                 grid: tuple[int, int]) -> jax.Array:
        bf = x.shape[0]
        audio = conditions["audio_tokens"].reshape((bf,) + conditions["audio_tokens"].shape[2:])
        motion = conditions["motion_tokens"].reshape((bf,) + conditions["motion_tokens"].shape[2:])
        keep_audio = jnp.repeat(select_tokens(conditions["mask_audio"], grid), num_frames, axis=0)
        keep_motion = jnp.repeat(select_tokens(conditions["mask_motion"], grid), num_frames, axis=0)
        e = jax.nn.silu(self.id_proj(encoder_hidden_states))
        u_audio = self._branch(self.in_proj1(x), e, jax.nn.silu(self.audio_proj(audio)), keep_audio,
                               self.audio_unit, num_frames)
        u_motion = self._branch(self.in_proj2(x), e, jax.nn.silu(self.exp_proj(motion)), keep_motion,
                                self.exp_unit, num_frames)
        out = self.out_proj(self.out_norm(u_audio + u_motion))
        return x + out if self.residual == "zero_init_residual" else out


def pcm_param_count(channels: int, cond_dim: int = 1024, d_state: int = 16) -> int:
    """Spec §9: P(C) = 3*Dc*2C + 2*C*2C + 2C*C + 2*2C + 2*U(C), U = K(R+2N)D + KDR + KD + KDN + KD."""
    d, r, k = 2 * channels, math.ceil(channels / 16), DIRECTIONS
    unit = k * (r + 2 * d_state) * d + k * d * r + k * d + k * d * d_state + k * d
    return 3 * cond_dim * d + 2 * channels * d + d * channels + 2 * d + 2 * unit
