"""Control measurement on synthetic talking faces: the renderer's own geometry fitted to each frame.

    measured = fit_motion(frames, appearance)        # frames (T, H, W, 3) uint8 -> {mouth, eye, brow, yaw} (T,)
    scores = clip_scores(measured, truth)            # per-clip correlations with every ground-truth signal
    metrics = mode_metrics("audio", [scores, ...], [psnr, ...])

The measurement does not use the model. The appearance of a synthetic clip is known (its colours, face centre
and radii), so each frame is explained by the four motion parameters of `synthetic.render_face`: mouth opening,
eye openness, brow height (fitted so that it does not bias the others) and head yaw. Per frame: a grid search
over yaw (`YAW_GRID`, other parameters at `START`), a joint grid over mouth and eye openness (`OPEN_GRID`; the
eye error is non-convex: a nearly closed eye is a dark slit), then `LM_STEPS` Levenberg-Marquardt steps on the
squared pixel error with forward-difference Jacobians (`FD_STEP`), parameters kept inside `LOWER`/`UPPER`. Frames are
compared after a `BLUR_SIGMA` pixel Gaussian blur (pixels of a `BLUR_WIDTH`-wide frame; scaled with the width) with
renders blurred by the `RENDER_SIGMAS` entry that fits
`PROBE_FRAMES` frames of the clip best (sharp renders, or renders as blurry as the generated frames: blur would
otherwise bias the eye openness). All frames are fitted together (one batched numpy render per step): ~0.5 s for
a 25-frame 64x64 clip on one core.

Metrics: `*_corr` = Pearson correlation of a measured quantity with its own driving ground truth (mouth <-
audio loudness envelope, eye openness and yaw <- motion); `*_leak` = correlation with the other signal's
ground truth (eye and yaw with the audio-driven mouth truth; the mouth with the motion truth: the component
among eye, brow, yaw whose clip-averaged correlation is largest in magnitude). A series that does not move
(standard deviation below `RESOLUTION`) has correlation 0 (no control, no leak). Values are averaged over clips;
`None` where the mode lacks the driving signal. `chance_mouth_leak` scores the clips' own speech-driven mouth
truth as a `mouth_leak`: the level a mouth independent of the motion reaches on those clips by chance.
"""

import numpy as np

from actalker_jax.data import synthetic

PARAMS = ("mouth", "eye", "brow", "yaw")
QUANTITIES = ("mouth", "eye", "yaw")
MOTION_TRUTH = ("eye", "brow", "yaw")
MODES = ("audio", "motion", "both")
METRIC_KEYS = ("mouth_corr", "eye_corr", "yaw_corr", "mouth_leak", "eye_leak", "yaw_leak", "psnr_static")
START = np.array([0.3, 0.75, 0.5, 0.0])
LOWER = np.array([0.0, 0.0, 0.0, -45.0])
UPPER = np.array([1.0, 1.0, 1.0, 45.0])
FD_STEP = np.array([0.02, 0.02, 0.02, 0.5])
YAW_GRID = np.arange(-35.0, 35.1, 5.0)
OPEN_GRID = np.linspace(0.0, 1.0, 11)
LM_STEPS = 5
BLUR_SIGMA = 1.0                 # frames and renders are compared blurred ...
RENDER_SIGMAS = (1.0, 1.4, 1.8)  # ... renders by the one of these that fits the clip best (frames sharp or blurred)
BLUR_WIDTH = 64                  # the blurs above are pixels of a frame this wide; they scale with the frame width
PROBE_FRAMES = 4                 # frames the blur is chosen on
# Below these standard deviations a measured series counts as still: the fit's crosstalk between features on
# exact renders is < 1e-3 (mouth, eye) and < 0.01 deg (yaw).
RESOLUTION = dict(mouth=0.01, eye=0.01, yaw=0.1)
PSNR_CAP = 100.0   # dB reported for identical pixels (JSON has no infinity)


