"""Condition reach of the PCM layers: how strongly each branch's condition moves each token's output.

    result = run_reach(loaded, sigma=1.0, batch_size=2, split="eval", out=DIR)

One batch of the run's records (`config.data`, split "eval" by default) at noise level sigma, gates both open,
nothing dropped, goes through the model once; the input of every PCM layer is recorded. For each layer and
branch b (audio, motion) the reach of token t is

    r_b(t) = || d out(t) / d c_b ||_F

over the layer's output channels and every entry of one frame's condition tokens c_b (audio: its Na tokens,
motion: its one token), computed exactly with one forward-mode derivative per entry (through the reference scan,
the plain recurrence, whatever the run's scan_impl), then averaged over the
frames (scan_over "video": the derivative w.r.t. that entry of every frame's tokens at once). Mask-drop makes r_b
zero outside b's region. Per layer: `audio_region`, the mean reach of the audio over the mouth tokens;
`motion_thirds`, the mean reach of the motion over the motion region's tokens cut in raster order into thirds (top,
middle, bottom of the face); `audio_outside` / `motion_outside`, the largest reach outside each region (0 with
mask-drop). Means are over the batch.

Why it matters: a branch's condition tokens follow its image tokens, so only the reverse scan carries them, from
the last region token (bottom right) back to the first (top left); a token far from the end in raster order is
reached only through a long run of decaying state updates (ACTALKER_SPEC §3.3-3.4). The audio's region (the mouth)
is short, the motion's (face minus mouth) long, with the eyes and brows in its top third.

Writes `reach.json` into `out`: {"checkpoint_step": s, "split": ..., "batch": B, "sigma": σ, "layers": [{"name",
"grid": [h, w], "audio_region", "motion_thirds": [top, middle, bottom], "audio_outside", "motion_outside"}, ...]},
and `reach.png`: per layer, the audio and motion reach maps of the batch's first clip.
"""

import json
import os
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from actalker_jax import diffusion
from actalker_jax.eval.denoise import probe_batch
from actalker_jax.models.actalker import record_conditions
from actalker_jax.models.masks import select_tokens
from actalker_jax.models.pcm import PCMLayer
from actalker_jax.run_model import face_box_scale, flatten, make_model_fn

BRANCHES = (("audio", "audio_tokens", "mask_audio"), ("motion", "motion_tokens", "mask_motion"))
TANGENT_CHUNK = 64


def _layer_names(model) -> dict[int, str]:
    return {id(node): ".".join(str(p) for p in path) for path, node in nnx.iter_graph(model)
            if isinstance(node, PCMLayer)}


def record_pcm_inputs(model, *args, **kwargs) -> list[tuple[str, PCMLayer, jax.Array, dict]]:
    """Runs model(*args, **kwargs) eagerly -> (name, layer, x, call keywords) of every PCM layer call, in order."""
    names, calls = _layer_names(model), []
    original = PCMLayer.__call__

    def recording(layer, x, **kw):
        calls.append((names.get(id(layer), "?"), layer, x, kw))
        return original(layer, x, **kw)

    with mock.patch.object(PCMLayer, "__call__", recording):
        model(*args, **kwargs)
    return calls


def token_reach(layer: PCMLayer, x: jax.Array, call: dict, token_key: str) -> np.ndarray:
    """|| d out(t) / d c ||_F for the condition tokens `token_key` (B, F, n, Dc) of one PCM call -> (B, F, L)."""
    conditions = call["conditions"]
    tokens = conditions[token_key]
    batch, frames, n, dc = tokens.shape
    graphdef, state = nnx.split(layer)

    @jax.jit
    def squared(state, tokens, tangents):  # tangents (k, n, Dc) -> sum over them of |d out / d c . tangent|^2
        def out(c):
            layer = nnx.merge(graphdef, state)
            for unit in (layer.audio_unit, layer.exp_unit):  # the plain recurrence: forward-mode differentiable
                unit.scan_impl = "reference"
            return layer(x, **{**call, "conditions": {**conditions, token_key: c}})

        def one(tangent):
            _, dout = jax.jvp(out, (tokens,), (jnp.broadcast_to(tangent, tokens.shape).astype(tokens.dtype),))
            return jnp.sum(jnp.square(dout.astype(jnp.float32)), axis=-1)

        return jnp.sum(jax.lax.map(one, tangents), axis=0)

    basis = np.eye(n * dc, dtype=np.float32).reshape(n * dc, n, dc)
    total = sum(squared(state, tokens, jnp.asarray(basis[i:i + TANGENT_CHUNK]))
                for i in range(0, n * dc, TANGENT_CHUNK))
    return np.sqrt(np.asarray(total)).reshape(batch, frames, -1)


