"""Control benchmark: does audio drive only the mouth and motion only the rest of the face?

    result = run_control(loaded, sample.generate, num_clips=8, steps=25, seed=0, out=DIR, guidance=None,
                         window_stride=None, guidance_regions=None)

Held-out clips: clip i is `synthetic.generate_clip(config.seed, HELD_OUT_START + i, config.synthetic_frames,
config.media.image_size, config.media.fps)`. Training uses indices 0 .. config.synthetic_clips - 1 of the same
seed, so every held-out clip is drawn from seed streams (SeedSequence([seed, index])) training never saw.

For each clip and control mode ("audio", "motion", "both") the model animates the clip's first frame with the
clip's audio and / or motion features; `control_metrics.fit_motion` measures mouth, eyes and yaw in the generated
frames, and `control_metrics` turns them into correlations with the ground truth. The appearance score is the
PSNR against the reference frame over the pixels no ground-truth frame changes (`static_mask`).

Writes into `out`: control.json {"modes": {"audio": M, "motion": M, "both": M}, "num_clips": n,
"checkpoint_step": s} (M: `control_metrics.METRIC_KEYS`, null where a mode has no such signal), control.png
(ground truth vs measured curves of the first clip, one panel per mode) and control.md (the table, and the chance
level of mouth_leak on the same clips: `control_metrics.chance_mouth_leak`).
"""

import json
import os

import numpy as np

from actalker_jax.data import synthetic
from actalker_jax.eval import control_metrics

HELD_OUT_START = 1_000_000_000
MAX_FRAME_MISMATCH = 2   # generated vs ground-truth frame count (the sampler gives duration x fps, +-1)


def held_out_clips(config, num_clips: int) -> list[dict]:
    """The first `num_clips` held-out synthetic clips for a run's config (see the module docstring)."""
    if num_clips < 1:
        raise ValueError(f"--num-clips must be >= 1, got {num_clips}")
    if config.get("synthetic_clips", 0) > HELD_OUT_START:
        raise ValueError(f"config.synthetic_clips={config.synthetic_clips} reaches the held-out indices "
                         f"(from {HELD_OUT_START})")
    frames = config.get("synthetic_frames", 25)
    return [synthetic.generate_clip(config.seed, HELD_OUT_START + i, frames, config.media.image_size,
                                    config.media.fps) for i in range(num_clips)]


def motion_features(clip: dict) -> np.ndarray:
    """A clip's motion features (T, De + 6) float32: the record's expression `motion` then its head `pose`."""
    expression, pose = synthetic.motion_features(clip["truth"])
    return np.concatenate([expression, pose], axis=-1)


def _aligned(frames: np.ndarray, clip: dict, where: str) -> tuple[np.ndarray, dict]:
    """Generated frames and ground truth cut to their common length."""
    frames = np.asarray(frames)
    size = clip["size"]
    if frames.ndim != 4 or frames.shape[1:] != (size, size, 3) or frames.dtype != np.uint8:
        raise ValueError(f"{where}: generate returned {frames.dtype} {frames.shape}, expected (T, {size}, {size}, 3) "
                         f"uint8")
    count = len(clip["frames"])
    if abs(len(frames) - count) > MAX_FRAME_MISMATCH:
        raise ValueError(f"{where}: generate returned {len(frames)} frames for {count} frames of audio")
    count = min(count, len(frames))
    return frames[:count], {k: v[:count] for k, v in clip["truth"].items()}


def run_control(loaded, generate, *, num_clips: int, steps: int = 25, seed: int = 0, out: str,
                guidance: tuple[float, float, float] | None = None, window_stride: int | None = None,
                guidance_regions: bool | None = None) -> dict:
    """Generates, measures and writes control.json / control.png / control.md into `out`; returns control.json.

    guidance: (appearance, audio, motion) scales for `generate`; window_stride: output frames between a sampling
    window's frames; guidance_regions: audio guidance in the mouth region only and motion guidance outside it;
    None: the checkpoint config's `diffusion` values.
    """
    clips = held_out_clips(loaded.config, num_clips)
    curves, modes = {}, {}
    for mode in control_metrics.MODES:
        scores, psnrs = [], []
        for i, clip in enumerate(clips):
            frames = generate(loaded, image=clip["frames"][0], wav=clip["wav"], sample_rate=synthetic.SAMPLE_RATE,
                              motion=None if mode == "audio" else motion_features(clip), control=mode,
                              seed=seed + i, steps=steps, guidance=guidance, window_stride=window_stride,
                              guidance_regions=guidance_regions)
            frames, truth = _aligned(frames, clip, f"mode {mode}, held-out clip {i}")
            measured = control_metrics.fit_motion(frames, clip["appearance"])
            scores.append(control_metrics.clip_scores(measured, truth))
            mask = control_metrics.static_mask(clip["frames"])
            psnrs.append(control_metrics.masked_psnr(frames, clip["frames"][0], mask))
            if i == 0:
                curves[mode] = (truth, measured)
        modes[mode] = control_metrics.mode_metrics(mode, scores, psnrs)
    result = dict(modes=modes, num_clips=num_clips, checkpoint_step=int(loaded.step))
    chance = control_metrics.chance_mouth_leak([clip["truth"] for clip in clips])
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "control.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out, "control.md"), "w") as f:
        f.write(markdown_table(result, chance_mouth_leak=chance))
    plot_curves(curves, os.path.join(out, "control.png"))
    return result


def markdown_table(result: dict, chance_mouth_leak: float | None = None) -> str:
    """control.json as a markdown table: one row per mode, '-' where a mode has no such signal; then, when given,
    the clips' chance level of mouth_leak (`control_metrics.chance_mouth_leak`)."""
    keys = control_metrics.METRIC_KEYS
    lines = [f"Control benchmark: {result['num_clips']} held-out synthetic clips, checkpoint step "
             f"{result['checkpoint_step']}.", "", "| mode | " + " | ".join(keys) + " |",
             "|---|" + "---|" * len(keys)]
    for mode, metrics in result["modes"].items():
        cells = ["-" if metrics[k] is None else f"{metrics[k]:.2f}" if k == "psnr_static" else f"{metrics[k]:+.3f}"
                 for k in keys]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    if chance_mouth_leak is not None:
        lines += ["", f"Chance level of mouth_leak on these clips: {chance_mouth_leak:+.3f} (their own speech-driven "
                  "mouth, drawn independently of the motion, scored against their motion)."]
    return "\n".join(lines) + "\n"


def plot_curves(curves: dict[str, tuple[dict, dict]], path: str) -> None:
    """One panel per mode: ground truth (solid) vs measured (dashed) mouth, eye openness and yaw / MAX_YAW."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.4), sharey=True, squeeze=False)
    styles = dict(mouth=("tab:red", 1.0), eye=("tab:blue", 1.0), yaw=("tab:green", synthetic.MAX_YAW))
    for ax, (mode, (truth, measured)) in zip(axes[0], curves.items()):
        for name, (colour, scale) in styles.items():
            label = f"{name} / {scale:g}" if scale != 1.0 else name
            ax.plot(truth[name] / scale, color=colour, label=f"{label} truth")
            ax.plot(measured[name] / scale, color=colour, linestyle="--", label=f"{label} measured")
        ax.set_title(f"control = {mode}")
        ax.set_xlabel("frame")
    axes[0, 0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