def _blur(frames: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur (sigma pixels) of (N, H, W, 3) frames."""
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(frames, (0, sigma, sigma, 0), mode="nearest")


def _render(appearance: synthetic.Appearance, theta: np.ndarray, height: int, width: int, sigma: float) -> np.ndarray:
    """theta (N, 4) = PARAMS -> (N, H, W, 3) float32 frames in [0, 255], unrounded (a smooth error), blurred."""
    fields = {name: theta[:, i].astype(np.float32) for i, name in enumerate(PARAMS)}
    return _blur(synthetic.render_face(synthetic.FaceParams(appearance, **fields), height, width) * 255.0, sigma)


def _errors(renders: np.ndarray, frames: np.ndarray) -> np.ndarray:
    """renders (T, K, H, W, 3), frames (T, H, W, 3) -> (T, K) summed squared error."""
    return ((renders - frames[:, None]) ** 2).sum((2, 3, 4))


def _fit(target: np.ndarray, appearance: synthetic.Appearance, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Blurred frames (T, H, W, 3) -> (theta (T, 4), squared error (T,)) of renders blurred by sigma."""
    count, height, width, _ = target.shape
    grid = np.tile(START, (count, len(YAW_GRID), 1))
    grid[..., 3] = YAW_GRID
    renders = _render(appearance, grid.reshape(-1, 4), height, width, sigma).reshape(
        count, len(YAW_GRID), height, width, 3)
    theta = grid[np.arange(count), np.argmin(_errors(renders, target), axis=1)]
    # Eyes and mouth on a joint grid: the eyes lie above the nose centre, the mouth below it, so each half's
    # error depends on one of them only (the brows stay fixed).
    grid = np.repeat(theta[:, None], len(OPEN_GRID), axis=1)
    grid[..., 0] = grid[..., 1] = OPEN_GRID
    renders = _render(appearance, grid.reshape(-1, 4), height, width, sigma).reshape(
        count, len(OPEN_GRID), height, width, 3)
    split = int(round(appearance.cy * height + appearance.ry * height * synthetic.GEOMETRY["nose_v"]))
    theta[:, 0] = OPEN_GRID[np.argmin(_errors(renders[:, :, split:], target[:, split:]), axis=1)]
    theta[:, 1] = OPEN_GRID[np.argmin(_errors(renders[:, :, :split], target[:, :split]), axis=1)]
    base = _render(appearance, theta, height, width, sigma)
    error = ((base - target) ** 2).sum((1, 2, 3))
    damping = np.full(count, 1e-2)
    for _ in range(LM_STEPS):
        shifted = theta[:, None, :] + np.diag(FD_STEP)[None]
        jac = (_render(appearance, shifted.reshape(-1, 4), height, width, sigma).reshape(count, 4, -1)
               - base.reshape(count, 1, -1)) / FD_STEP[None, :, None]
        residual = (base - target).reshape(count, -1)
        normal = np.einsum("tip,tjp->tij", jac, jac)
        grad = np.einsum("tip,tp->ti", jac, residual)
        diagonal = np.einsum("tii->ti", normal) + 1e-6
        system = normal + (damping[:, None] * diagonal)[:, :, None] * np.eye(4)
        trial = np.clip(theta - np.linalg.solve(system, grad[..., None])[..., 0], LOWER, UPPER)
        trial_render = _render(appearance, trial, height, width, sigma)
        trial_error = ((trial_render - target) ** 2).sum((1, 2, 3))
        better = trial_error < error
        theta = np.where(better[:, None], trial, theta)
        base = np.where(better[:, None, None, None], trial_render, base)
        error = np.where(better, trial_error, error)
        damping = np.where(better, damping * 0.3, damping * 10.0)
    return theta, error


def fit_motion(frames: np.ndarray, appearance: synthetic.Appearance) -> dict[str, np.ndarray]:
    """frames (T, H, W, 3) uint8 of one synthetic face -> fitted mouth, eye, brow in [0, 1], yaw (deg), (T,) each."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"fit_motion expects frames (T, H, W, 3), got shape {frames.shape}")
    scale = frames.shape[2] / BLUR_WIDTH
    target = _blur(frames.astype(np.float32), BLUR_SIGMA * scale)
    probe = target[::max(1, len(target) // PROBE_FRAMES)][:PROBE_FRAMES]
    sigma = min((s * scale for s in RENDER_SIGMAS), key=lambda s: _fit(probe, appearance, s)[1].sum())
    theta, _ = _fit(target, appearance, sigma)
    return {name: theta[:, i].astype(np.float32) for i, name in enumerate(PARAMS)}


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two (T,) series; 0 when either is constant."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    a, b = a - a.mean(), b - b.mean()
    norm = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / norm) if norm > 1e-12 else 0.0


def clip_scores(measured: dict[str, np.ndarray], truth: dict[str, np.ndarray]) -> dict[str, float]:
    """Correlations of one clip: '<quantity>~<truth>' for every measured quantity and ground-truth signal.

    A measured series whose standard deviation is below its `RESOLUTION` did not move: correlation 0.
    """
    moved = {q: float(np.std(measured[q])) >= RESOLUTION[q] for q in QUANTITIES}
    return {f"{q}~{k}": pearson(measured[q], truth[k]) if moved[q] else 0.0
            for q in QUANTITIES for k in ("mouth", *MOTION_TRUTH)}


def static_mask(truth_frames: np.ndarray) -> np.ndarray:
    """Pixels (H, W) bool that no ground-truth frame (T, H, W, 3) changes: background, hair, still skin."""
    truth_frames = np.asarray(truth_frames)
    return np.all(truth_frames == truth_frames[:1], axis=(0, 3))


def masked_psnr(frames: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> float:
    """PSNR (dB, capped at PSNR_CAP) of frames (T, H, W, 3) against reference (H, W, 3) inside mask (H, W)."""
    if not mask.any():
        raise ValueError("masked_psnr: the mask selects no pixel")
    diff = np.asarray(frames, np.float64)[:, mask] - np.asarray(reference, np.float64)[mask]
    mse = float(np.mean(diff ** 2))
    return PSNR_CAP if mse <= 255.0 ** 2 * 10 ** (-PSNR_CAP / 10) else float(10 * np.log10(255.0 ** 2 / mse))


def _clip_means(scores: list[dict[str, float]]) -> dict[str, float]:
    """Per-clip `clip_scores` -> their means over clips, key by key."""
    return {key: float(np.mean([s[key] for s in scores])) for key in scores[0]}


def _mouth_leak(mean: dict[str, float]) -> float:
    """The clip-averaged 'mouth~<motion truth>' correlation largest in magnitude."""
    return max((mean[f"mouth~{k}"] for k in MOTION_TRUTH), key=abs)


def chance_mouth_leak(truths: list[dict[str, np.ndarray]]) -> float:
    """`mouth_leak` of the clips' own speech-driven mouth truth against their motion truth (one (T,) dict per clip),
    scored by `clip_scores` as a measured mouth is.

    A synthetic clip's mouth is drawn independently of its motion, so this is what a mouth that moves like speech,
    independently of the motion, scores on these clips by chance (per clip the correlation of two independent
    smooth series of the demo's 25 frames spreads by ~0.24; over 8 such clips the score's magnitude has median
    ~0.11).
    """
    if not truths:
        raise ValueError("chance_mouth_leak: no clips")
    return _mouth_leak(_clip_means([clip_scores(truth, truth) for truth in truths]))


def mode_metrics(mode: str, scores: list[dict[str, float]], psnrs: list[float]) -> dict[str, float | None]:
    """Clip-averaged metrics M (keys METRIC_KEYS) of one control mode from per-clip `clip_scores` and PSNRs."""
    if mode not in MODES:
        raise ValueError(f"unknown control mode {mode!r}; expected one of {MODES}")
    if not scores or len(scores) != len(psnrs):
        raise ValueError(f"mode {mode!r}: need one score and one PSNR per clip, got {len(scores)} and {len(psnrs)}")
    mean = _clip_means(scores)
    audio, motion = mode in ("audio", "both"), mode in ("motion", "both")
    mouth_leak = _mouth_leak(mean)
    return dict(
        mouth_corr=mean["mouth~mouth"] if audio else None,
        eye_corr=mean["eye~eye"] if motion else None,
        yaw_corr=mean["yaw~yaw"] if motion else None,
        mouth_leak=mouth_leak if motion else None,
        eye_leak=mean["eye~mouth"] if audio else None,
        yaw_leak=mean["yaw~mouth"] if audio else None,
        psnr_static=float(np.mean(psnrs)),
    )
