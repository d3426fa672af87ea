"""Condition encoders of ACTalker (spec §4): audio, identity and motion projections, and the pose guider.

Parameter paths are the official checkpoint keys (spec §10, `audio_linear-N.pth`, `id_proj_model-N.pth`,
`vasa_linear-N.pth`, `pose_guider-N.pth`) under the converter's rule (`kernel`/`scale` for `weight`),
so `convert.build_from_state_dict` loads those state dicts directly. Inits are PyTorch's defaults
(U(±1/√fan_in) for Linear/Conv, ones/zeros for LayerNorm) except `PoseGuider.conv_out`, which is zero.
Input widths are arguments: our data uses a 128-d dlib identity embedding and a configurable motion
descriptor instead of the official 512-d ArcFace / VASA features.
"""

import numbers
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from actalker_jax.models.layers import Conv, Dense, Dtype, LayerNorm


def _check_last(name: str, x: jax.Array, expected: tuple[int, ...], what: str) -> None:
    n = len(expected)
    if x.ndim < n or tuple(x.shape[x.ndim - n:]) != expected:
        raise ValueError(f"{name}: {what} must end with dims {expected}, got shape {tuple(x.shape)}")


def _check_positive(name: str, **sizes: int) -> None:
    for key, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
            raise ValueError(f"{name}: {key} must be a positive int, got {value!r}")


