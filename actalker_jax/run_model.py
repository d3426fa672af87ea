"""A run config's model and the flat parameter view, shared by training, sampling and evaluation.

    mcfg = model_config(config)                 # config.model -> ACTalkerConfig (TrainError names a bad key)
    model = make_model_fn(config)()             # the trainer's fresh model (seed, compute dtype, remat of config)
    scale = face_box_scale(config)              # the pose guider's face-box scale (sampling, evaluation)
    flat = flatten(nnx.split(model)[1])         # {"dotted.path": array}: checkpoints and the optimizer use it
    state = unflatten(template_state, flat)

No command-line flags live here, so every module can import it (train.py defines the trainer's flags; importing
it from code that runs under `python -m actalker_jax.train` would define them twice).
"""

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from actalker_jax.models.actalker import ACTalkerConfig, ACTalkerModel
from actalker_jax.models.actalker_unet import PCMConfig
from actalker_jax.models.unet import UNetConfig


class TrainError(RuntimeError):
    """A run that cannot start or continue; the message names the config key, file or step."""


def model_config(config) -> ACTalkerConfig:
    """ACTalkerConfig from `config.model` (unet / pcm sub-dicts plus encoder sizes)."""
    m = config.model.to_dict()
    unet = UNetConfig(**{"temporal_context": "frame_mean", **m.pop("unet")})
    pcm = PCMConfig(**m.pop("pcm"))
    try:
        return ACTalkerConfig(unet=unet, pcm=pcm, **m)
    except TypeError as err:
        raise TrainError(f"config.model: {err}") from None


def flatten(state: nnx.State) -> dict[str, jax.Array]:
    """nnx.State -> {"dotted.path": array} (the checkpoint and optimizer view of the parameters)."""
    return {".".join(str(p) for p in path): var.get_value() for path, var in nnx.to_flat_state(state)}


def unflatten(template: nnx.State, flat: dict) -> nnx.State:
    """The inverse of `flatten` onto a template state of the same paths."""
    return nnx.from_flat_state([(path, var.replace(flat[".".join(str(p) for p in path)]))
                                for path, var in nnx.to_flat_state(template)])


def face_box_scale(config) -> float:
    """The pose guider's face-box scale of a run config: config.train.face_box_scale, else 1.2 (the official
    inference value) for configs without a train section."""
    return float(config.get("train", {}).get("face_box_scale", 1.2))


def make_model_fn(config):
    """() -> ACTalkerModel of `config` (random init from config.seed, compute dtype and remat from config)."""
    mcfg = model_config(config)
    dtype = jnp.dtype(config.compute_dtype)
    remat = config.get("remat")
    remat = remat.to_dict() if isinstance(remat, ml_collections.ConfigDict) else remat

    def make_model():
        try:
            return ACTalkerModel(mcfg, rngs=nnx.Rngs(jax.random.key(config.seed, impl="unsafe_rbg")), dtype=dtype,
                                 param_dtype=jnp.float32, remat=remat)
        except ValueError as err:
            raise TrainError(f"config: {err}") from None

    return make_model