def initial_params(config) -> dict:
    """{"dotted.key": array} of a run config's fresh initialisation (the trainer's, from config.seed)."""
    return flatten(nnx.split(make_model_fn(config)())[1])


def _thirds(reach: np.ndarray, keep: np.ndarray) -> list[float]:
    """Mean reach over a region's tokens in raster order, cut in thirds; (B, L), (B, L) bool -> [top, mid, bottom]."""
    parts = [[p.mean() if p.size else 0.0 for p in np.array_split(r[k], 3)] for r, k in zip(reach, keep)]
    return [float(v) for v in np.mean(parts, axis=0)]


def run_reach(loaded, *, sigma: float = 1.0, batch_size: int = 2, split: str = "eval", seed: int = 0,
              out: str) -> dict:
    """Measures (module doc), writes reach.json and reach.png into `out`, returns the json."""
    if not sigma > 0:
        raise ValueError(f"--sigma must be positive, got {sigma}")
    config, batch, edm = probe_batch(loaded, batch_size, split)
    sigmas = jnp.full((batch_size,), sigma, jnp.float32)
    noisy, _ = diffusion.add_noise(jax.random.key(seed), batch["latents"] * edm.latent_scale, sigmas, edm)
    sample, timestep = diffusion.model_inputs(noisy, batch["ref_latent"], sigmas,
                                              diffusion.data_prior(batch["ref_latent"], edm))
    conditions = record_conditions(batch, face_box_scale(config))
    calls = record_pcm_inputs(loaded.model, sample, timestep, batch["added_time_ids"], conditions,
                              jnp.ones((batch_size, 2)), mask_audio=batch["mask_audio"],
                              mask_motion=batch["mask_motion"])
    if not calls:
        raise ValueError("the model has no PCM layers (config.model.pcm.enabled is False): nothing to measure")
    layers, maps = [], []
    for name, layer, x, call in calls:
        grid = tuple(call["grid"])
        row = dict(name=name, grid=list(grid))
        reach = {}
        for branch, token_key, mask_key in BRANCHES:
            keep = np.asarray(select_tokens(call["conditions"][mask_key], grid))
            reach[branch] = token_reach(layer, x, call, token_key).mean(axis=1)  # (B, L)
            row[f"{branch}_outside"] = float(np.max(np.where(keep, 0.0, reach[branch]), initial=0.0))
            if branch == "audio":
                row["audio_region"] = float(np.mean([r[k].mean() if k.any() else 0.0
                                                     for r, k in zip(reach[branch], keep)]))
            else:
                row["motion_thirds"] = _thirds(reach[branch], keep)
        layers.append(row)
        maps.append((name, grid, reach["audio"][0].reshape(grid), reach["motion"][0].reshape(grid)))
    result = dict(checkpoint_step=int(loaded.step), split=split, batch=batch_size, sigma=float(sigma), layers=layers)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "reach.json"), "w") as f:
        json.dump(result, f, indent=1)
    _figure(maps, os.path.join(out, "reach.png"))
    return result


def _figure(maps, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(maps), 2, figsize=(6, 2.8 * len(maps)), squeeze=False)
    for row, (name, _, audio, motion) in zip(axes, maps):
        for ax, (branch, values) in zip(row, (("audio", audio), ("motion", motion))):
            image = ax.imshow(values, cmap="magma")
            fig.colorbar(image, ax=ax, fraction=0.046)
            ax.set_title(f"{branch} reach\n{name}", fontsize=6)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown_table(result: dict) -> str:
    lines = [f"PCM condition reach: batch {result['batch']} ({result['split']}), sigma {result['sigma']:g}, "
             f"checkpoint step {result['checkpoint_step']}.", "",
             "| layer | grid | audio: mouth | motion: top / middle / bottom third | outside |", "|---|---|---|---|---|"]
    for row in result["layers"]:
        thirds = " / ".join(f"{v:.3g}" for v in row["motion_thirds"])
        outside = max(row["audio_outside"], row["motion_outside"])
        lines.append(f"| {row['name']} | {row['grid'][0]}x{row['grid'][1]} | {row['audio_region']:.3g} | {thirds} | "
                     f"{outside:.3g} |")
    return "\n".join(lines) + "\n"