class AudioProjModel(nnx.Module):
    """Whisper window -> audio context tokens (official `AudioProjModel`).

    (..., seq_len, blocks, channels) -> flatten -> proj1, ReLU -> proj2, ReLU -> proj3
    -> (..., context_tokens, output_dim) -> LayerNorm(output_dim). Official: (10, 5, 384) -> (32, 1024).
    """

    def __init__(self, seq_len: int = 10, blocks: int = 5, channels: int = 384, intermediate_dim: int = 1024,
                 output_dim: int = 1024, context_tokens: int = 32, *, rngs: nnx.Rngs,
                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
        _check_positive("AudioProjModel", seq_len=seq_len, blocks=blocks, channels=channels,
                        intermediate_dim=intermediate_dim, output_dim=output_dim, context_tokens=context_tokens)
        self.window_shape = (seq_len, blocks, channels)
        self.context_tokens, self.output_dim = context_tokens, output_dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.proj1 = Dense(seq_len * blocks * channels, intermediate_dim, axes=("embed", "mlp"), **kw)
        self.proj2 = Dense(intermediate_dim, intermediate_dim, axes=("mlp", "embed"), **kw)
        self.proj3 = Dense(intermediate_dim, context_tokens * output_dim, axes=("embed", "mlp"), **kw)
        self.norm = LayerNorm(output_dim, epsilon=1e-5, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, windows: jax.Array) -> jax.Array:
        """windows (..., seq_len, blocks, channels) -> (..., context_tokens, output_dim)."""
        _check_last("AudioProjModel", windows, self.window_shape, "audio windows")
        lead = windows.shape[:windows.ndim - 3]
        x = windows.reshape(lead + (-1,))
        x = jax.nn.relu(self.proj1(x))
        x = jax.nn.relu(self.proj2(x))
        tokens = self.proj3(x).reshape(lead + (self.context_tokens, self.output_dim))
        return self.norm(tokens)

    def unconditional(self) -> jax.Array:
        """The learned null audio condition: the projection of all-zero features, (context_tokens, output_dim)."""
        return self(jnp.zeros(self.window_shape, jnp.float32))


class IDProjModel(nnx.Module):
    """Identity embedding -> one ID token (official `IDProjModel`).

    (..., in_dim) -> proj1, ReLU -> proj2, ReLU -> proj3 -> (..., 1, out_dim). The unconditional ID
    token is zero *after* the projection (spec §4), so it needs no method here.
    """

    def __init__(self, in_dim: int = 512, hidden_dim: int = 1024, out_dim: int = 1024, *, rngs: nnx.Rngs,
                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
        _check_positive("IDProjModel", in_dim=in_dim, hidden_dim=hidden_dim, out_dim=out_dim)
        self.in_dim = in_dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.proj1 = Dense(in_dim, hidden_dim, axes=("embed", "mlp"), **kw)
        self.proj2 = Dense(hidden_dim, hidden_dim, axes=("mlp", "embed"), **kw)
        self.proj3 = Dense(hidden_dim, out_dim, axes=("embed", "mlp"), **kw)

    def __call__(self, embedding: jax.Array) -> jax.Array:
        """embedding (..., in_dim) -> (..., 1, out_dim)."""
        _check_last("IDProjModel", embedding, (self.in_dim,), "identity embedding")
        x = jax.nn.relu(self.proj1(embedding))
        x = jax.nn.relu(self.proj2(x))
        return self.proj3(x)[..., None, :]


class MotionProjModel(nnx.Module):
    """Expression + head pose -> one motion token (official `VasaProjModel`).

    token = [LayerNorm(proj1(expression)) ; pose] on the last axis: (..., De), (..., pose_dim)
    -> (..., 1, out_dim), proj1: De -> out_dim - pose_dim. The official pose is yaw/pitch/roll in
    degrees and a translation the pipeline multiplies by 0 before calling (spec §4).
    """

    def __init__(self, expression_dim: int = 512, out_dim: int = 1024, pose_dim: int = 6, *, rngs: nnx.Rngs,
                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
        _check_positive("MotionProjModel", expression_dim=expression_dim, out_dim=out_dim)
        if isinstance(pose_dim, bool) or not isinstance(pose_dim, numbers.Integral) or not 0 <= pose_dim < out_dim:
            raise ValueError(f"MotionProjModel: pose_dim must be an int in [0, out_dim={out_dim}), got {pose_dim!r}")
        self.expression_dim, self.pose_dim, self.dtype = expression_dim, pose_dim, dtype
        self.proj1 = Dense(expression_dim, out_dim - pose_dim, axes=("embed", "mlp"), rngs=rngs, dtype=dtype,
                           param_dtype=param_dtype)
        self.norm = LayerNorm(out_dim - pose_dim, epsilon=1e-5, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, expression: jax.Array, pose: jax.Array) -> jax.Array:
        """expression (..., De), pose (..., pose_dim) with the same leading dims -> (..., 1, out_dim)."""
        _check_last("MotionProjModel", expression, (self.expression_dim,), "expression")
        _check_last("MotionProjModel", pose, (self.pose_dim,), "pose")
        if expression.shape[:-1] != pose.shape[:-1]:
            raise ValueError(f"MotionProjModel: expression {tuple(expression.shape)} and pose {tuple(pose.shape)} "
                             f"must share their leading dims")
        features = self.norm(self.proj1(expression))
        return jnp.concatenate([features, pose.astype(features.dtype)], axis=-1)[..., None, :]

    def unconditional(self) -> jax.Array:
        """Null motion token [LN(proj1.bias) ; zeros(pose_dim)], the projection of zero inputs: (1, out_dim)."""
        features = self.norm(self.proj1.bias[...].astype(self.dtype))
        return jnp.concatenate([features, jnp.zeros((self.pose_dim,), features.dtype)])[None, :]


VasaProjModel = MotionProjModel


class PoseGuider(nnx.Module):
    """Face-box image -> latent-resolution feature added after the UNet's conv_in (official `PoseGuider`).

    conv_in 3x3 + SiLU, then per width step a same-width 3x3 conv + SiLU and a stride-2 3x3 conv
    (padding 1) + SiLU (`blocks.0..`), then `conv_out` 3x3, zero-initialised.
    (..., H, W, conditioning_channels) in [0, 1] -> (..., H', W', conditioning_embedding_channels),
    H' = H / 2^(len(block_out_channels) - 1) rounded up at each stride-2 conv (H/8 officially).
    """

    def __init__(self, conditioning_embedding_channels: int = 320,
                 block_out_channels: Sequence[int] = (16, 32, 96, 256), conditioning_channels: int = 3, *,
                 rngs: nnx.Rngs, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
        block_out_channels = tuple(block_out_channels)
        if not block_out_channels:
            raise ValueError("PoseGuider: block_out_channels must not be empty")
        _check_positive("PoseGuider", conditioning_embedding_channels=conditioning_embedding_channels,
                        conditioning_channels=conditioning_channels,
                        **{f"block_out_channels[{i}]": c for i, c in enumerate(block_out_channels)})
        self.conditioning_channels = conditioning_channels
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.conv_in = Conv(conditioning_channels, block_out_channels[0], (3, 3), **kw)
        blocks = []
        for c_in, c_out in zip(block_out_channels[:-1], block_out_channels[1:]):
            blocks.append(Conv(c_in, c_in, (3, 3), **kw))
            blocks.append(Conv(c_in, c_out, (3, 3), strides=(2, 2), padding=(1, 1), **kw))
        self.blocks = nnx.List(blocks)
        self.conv_out = Conv(block_out_channels[-1], conditioning_embedding_channels, (3, 3), **kw)
        for param in (self.conv_out.kernel, self.conv_out.bias):
            param.set_value(jnp.zeros_like(param.get_value()))

    def __call__(self, condition: jax.Array) -> jax.Array:
        """condition (..., H, W, C) -> (..., H', W', conditioning_embedding_channels)."""
        if condition.ndim < 3 or condition.shape[-1] != self.conditioning_channels:
            raise ValueError(f"PoseGuider: condition must be (..., H, W, {self.conditioning_channels}), "
                             f"got shape {tuple(condition.shape)}")
        lead = condition.shape[:-3]
        x = condition.reshape((-1,) + condition.shape[-3:])
        x = jax.nn.silu(self.conv_in(x))
        for block in self.blocks:
            x = jax.nn.silu(block(x))
        x = self.conv_out(x)
        return x.reshape(lead + x.shape[1:])
