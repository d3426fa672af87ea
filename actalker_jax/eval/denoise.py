"""Denoising probe: how well a checkpoint predicts x0 on held-out records, and whether it uses its conditions.

    result = run_denoise(loaded, sigmas=(0.2, 1.0, 5.0), batch_size=4, split="eval", out=DIR)

Cheap (a few forward passes, no sampling), so it can follow training from checkpoint to checkpoint. One batch of
the run's records (`config.data`, split "eval" by default), gates both open, no condition dropped. At each sigma,
with the same noise: the x0 mean squared error over all latents, over the mouth region (`mask_audio`) and over
the rest of the face (`mask_motion`); the same with every clip's audio replaced by the next clip's (the batch
rolled by one) and with its expression + pose replaced likewise; and the error of copying the reference latent.
A model that reproduces the reference has `all` below `copy_reference`; one driven by the audio has `mouth`
below `mouth_other_audio`; one driven by the motion has `face` below `face_other_motion`.
Sensitivities (mean squared change of the predicted x0, not an error): `mouth_change_audio` when the audio is
swapped, `face_change_expression` / `face_change_pose` when only the expression / only the pose is. A model that
ignores a condition has 0 there; compare with `face_motion`, the mean squared deviation of the target face region
from its window mean (what the motion has to explain; the same at every sigma).

Writes `denoise.json` into `out`: {"checkpoint_step": s, "split": ..., "batch": B, "sigmas": {"1.0": {"all",
"mouth", "face", "mouth_other_audio", "face_other_motion", "copy_reference", "mouth_change_audio",
"face_change_expression", "face_change_pose", "face_motion"}, ...}}.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from actalker_jax import diffusion
from actalker_jax.data import pipeline
from actalker_jax.data.demo_encoders import pixel_unshuffle
from actalker_jax.models.actalker import record_conditions
from actalker_jax.run_model import face_box_scale

KEYS = ("all", "mouth", "face", "mouth_other_audio", "face_other_motion", "copy_reference", "mouth_change_audio",
        "face_change_expression", "face_change_pose", "face_motion")


def _latent_region(mask: jax.Array, factor: int) -> jax.Array:
    """Image-resolution mask (B, H, W) -> (B, 1, H/f, W/f, 1): a latent pixel is in when any of its pixels is."""
    return pixel_unshuffle(mask[..., None], factor).max(-1)[:, None, :, :, None]


def probe_batch(loaded, batch_size: int, split: str):
    """The first batch of `batch_size` records of the run's data split -> (config, batch of jax arrays, EDMConfig)."""
    config = loaded.config.copy_and_resolve_references()
    config.data.batch_size = batch_size
    edm = diffusion.EDMConfig(**config.diffusion.to_dict())
    try:
        local = next(iter(pipeline.make_dataset(config, split=split, process_index=0, process_count=1)))
    except StopIteration:
        raise ValueError(f"split {split!r} of {config.data.records} has fewer than --batch {batch_size} clips") from None
    return config, {k: jnp.asarray(v) for k, v in local.items() if k != "clip_index"}, edm


def run_denoise(loaded, *, sigmas=(0.2, 1.0, 5.0), batch_size: int = 4, split: str = "eval", seed: int = 0,
                out: str) -> dict:
    """Measures (module doc), writes denoise.json into `out`, returns it."""
    if not sigmas or any(not s > 0 for s in sigmas):
        raise ValueError(f"--sigmas must be positive, got {list(sigmas)}")
    if batch_size < 2:
        raise ValueError(f"--batch must be >= 2 (conditions are swapped between clips), got {batch_size}")
    config, batch, edm = probe_batch(loaded, batch_size, split)
    x0 = batch["latents"] * edm.latent_scale
    other = jnp.roll(jnp.arange(batch_size), 1)
    mouth = _latent_region(batch["mask_audio"], loaded.media.factor)
    face = _latent_region(batch["mask_motion"], loaded.media.factor)
    true_conditions = record_conditions(batch, face_box_scale(config))

    @jax.jit
    def predict(sigma, audio, expression, pose):
        sigma = jnp.full((batch_size,), sigma, jnp.float32)
        noisy, _ = diffusion.add_noise(jax.random.key(seed), x0, sigma, edm)
        prior = diffusion.data_prior(batch["ref_latent"], edm)
        sample, timestep = diffusion.model_inputs(noisy, batch["ref_latent"], sigma, prior)
        conditions = {**true_conditions, "audio": audio, "expression": expression, "pose": pose}
        output = loaded.model(sample, timestep, batch["added_time_ids"], conditions, jnp.ones((batch_size, 2)),
                              mask_audio=batch["mask_audio"], mask_motion=batch["mask_motion"])
        return diffusion.denoised(output, noisy, sigma, prior)

    def mean_square(difference, region):
        return float(jnp.sum(region * difference ** 2) / jnp.sum(region * jnp.ones_like(difference)))

    def mse(prediction, region):
        return mean_square(prediction - x0, region)

    reference = jnp.broadcast_to(batch["ref_latent"][:, None] * edm.latent_scale, x0.shape)
    result = dict(checkpoint_step=int(loaded.step), split=split, batch=batch_size, sigmas={})
    for sigma in sigmas:
        true = predict(sigma, batch["audio"], batch["motion"], batch["pose"])
        other_audio = predict(sigma, batch["audio"][other], batch["motion"], batch["pose"])
        other_motion = predict(sigma, batch["audio"], batch["motion"][other], batch["pose"][other])
        other_expression = predict(sigma, batch["audio"], batch["motion"][other], batch["pose"])
        other_pose = predict(sigma, batch["audio"], batch["motion"], batch["pose"][other])
        result["sigmas"][f"{float(sigma):g}"] = dict(
            all=mse(true, 1.0), mouth=mse(true, mouth), face=mse(true, face),
            mouth_other_audio=mse(other_audio, mouth), face_other_motion=mse(other_motion, face),
            copy_reference=mse(reference, 1.0), mouth_change_audio=mean_square(other_audio - true, mouth),
            face_change_expression=mean_square(other_expression - true, face),
            face_change_pose=mean_square(other_pose - true, face),
            face_motion=mean_square(x0 - x0.mean(axis=1, keepdims=True), face))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "denoise.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def markdown_table(result: dict) -> str:
    """denoise.json as a markdown table: one row per sigma."""
    lines = [f"Denoising probe: checkpoint step {result['checkpoint_step']}, {result['batch']} clips of split "
             f"{result['split']!r}; x0 mean squared error (change_* and face_motion: mean squared change of the "
             f"prediction / deviation of the target, eval/denoise.py).", "", "| sigma | " + " | ".join(KEYS) + " |",
             "|---|" + "---|" * len(KEYS)]
    for sigma, row in result["sigmas"].items():
        lines.append(f"| {sigma} | " + " | ".join(f"{row[k]:.5f}" for k in KEYS) + " |")
    return "\n".join(lines) + "\n"


def parse_sigmas(text: str) -> tuple[float, ...]:
    """'0.2,1,5' -> (0.2, 1.0, 5.0); a bad list raises ValueError naming it."""
    try:
        values = tuple(float(s) for s in text.split(","))
    except ValueError:
        raise ValueError(f"--sigmas must be comma-separated numbers, got {text!r}") from None
    if not all(np.isfinite(values)):
        raise ValueError(f"--sigmas must be finite, got {text!r}")
    return values
