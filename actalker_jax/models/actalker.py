"""ACTalkerModel: the ACTalker UNet plus its condition encoders, gates and region masks (spec §2-4).

    model = ACTalkerModel(ACTalkerConfig.svd_xt(), rngs=nnx.Rngs(0))

Low-level calls (channels-last; Dc = cross-attention dim, 1024 for SVD-xt; C0 = conv_in width, 320):
    model.unet(sample (B,F,h,w,8), timestep (B,), id_tokens (B,1,Dc), audio_tokens (B,F,32,Dc),
               motion_tokens (B,F,1,Dc), added_time_ids (B,3), *, pose_feature (B,h,w,C0) | (B,F,h,w,C0) | None,
               mask_audio (B,H,W), mask_motion (B,H,W)) -> (B,F,h,w,4)
        tokens already gated, masks at image resolution H = 8h (the official UNet contract);
    model.audio_proj(windows (B,F,10,5,384)) -> (B,F,32,Dc)       whisper windows -> audio tokens
    model.id_proj(embedding (B,Di)) -> (B,1,Dc)                    identity embedding -> ID token
    model.motion_proj(expression (B,F,De), pose (B,F,6)) -> (B,F,1,Dc) = [LN(Linear(expression)); pose]
    model.pose_guider(face_box_image (B,H,W,3) in [0,1]) -> (B,h,w,C0)

High-level call (training and sampling): `model(sample, timestep, added_time_ids, conditions, gates)`
with raw conditions, per-sample 0/1 gates (B, 2) = (audio, motion), per-sample condition drops, as the
official code applies them: a gate multiplies the condition tokens and empties its branch's mask; a
dropped condition takes its unconditional form (projected zero audio, projected zero expression with
zero pose, zero ID token after projection together with a zero reference latent).

Region masks per control mode: `control_masks(mode, gates, ...)`; "regions" (the paper: mouth for audio,
face minus mouth for motion) or "official" (the released inference: the face box for the single open
branch, all-ones masks for both when both gates are open).
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from actalker_jax.models.actalker_unet import ACTalkerUNet, PCMConfig
from actalker_jax.models.encoders import AudioProjModel, IDProjModel, MotionProjModel, PoseGuider
from actalker_jax.models.layers import Dtype, ParamKeys
from actalker_jax.models.unet import UNetConfig

INFERENCE_MASKS = ("official", "regions")


@dataclasses.dataclass(frozen=True)
class ACTalkerConfig:
    """The whole ACTalker model. Encoder sizes default to the official ones (spec §4)."""

    unet: UNetConfig = UNetConfig.svd_xt(temporal_context="frame_mean")
    pcm: PCMConfig = PCMConfig()
    audio_seq_len: int = 10
    audio_blocks: int = 5
    audio_channels: int = 384
    audio_hidden_dim: int = 1024
    audio_tokens: int = 32
    id_dim: int = 512
    id_hidden_dim: int = 1024
    expression_dim: int = 512
    pose_dim: int = 6
    pose_guider_channels: tuple[int, ...] = (16, 32, 96, 256)
    inference_masks: str = "official"

    def __post_init__(self):
        object.__setattr__(self, "pose_guider_channels", tuple(self.pose_guider_channels))
        if isinstance(self.unet, dict):
            object.__setattr__(self, "unet", UNetConfig(**self.unet))
        if isinstance(self.pcm, dict):
            object.__setattr__(self, "pcm", PCMConfig(**self.pcm))
        if self.inference_masks not in INFERENCE_MASKS:
            raise ValueError(f"ACTalkerConfig.inference_masks must be one of {INFERENCE_MASKS}, "
                             f"got {self.inference_masks!r}")
        if not isinstance(self.unet.cross_attention_dim, int):
            raise ValueError("ACTalkerConfig.unet.cross_attention_dim must be one int (the condition token width), "
                             f"got {self.unet.cross_attention_dim}")

    @property
    def cond_dim(self) -> int:
        return self.unet.cross_attention_dim

    @classmethod
    def svd_xt(cls, **overrides) -> "ACTalkerConfig":
        """The released model: SVD-xt UNet, official encoder sizes."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides) -> "ACTalkerConfig":
        """A small model for tests and the CPU demo: tiny UNet (widths 32/64, Dc 32), small encoders."""
        return cls(**{**dict(unet=UNetConfig.tiny(temporal_context="frame_mean"), audio_seq_len=2, audio_blocks=2,
                             audio_channels=16, audio_hidden_dim=64, audio_tokens=4, id_dim=16, id_hidden_dim=32,
                             expression_dim=8, pose_guider_channels=(8, 8, 16, 16)), **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ACTalkerConfig":
        return cls(**values)


def _per_sample(flags: jax.Array | None, batch: int) -> jax.Array:
    """(B,) bool drop flags (None: keep every sample) -> (B,) bool."""
    return jnp.zeros((batch,), jnp.bool_) if flags is None else jnp.asarray(flags, jnp.bool_).reshape(batch)


def control_masks(mode: str, gates: jax.Array, *, mouth: jax.Array, face_minus_mouth: jax.Array,
                  face_box: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mask_audio, mask_motion), each (B, H, W), for per-sample gates (B, 2) = (audio, motion) in {0, 1}.

    "regions": (mouth, face_minus_mouth) in every mode. "official" (released Inference.py): audio only ->
    (face box, 0); motion only -> (0, face box); both -> (1, 1). Closed branches are emptied later by
    the gates in either mode.
    """
    if mode not in INFERENCE_MASKS:
        raise ValueError(f"masks mode must be one of {INFERENCE_MASKS}, got {mode!r}")
    if mode == "regions":
        return mouth, face_minus_mouth
    open_audio = (gates[:, 0] > 0)[:, None, None]
    open_motion = (gates[:, 1] > 0)[:, None, None]
    both = open_audio & open_motion
    ones = jnp.ones_like(face_box)
    return (jnp.where(both, ones, jnp.where(open_audio, face_box, 0.0)),
            jnp.where(both, ones, jnp.where(open_motion, face_box, 0.0)))


class ACTalkerModel(nnx.Module):
    """UNet (ACTalkerUNet) + AudioProj + IDProj + MotionProj + PoseGuider. See the module docstring."""

    def __init__(self, config: ACTalkerConfig, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, remat: Mapping[str, str] | None = None):
        """remat: activation rematerialisation policy per UNet block name (models/remat.py)."""
        self.config = config
        rngs = ParamKeys(rngs)
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        dc = config.cond_dim
        self.unet = ACTalkerUNet(config.unet, config.pcm, remat=remat, **kw)
        self.audio_proj = AudioProjModel(config.audio_seq_len, config.audio_blocks, config.audio_channels,
                                         config.audio_hidden_dim, dc, config.audio_tokens, **kw)
        self.id_proj = IDProjModel(config.id_dim, config.id_hidden_dim, dc, **kw)
        self.motion_proj = MotionProjModel(config.expression_dim, dc, config.pose_dim, **kw)
        self.pose_guider = PoseGuider(config.unet.block_out_channels[0], config.pose_guider_channels, **kw)

    def condition_tokens(self, conditions: dict, gates: jax.Array, *, drop_appearance=None, drop_audio=None,
                         drop_motion=None) -> dict[str, jax.Array]:
        """Raw conditions -> gated tokens for the UNet.

        conditions: `audio` (B,F,10,5,384) whisper windows, `expression` (B,F,De), `pose` (B,F,6),
        `id_embed` (B,Di). gates (B, 2) in {0, 1}. drop_* (B,) bool select the unconditional forms.
        Returns id_tokens (B,1,Dc), audio_tokens (B,F,Na,Dc), motion_tokens (B,F,1,Dc).
        """
        batch = conditions["id_embed"].shape[0]
        gates = jnp.asarray(gates, jnp.float32).reshape(batch, 2)
        audio = self.audio_proj(conditions["audio"])
        audio = jnp.where(_per_sample(drop_audio, batch)[:, None, None, None], self.audio_proj.unconditional(), audio)
        motion = self.motion_proj(conditions["expression"], conditions["pose"])
        motion = jnp.where(_per_sample(drop_motion, batch)[:, None, None, None], self.motion_proj.unconditional(),
                           motion)
        id_tokens = self.id_proj(conditions["id_embed"])
        id_tokens = jnp.where(_per_sample(drop_appearance, batch)[:, None, None], 0.0, id_tokens)
        return dict(id_tokens=id_tokens,
                    audio_tokens=audio * gates[:, 0, None, None, None].astype(audio.dtype),
                    motion_tokens=motion * gates[:, 1, None, None, None].astype(motion.dtype))

    def __call__(self, sample: jax.Array, timestep: jax.Array, added_time_ids: jax.Array, conditions: dict,
                 gates: jax.Array, *, mask_audio: jax.Array, mask_motion: jax.Array, drop_appearance=None,
                 drop_audio=None, drop_motion=None) -> jax.Array:
        """sample (B,F,h,w,8) = [noisy latent * c_in ; reference latent] -> (B,F,h,w,4).

        conditions: as `condition_tokens`, plus optional `face_image` (B,H,W,3) in [0,1] for the pose guider.
        mask_audio / mask_motion (B,H,W): region masks (see `control_masks`); closed gates empty them.
        drop_appearance also zeroes the reference-latent half of `sample` (the official unconditional branch).
        """
        batch = sample.shape[0]
        gates = jnp.asarray(gates, jnp.float32).reshape(batch, 2)
        tokens = self.condition_tokens(conditions, gates, drop_appearance=drop_appearance, drop_audio=drop_audio,
                                       drop_motion=drop_motion)
        half = sample.shape[-1] // 2
        keep_reference = ~_per_sample(drop_appearance, batch)
        sample = jnp.concatenate(
            [sample[..., :half], sample[..., half:] * keep_reference[:, None, None, None, None].astype(sample.dtype)],
            axis=-1)
        face_image = conditions.get("face_image")
        pose_feature = self.pose_guider(face_image) if face_image is not None else None
        return self.unet(sample, timestep, tokens["id_tokens"], tokens["audio_tokens"], tokens["motion_tokens"],
                         added_time_ids, pose_feature=pose_feature,
                         mask_audio=mask_audio * gates[:, 0, None, None], mask_motion=mask_motion * gates[:, 1, None, None])


def face_box_image(face_box: jax.Array, size: tuple[int, int], scale: float = 1.0) -> jax.Array:
    """The pose guider's input: (B, 4) boxes x0, y0, x1, y1 (pixels) -> (B, H, W, 3) images, 1 inside the box.

    `scale` enlarges each box about its centre (the official inference uses 1.2). A pixel is inside when
    its centre is.
    """
    height, width = size
    centre = (face_box[:, :2] + face_box[:, 2:]) / 2
    half = (face_box[:, 2:] - face_box[:, :2]) * scale / 2
    x = jnp.arange(width, dtype=jnp.float32) + 0.5
    y = jnp.arange(height, dtype=jnp.float32) + 0.5
    inside_x = jnp.abs(x[None, :] - centre[:, 0:1]) <= half[:, 0:1]
    inside_y = jnp.abs(y[None, :] - centre[:, 1:2]) <= half[:, 1:2]
    box = (inside_y[:, :, None] & inside_x[:, None, :]).astype(jnp.float32)
    return jnp.broadcast_to(box[..., None], box.shape + (3,))


def record_conditions(batch: dict, face_box_scale: float) -> dict:
    """The model's `conditions` from a batch of records (data/records.py): audio, expression (the record's `motion`),
    pose, id_embed and the pose guider's face image, the record's face box scaled by `face_box_scale` at the
    frame size of its masks (B, H, W)."""
    return dict(audio=batch["audio"], expression=batch["motion"], pose=batch["pose"], id_embed=batch["id_embed"],
                face_image=face_box_image(batch["face_box"], batch["mask_audio"].shape[1:], face_box_scale))
