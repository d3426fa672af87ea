"""Synthetic talking faces: procedural faces whose mouth follows speech-like audio, with independent motion.

    python -m actalker_jax.data.synthetic --out DIR --num-clips N [--seed S] [--frames T] [--size 64] [--fps 12.5]
                                          [--workers W] [--clips-per-shard 64] [--factor 4]

Writes DIR/clips/clip_NNNNNN.{mp4,wav,npz,json} (H.264 yuv420p video, 16 kHz mono int16 wav, per-frame ground
truth, JSON summary) and DIR/records/shard_NNNNN.array_record + DIR/records/manifest.json (training records
encoded with `demo_encoders`). Clip i draws everything from SeedSequence([seed, i]) (independent child streams
for appearance, audio and motion), so clips can be made in any order or in parallel with identical results.

Content of a clip (T frames at fps, size x size pixels):
- appearance (static, random): background / skin / hair / lip colours, face centre and radii;
- audio: voiced syllables (glottal pulse train through three formant resonators, random vowel, pitch, timing and
  loudness) plus a faint noise floor; the loudness envelope (frame mean) is the mouth opening in [0, 1];
- motion (independent of the audio): eye openness, brow height in [0, 1] and head yaw in degrees follow smooth
  random signals (Gaussian-filtered noise); blinks (a Poisson process) close the eyes.

Renderer: `render_face(FaceParams, height, width) -> (H, W, 3)` (or (T, H, W, 3) when the motion fields are (T,)
arrays; jax arrays for the motion fields or face centre / radii make it traceable and differentiable) draws
anti-aliased ellipses (signed-distance coverage) from `face_geometry`, which gives every feature's ellipse
(centre x, y, half-width, half-height in pixels) and is the fit-friendly description of the frame: yaw moves a
feature at normalised face position (u, v) with depth d to u cos(yaw) + d sin(yaw) and scales its width by
cos(yaw) - u / d sin(yaw) (clipped to [0.2, 1]). `GEOMETRY` holds the constants, `motion_from_geometry` maps fitted
ellipses back to (mouth, eye, brow, yaw), `clip_boxes` / `keypoints` give boxes and landmark-like points.

Record fields (see `records.py`): latents = pixel_unshuffle(2 frame - 1, f) (T, H/f, W/f, 3 f^2), f = --factor (4); audio = log-mel
windows (T, 8, 1, 16); motion = [eye openness, brow height, blink] (T, 3); pose = [yaw deg, 0, 0, 0, 0, 0];
id_embed = `Appearance.vector()` (16,) = [background, skin, hair, lips RGB, cx / W, cy / H, rx / W, ry / H];
mask_audio = union of the mouth boxes over the clip dilated by `MOUTH_MARGIN` face half-widths (and 1 pixel);
mask_motion = face box minus mask_audio; face_box = the face ellipse's box; motion_buckets from `motion_buckets`.
"""

import argparse
import dataclasses
import json
import multiprocessing
import os
import time
import wave
from fractions import Fraction
from typing import Any

import numpy as np

from actalker_jax.data import demo_encoders, records

SAMPLE_RATE = 16000
EXPRESSION_KEYS = ("eye", "brow", "blink")
EXPRESSION_DIM = len(EXPRESSION_KEYS)
ID_DIM = 16
MAX_YAW = 25.0          # degrees
MOUTH_MARGIN = 0.1      # mask dilation in face half-widths
MEAN_OPEN_EYE = 0.6     # eye openness between blinks: MEAN_OPEN_EYE + 0.35 tanh(smooth signal)
BLINK_DEPTH = 0.95      # a full blink keeps 1 - BLINK_DEPTH of the openness

# Geometry in face units: u in face half-widths (rx, + = image right), v in face half-heights (ry, + = down),
# sizes as half-width (rx units) x half-height (ry units); d = depth on the head (rx units) for the yaw projection.
GEOMETRY = dict(
    eye_u=0.38, eye_v=-0.08, eye_depth=0.9, eye_w=0.22, eye_h=0.2, eye_h_closed=0.0, pupil_r=0.09,
    brow_u=0.38, brow_v_low=-0.36, brow_v_range=0.16, brow_depth=0.85, brow_w=0.2, brow_h=0.06,
    nose_v=0.21, nose_depth=1.15, nose_w=0.08, nose_h=0.1,
    mouth_v=0.53, mouth_depth=0.85, mouth_w=0.3, mouth_inner_w=0.24, lip_h=0.035, mouth_open_h=0.15,
    hair_v=-0.15, hair_w=1.12, hair_h=1.0, hair_shift=0.1, fringe_v=-0.95, fringe_w=0.95, fringe_h=0.35,
    neck_v=1.1, neck_w=0.45, neck_h=0.6,
)
SCLERA = (1.0, 1.0, 1.0)
PUPIL = (0.08, 0.08, 0.12)
MOUTH_INSIDE = (0.25, 0.04, 0.07)
SKIN_TONES = np.array([[0.96, 0.80, 0.69], [0.90, 0.72, 0.56], [0.78, 0.57, 0.42], [0.62, 0.43, 0.30],
                       [0.45, 0.31, 0.22], [0.87, 0.68, 0.60]])
VOWELS = np.array([[730, 1090, 2440], [270, 2290, 3010], [300, 870, 2240], [530, 1840, 2480], [570, 840, 2410],
                   [660, 1720, 2410]], dtype=np.float64)   # formants F1-F3 (Hz) of a, i, u, e, o, ae


@dataclasses.dataclass(frozen=True)
class Appearance:
    """Static look of a clip: colours RGB in [0, 1]; face centre / radii as fractions of width (x) / height (y)."""

    background: tuple[float, float, float]
    skin: tuple[float, float, float]
    hair: tuple[float, float, float]
    lips: tuple[float, float, float]
    cx: float
    cy: float
    rx: float
    ry: float

    def vector(self) -> np.ndarray:
        """The identity embedding (ID_DIM,) float32: [background, skin, hair, lips, cx, cy, rx, ry]."""
        return np.array([*self.background, *self.skin, *self.hair, *self.lips, self.cx, self.cy, self.rx, self.ry],
                        dtype=np.float32)

    @classmethod
    def from_vector(cls, vector) -> "Appearance":
        """Inverse of `vector` (ID_DIM,)."""
        v = [float(x) for x in np.asarray(vector).reshape(-1)]
        if len(v) != ID_DIM:
            raise ValueError(f"appearance vector must have {ID_DIM} values, got {len(v)}")
        return cls(tuple(v[0:3]), tuple(v[3:6]), tuple(v[6:9]), tuple(v[9:12]), *v[12:16])


@dataclasses.dataclass(frozen=True)
class FaceParams:
    """Everything `render_face` draws: appearance plus motion (scalars, or (T,) arrays for a clip).

    mouth, eye, brow in [0, 1] (0 = closed mouth / closed eyes / lowest brows); yaw in degrees (+ = the face turns
    towards the image right).
    """

    appearance: Appearance
    mouth: Any = 0.0
    eye: Any = 1.0
    brow: Any = 0.5
    yaw: Any = 0.0


def _xp(*values):
    """numpy, or jax.numpy when any value is a jax array (the renderer is differentiable under jax)."""
    for value in values:
        if type(value).__module__.startswith("jax"):
            import jax.numpy as jnp

            return jnp
    return np


def face_geometry(params: FaceParams, height: int, width: int) -> dict[str, tuple]:
    """Ellipses of every feature in pixels: name -> (centre x, centre y, half-width, half-height).

    Each value is a scalar or has the shape of the motion fields ((T,) for a clip). Names: neck, hair, face,
    fringe, nose, left_brow, right_brow, left_eye, right_eye, left_pupil, right_pupil, mouth, mouth_inner
    ("left" = image left). Pixel (i, j) has its centre at (j + 0.5, i + 0.5).
    """
    a, g = params.appearance, GEOMETRY
    xp = _xp(params.mouth, params.eye, params.brow, params.yaw, a.cx, a.cy, a.rx, a.ry)
    cx, cy, rx, ry = a.cx * width, a.cy * height, a.rx * width, a.ry * height
    yaw = xp.asarray(params.yaw) * (np.pi / 180.0)
    cos, sin = xp.cos(yaw), xp.sin(yaw)
    mouth, eye, brow = xp.asarray(params.mouth), xp.asarray(params.eye), xp.asarray(params.brow)

    def place(u, v, depth, half_w, half_h):
        x = cx + rx * (u * cos + depth * sin)
        scale = xp.clip(cos - (u / depth) * sin, 0.2, 1.0)
        return x, cy + ry * v, rx * half_w * scale, ry * half_h

    brow_v = g["brow_v_low"] - g["brow_v_range"] * brow
    eye_h = g["eye_h_closed"] + (g["eye_h"] - g["eye_h_closed"]) * eye
    geometry = dict(
        neck=(cx, cy + ry * g["neck_v"], rx * g["neck_w"], ry * g["neck_h"]),
        hair=(cx - rx * g["hair_shift"] * sin, cy + ry * g["hair_v"], rx * g["hair_w"], ry * g["hair_h"]),
        face=(cx, cy, rx, ry),
        fringe=(cx, cy + ry * g["fringe_v"], rx * g["fringe_w"], ry * g["fringe_h"]),
        nose=place(0.0, g["nose_v"], g["nose_depth"], g["nose_w"], g["nose_h"]),
        mouth=place(0.0, g["mouth_v"], g["mouth_depth"], g["mouth_w"], g["lip_h"] + g["mouth_open_h"] * mouth),
        mouth_inner=place(0.0, g["mouth_v"], g["mouth_depth"], g["mouth_inner_w"], g["mouth_open_h"] * mouth),
    )
    for side, sign in (("left", -1.0), ("right", 1.0)):
        geometry[f"{side}_brow"] = place(sign * g["brow_u"], brow_v, g["brow_depth"], g["brow_w"], g["brow_h"])
        geometry[f"{side}_eye"] = place(sign * g["eye_u"], g["eye_v"], g["eye_depth"], g["eye_w"], eye_h)
        ex, ey, _, _ = geometry[f"{side}_eye"]
        geometry[f"{side}_pupil"] = (ex, ey, rx * g["pupil_r"], rx * g["pupil_r"])
    return geometry


def ellipse_coverage(ellipse: tuple, height: int, width: int, xp=np, window: tuple | None = None):
    """Anti-aliased coverage in [0, 1] of an ellipse (cx, cy, a, b), shape (..., H, W) for (...)-shaped entries.

    First-order signed distance (q - 1) / |grad q| with q = (dx / a)^2 + (dy / b)^2, coverage = 0.5 - distance;
    half-axes below half a pixel are drawn at half a pixel with coverage scaled by 2 a (2 b), so a vanishing
    ellipse fades out continuously. window (y0, y1, x0, x1): evaluate only those pixel rows / columns.
    """
    y0, y1, x0, x1 = (0, height, 0, width) if window is None else window
    cx, cy, a, b = (xp.asarray(v, dtype=xp.float32)[..., None, None] for v in ellipse)
    ys = xp.arange(y0, y1, dtype=xp.float32)[:, None] + 0.5
    xs = xp.arange(x0, x1, dtype=xp.float32)[None, :] + 0.5
    a_eff, b_eff = xp.maximum(a, 0.5), xp.maximum(b, 0.5)
    dx, dy = (xs - cx) / a_eff, (ys - cy) / b_eff
    q = dx * dx + dy * dy
    grad = 2.0 * xp.sqrt(dx * dx / (a_eff * a_eff) + dy * dy / (b_eff * b_eff) + 1e-12)
    coverage = xp.clip(0.5 - (q - 1.0) / grad, 0.0, 1.0)
    return coverage * xp.clip(2.0 * a, 0.0, 1.0) * xp.clip(2.0 * b, 0.0, 1.0)


def coverage_window(ellipse: tuple, height: int, width: int) -> tuple[int, int, int, int]:
    """Pixel rows / columns (y0, y1, x0, x1) outside which `ellipse_coverage` is 0 in every frame.

    The first-order distance spills beyond the box by at most ~0.15 x the axis ratio for thin ellipses (measured),
    so the box is padded by 1.5 + 0.25 x ratio pixels.
    """
    cx, cy, a, b = (np.asarray(v, np.float64) for v in ellipse)
    a, b = np.maximum(a, 0.5), np.maximum(b, 0.5)
    margin = 1.5 + 0.25 * np.maximum(a / b, b / a)
    y0, y1 = np.clip([np.floor(np.min(cy - b - margin)), np.ceil(np.max(cy + b + margin))], 0, height)
    x0, x1 = np.clip([np.floor(np.min(cx - a - margin)), np.ceil(np.max(cx + a + margin))], 0, width)
    return int(y0), int(y1), int(x0), int(x1)


def render_face(params: FaceParams, height: int, width: int):
    """Frame(s) float32 in [0, 1]: (H, W, 3) for scalar motion fields, (T, H, W, 3) for (T,) fields.

    numpy inputs paint each ellipse inside its `coverage_window` only; jax inputs (traceable, differentiable)
    evaluate every ellipse on the whole image. Both give the same frames.
    """
    if height < 8 or width < 8:
        raise ValueError(f"image size must be at least 8x8, got {height}x{width}")
    a = params.appearance
    xp = _xp(params.mouth, params.eye, params.brow, params.yaw, a.cx, a.cy, a.rx, a.ry)
    geometry = face_geometry(params, height, width)
    motion = (params.mouth, params.eye, params.brow, params.yaw)
    lead = xp.broadcast_shapes(*(xp.shape(xp.asarray(v)) for v in motion))
    skin = np.asarray(a.skin, np.float32)
    hair = np.asarray(a.hair, np.float32)
    image = xp.zeros((*lead, height, width, 3), xp.float32) + xp.asarray(np.asarray(a.background, np.float32))

    def paint(image, ellipse, colour, clip_to=None):
        """Paints `ellipse` (intersected with the ellipse `clip_to`) in `colour`."""
        colour = xp.asarray(np.asarray(colour, np.float32))
        if xp is not np:
            coverage = ellipse_coverage(ellipse, height, width, xp)
            if clip_to is not None:
                coverage = coverage * ellipse_coverage(clip_to, height, width, xp)
            return image + coverage[..., None] * (colour - image)
        window = coverage_window(ellipse, height, width)
        coverage = ellipse_coverage(ellipse, height, width, np, window)
        if clip_to is not None:
            coverage = coverage * ellipse_coverage(clip_to, height, width, np, window)
        y0, y1, x0, x1 = window
        patch = image[..., y0:y1, x0:x1, :]
        patch += coverage[..., None] * (colour - patch)
        return image

    g = geometry
    image = paint(image, g["neck"], skin * 0.85)
    image = paint(image, g["hair"], hair)
    image = paint(image, g["face"], skin)
    image = paint(image, g["fringe"], hair, clip_to=g["face"])
    image = paint(image, g["nose"], skin * 0.82)
    for side in ("left", "right"):
        image = paint(image, g[f"{side}_brow"], hair * 0.6)
        x, y, w, h = g[f"{side}_eye"]
        image = paint(image, (x, y, w + 0.5, h + 0.5), PUPIL)
        image = paint(image, g[f"{side}_eye"], SCLERA)
        image = paint(image, g[f"{side}_pupil"], PUPIL, clip_to=g[f"{side}_eye"])
    image = paint(image, g["mouth"], a.lips)
    image = paint(image, g["mouth_inner"], MOUTH_INSIDE)
    return image.astype(xp.float32)


def motion_from_geometry(geometry: dict[str, tuple], appearance: Appearance, height: int, width: int
                         ) -> dict[str, np.ndarray]:
    """Inverts `face_geometry` for the motion: mouth, eye, brow in [0, 1] and yaw in degrees from fitted ellipses.

    yaw = asin((nose x - cx) / (rx nose_depth)); eye = (eye half-height / ry - eye_h_closed) / (eye_h -
    eye_h_closed) (mean of both eyes); brow = (brow_v_low - (brow y - cy) / ry) / brow_v_range (mean of both);
    mouth = (outer lip half-height / ry - lip_h) / mouth_open_h. Needs only the nose, eye, brow and mouth entries.
    """
    g = GEOMETRY
    cx, cy = appearance.cx * width, appearance.cy * height
    rx, ry = appearance.rx * width, appearance.ry * height
    sin = np.clip((np.asarray(geometry["nose"][0]) - cx) / (rx * g["nose_depth"]), -1, 1)
    eye_h = np.mean([np.asarray(geometry[f"{s}_eye"][3]) for s in ("left", "right")], axis=0) / ry
    brow_y = np.mean([np.asarray(geometry[f"{s}_brow"][1]) for s in ("left", "right")], axis=0)
    return dict(mouth=(np.asarray(geometry["mouth"][3]) / ry - g["lip_h"]) / g["mouth_open_h"],
                eye=(eye_h - g["eye_h_closed"]) / (g["eye_h"] - g["eye_h_closed"]),
                brow=(g["brow_v_low"] - (brow_y - cy) / ry) / g["brow_v_range"],
                yaw=np.degrees(np.arcsin(sin)))


def ellipse_box(ellipse: tuple) -> np.ndarray:
    """Box (x0, y0, x1, y1) of an ellipse (cx, cy, a, b), united over the frames when the entries are (T,)."""
    cx, cy, a, b = (np.asarray(v, np.float64) for v in ellipse)
    return np.array([np.min(cx - a), np.min(cy - b), np.max(cx + a), np.max(cy + b)], dtype=np.float32)


def keypoints(params: FaceParams, height: int, width: int) -> np.ndarray:
    """Landmark-like points (..., 11, 2) in pixels: nose, eye tops / bottoms, brows, lip top / bottom / corners."""
    g = face_geometry(params, height, width)
    points = [(g["nose"][0], g["nose"][1])]
    for side in ("left", "right"):
        x, y, _, h = g[f"{side}_eye"]
        points += [(x, y - h), (x, y + h), g[f"{side}_brow"][:2]]
    x, y, w, h = g["mouth"]
    points += [(x, y - h), (x, y + h), (x - w, y), (x + w, y)]
    return np.stack([np.stack(np.broadcast_arrays(*map(np.asarray, p)), -1) for p in points], -2)


def motion_buckets(params: FaceParams, height: int, width: int) -> np.ndarray:
    """(head, expression) buckets (2,) int32 in [0, 128], spec §5 with the renderer's keypoints of a (T,) clip.

    scale = sqrt(face box area); head = mean_t |nose_t - mean_t nose| / scale * 256;
    expression = mean_{t, p} |k_{t,p} - mean_t k_{t,p}| / scale * 1024 with k = keypoints relative to the nose.
    """
    points = keypoints(params, height, width)
    if points.ndim != 3:
        raise ValueError(f"motion_buckets needs (T,) motion fields, got keypoints of shape {points.shape}")
    x0, y0, x1, y1 = ellipse_box(face_geometry(params, height, width)["face"])
    scale = np.sqrt((x1 - x0) * (y1 - y0))
    nose = points[:, 0]
    head = np.linalg.norm(nose - nose.mean(0), axis=-1).mean() / scale * 256
    rel = points[:, 1:] - nose[:, None]
    expression = np.linalg.norm(rel - rel.mean(0), axis=-1).mean() / scale * 1024
    return np.clip(np.array([head, expression]), 0, 128).astype(np.int32)


def clip_rngs(seed: int, index: int) -> dict[str, np.random.Generator]:
    """Independent generators for appearance, audio and motion of clip `index` under `seed`."""
    children = np.random.SeedSequence([int(seed), int(index)]).spawn(3)
    return {name: np.random.default_rng(child) for name, child in zip(("appearance", "audio", "motion"), children)}


def random_appearance(rng: np.random.Generator) -> Appearance:
    """Random colours (skin from a palette, jittered) and face placement."""
    skin = np.clip(SKIN_TONES[rng.integers(len(SKIN_TONES))] * rng.uniform(0.9, 1.05, 3), 0, 0.92)
    hair = rng.uniform(0.02, 0.55) * rng.uniform(0.5, 1.0, 3)
    lips = np.clip(skin * np.array([0.85, 0.45, 0.45]) + rng.uniform(-0.05, 0.05, 3), 0, 1)
    background = rng.uniform(0.1, 0.95, 3)
    rx = rng.uniform(0.28, 0.34)
    ry = rx * rng.uniform(1.15, 1.3)
    cx = rng.uniform(0.5 - 0.06, 0.5 + 0.06)
    cy = rng.uniform(0.51 - 0.03, 0.51 + 0.03)
    colours = [tuple(float(x) for x in c) for c in (background, skin, hair, lips)]
    return Appearance(*colours, float(cx), float(cy), float(rx), float(ry))


def _resonator(signal: np.ndarray, freq: float, bandwidth: float, sample_rate: int) -> np.ndarray:
    from scipy.signal import lfilter

    r = np.exp(-np.pi * bandwidth / sample_rate)
    theta = 2 * np.pi * freq / sample_rate
    return lfilter([1 - r], [1, -2 * r * np.cos(theta), r * r], signal)


def speech_audio(rng: np.random.Generator, num_samples: int, sample_rate: int = SAMPLE_RATE
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Speech-like audio: (wav (N,) float32 in [-1, 1], loudness envelope (N,) float32 in [0, 1]).

    Syllables of 100-280 ms (gaps 40-150 ms, sometimes a 300-800 ms pause) with a random vowel (formants jittered
    by +-10 %), pitch (clip base 90-230 Hz, per syllable x0.85-1.2 gliding x0.9-1.1) and loudness 0.35-1; each
    syllable is normalised to unit RMS before its envelope (25 ms raised-cosine attack, 50 ms release) is applied.
    """
    wav = np.zeros(num_samples)
    envelope = np.zeros(num_samples)
    base_f0 = rng.uniform(90, 230)
    start = rng.uniform(0.0, 0.3)
    while int(start * sample_rate) < num_samples:
        duration = rng.uniform(0.10, 0.28)
        amplitude = rng.uniform(0.35, 1.0)
        f0 = base_f0 * rng.uniform(0.85, 1.2) * np.linspace(1.0, rng.uniform(0.9, 1.1), int(duration * sample_rate))
        formants = VOWELS[rng.integers(len(VOWELS))] * rng.uniform(0.9, 1.1, 3)
        gap = rng.uniform(0.3, 0.8) if rng.uniform() < 0.15 else rng.uniform(0.04, 0.15)
        phase = np.cumsum(f0) / sample_rate
        pulses = np.diff(np.floor(phase), prepend=0.0)
        source = _resonator(pulses, 0.0, 300.0, sample_rate)
        for freq, bandwidth in zip(formants, (80.0, 100.0, 150.0)):
            source = _resonator(source, freq, bandwidth, sample_rate)
        source += 0.05 * np.std(source) * rng.standard_normal(len(source))
        source /= np.sqrt(np.mean(source ** 2)) + 1e-12
        n = len(source)
        t = np.arange(n) / sample_rate
        attack = np.clip(t / 0.025, 0, 1)
        release = np.clip((duration - t) / 0.05, 0, 1)
        env = amplitude * np.sin(0.5 * np.pi * np.minimum(attack, release)) ** 2
        begin = int(start * sample_rate)
        end = min(begin + n, num_samples)
        wav[begin:end] += 0.25 * env[:end - begin] * source[:end - begin]
        envelope[begin:end] = np.maximum(envelope[begin:end], env[:end - begin])
        start += duration + gap
    wav += 1e-3 * rng.standard_normal(num_samples)
    return np.clip(wav, -1, 1).astype(np.float32), envelope.astype(np.float32)


def smooth_signal(rng: np.random.Generator, num_frames: int, fps: float, sigma_s: float = 0.35) -> np.ndarray:
    """Gaussian-filtered white noise (T,) float64 with unit variance in expectation (sigma in seconds)."""
    sigma = sigma_s * fps
    radius = int(np.ceil(3 * sigma))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= np.sqrt(np.sum(kernel ** 2))
    return np.convolve(rng.standard_normal(num_frames + 2 * radius), kernel, mode="valid")


def random_motion(rng: np.random.Generator, num_frames: int, fps: float) -> dict[str, np.ndarray]:
    """Motion ground truth (T,) float32 each: eye (with blinks), brow, yaw (degrees), blink (closure in [0, 1])."""
    eye_base = MEAN_OPEN_EYE + 0.35 * np.tanh(smooth_signal(rng, num_frames, fps))
    brow = 0.5 + 0.4 * np.tanh(smooth_signal(rng, num_frames, fps))
    yaw = MAX_YAW * np.tanh(0.8 * smooth_signal(rng, num_frames, fps, sigma_s=0.5))
    duration = num_frames / fps
    times = np.cumsum(rng.exponential(1 / 0.35, size=int(duration * 2) + 4)) - rng.uniform(0, 2.0)
    centres = (np.arange(num_frames) + 0.5) / fps
    blink = np.max(np.clip(1 - np.abs(centres[:, None] - times[None, :]) / 0.12, 0, 1), axis=1)
    eye = eye_base * (1 - BLINK_DEPTH * blink)
    return {k: v.astype(np.float32) for k, v in dict(eye=eye, brow=brow, yaw=yaw, blink=blink).items()}


def frame_means(signal: np.ndarray, num_frames: int, fps: float, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Mean of a per-sample signal over each video frame's samples [t sr / fps, (t + 1) sr / fps): (T,)."""
    bounds = np.round(np.arange(num_frames + 1) * sample_rate / fps).astype(np.int64)
    sums = np.concatenate([[0.0], np.cumsum(np.asarray(signal, np.float64))])
    return ((sums[bounds[1:]] - sums[bounds[:-1]]) / np.maximum(bounds[1:] - bounds[:-1], 1)).astype(np.float32)


def generate_clip(seed: int, index: int, num_frames: int = 25, size: int = 64, fps: float = 12.5) -> dict:
    """One clip's arrays: frames (T, H, W, 3) uint8, wav (N,) float32, ground truth, appearance, params."""
    _check_args(num_frames, size, fps)
    rngs = clip_rngs(seed, index)
    appearance = random_appearance(rngs["appearance"])
    num_samples = int(round(num_frames * SAMPLE_RATE / fps))
    wav, envelope = speech_audio(rngs["audio"], num_samples)
    motion = random_motion(rngs["motion"], num_frames, fps)
    mouth = np.clip(frame_means(envelope, num_frames, fps), 0, 1)
    params = FaceParams(appearance, mouth=mouth, eye=motion["eye"], brow=motion["brow"], yaw=motion["yaw"])
    frames = np.round(np.clip(render_face(params, size, size), 0, 1) * 255).astype(np.uint8)
    truth = dict(mouth=mouth, eye=motion["eye"], brow=motion["brow"], yaw=motion["yaw"], blink=motion["blink"])
    return dict(seed=int(seed), index=int(index), fps=float(fps), size=int(size), frames=frames, wav=wav,
                truth=truth, appearance=appearance, params=params)


def clip_boxes(params: FaceParams, size: int) -> dict[str, np.ndarray]:
    """Boxes (x0, y0, x1, y1) float32 in pixels united over the clip: face, mouth, left/right eye, left/right brow."""
    geometry = face_geometry(params, size, size)
    names = ("face", "mouth", "left_eye", "right_eye", "left_brow", "right_brow")
    return {name: ellipse_box(geometry[name]) for name in names}


def region_masks(params: FaceParams, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(mask_audio, mask_motion) (H, W) uint8: dilated union mouth box, and face box minus it."""
    boxes = clip_boxes(params, size)
    margin = MOUTH_MARGIN * params.appearance.rx * size + 1.0
    centres = np.arange(size) + 0.5

    def box_mask(box, pad):
        x0, y0, x1, y1 = box[0] - pad, box[1] - pad, box[2] + pad, box[3] + pad
        return ((centres[:, None] >= y0) & (centres[:, None] <= y1) & (centres[None, :] >= x0)
                & (centres[None, :] <= x1))

    mouth = box_mask(boxes["mouth"], margin)
    face = box_mask(boxes["face"], 0.0)
    return mouth.astype(np.uint8), (face & ~mouth).astype(np.uint8)


def motion_features(truth: dict) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth of a clip -> (expression (T, EXPRESSION_DIM) = [eye, brow, blink], pose (T, 6) = [yaw deg, 0...])."""
    expression = np.stack([truth[k] for k in EXPRESSION_KEYS], axis=-1).astype(np.float32)
    pose = np.zeros((len(expression), 6), np.float32)
    pose[:, 0] = truth["yaw"]
    return expression, pose


def clip_record(clip: dict, factor: int = demo_encoders.LATENT_FACTOR) -> dict[str, np.ndarray]:
    """The training record of a generated clip (schema of `records.py`), encoded with `demo_encoders`
    (latents: pixel_unshuffle with `factor`)."""
    frames, truth, params, size = clip["frames"], clip["truth"], clip["params"], clip["size"]
    num_frames = len(frames)
    images = frames.astype(np.float32) / 127.5 - 1.0
    latents = demo_encoders.pixel_unshuffle(images, factor)
    audio = demo_encoders.featurize_audio(clip["wav"], num_frames, clip["fps"])
    expression, pose = motion_features(truth)
    mask_audio, mask_motion = region_masks(params, size)
    return dict(
        latents=latents.astype(np.float16), audio=audio.astype(np.float16), motion=expression.astype(np.float16),
        pose=pose.astype(np.float16), id_embed=clip["appearance"].vector().astype(np.float16),
        mask_audio=mask_audio, mask_motion=mask_motion, face_box=clip_boxes(params, size)["face"],
        motion_buckets=motion_buckets(params, size, size), fps=np.float32(clip["fps"]),
        source=np.asarray(f"synthetic seed={clip['seed']} clip={clip['index']}"), version=np.int32(records.VERSION),
        gt_mouth=truth["mouth"].astype(np.float32), gt_eye=truth["eye"].astype(np.float32),
        gt_brow=truth["brow"].astype(np.float32), gt_yaw=truth["yaw"].astype(np.float32))


def write_mp4(path: str, frames: np.ndarray, fps: float) -> None:
    """(T, H, W, 3) uint8 -> H.264 yuv420p mp4 (H and W must be even)."""
    import av

    _, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"{path}: H.264 yuv420p needs an even frame size, got {height}x{width}")
    with av.open(path, mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000),
                                      options={"crf": "18", "preset": "fast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.thread_count = 1
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode(None))


def write_wav(path: str, wav: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Mono float waveform in [-1, 1] -> 16-bit PCM wav."""
    pcm = np.round(np.clip(wav, -1, 1) * 32767).astype("<i2")
    with wave.open(path, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(pcm.tobytes())


def clip_name(index: int) -> str:
    return f"clip_{index:06d}"


def write_clip_files(clip: dict, clips_dir: str) -> dict:
    """Writes mp4, wav, ground-truth npz and JSON summary of a clip; returns the summary."""
    os.makedirs(clips_dir, exist_ok=True)
    name = clip_name(clip["index"])
    base = os.path.join(clips_dir, name)
    write_mp4(base + ".mp4", clip["frames"], clip["fps"])
    write_wav(base + ".wav", clip["wav"])
    boxes = clip_boxes(clip["params"], clip["size"])
    np.savez(base + ".npz", **{k: v.astype(np.float32) for k, v in clip["truth"].items()},
             appearance=clip["appearance"].vector(), **{f"box_{k}": v for k, v in boxes.items()})
    summary = dict(
        name=name, seed=clip["seed"], index=clip["index"], frames=len(clip["frames"]), fps=clip["fps"],
        size=clip["size"], sample_rate=SAMPLE_RATE, samples=len(clip["wav"]),
        files={ext: name + "." + ext for ext in ("mp4", "wav", "npz")},
        appearance=dataclasses.asdict(clip["appearance"]),
        boxes={k: [float(x) for x in v] for k, v in boxes.items()},
        truth_range={k: [float(v.min()), float(v.max())] for k, v in clip["truth"].items()},
        motion_buckets=[int(x) for x in motion_buckets(clip["params"], clip["size"], clip["size"])],
    )
    with open(base + ".json", "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def _check_args(num_frames: int, size: int, fps: float) -> None:
    if num_frames < 1:
        raise ValueError(f"frames must be >= 1, got {num_frames}")
    if size < 8 or size % 2:
        raise ValueError(f"size must be >= 8 and even (H.264), got {size}")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")


def _make_clip(job: tuple) -> dict:
    """Worker: generate clip `index`, write its files, return its record."""
    seed, index, num_frames, size, fps, factor, clips_dir = job
    clip = generate_clip(seed, index, num_frames, size, fps)
    write_clip_files(clip, clips_dir)
    return clip_record(clip, factor)


_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _worker_pool(workers: int):
    """A spawn pool whose workers run single-threaded numpy (thread variables unset by the caller become "1")."""
    saved = {name: os.environ.get(name) for name in _THREAD_VARIABLES}
    try:
        for name in _THREAD_VARIABLES:
            os.environ.setdefault(name, "1")
        return multiprocessing.get_context("spawn").Pool(workers)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)


def generate_dataset(out: str, num_clips: int, seed: int = 0, num_frames: int = 25, size: int = 64,
                     fps: float = 12.5, workers: int = 1, clips_per_shard: int = 64,
                     factor: int = demo_encoders.LATENT_FACTOR) -> dict:
    """Generates `num_clips` clips into `out` (clips/, records/ + records/manifest.json); returns the manifest.

    factor: the pixel-unshuffle latent factor of the records (latents (T, size/f, size/f, 3 f^2))."""
    _check_args(num_frames, size, fps)
    if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 1 or size % factor:
        raise ValueError(f"size {size} is not divisible by the latent factor {factor!r} (a positive int)")
    if num_clips < 1 or clips_per_shard < 1 or workers < 1:
        raise ValueError(f"num_clips, clips_per_shard and workers must be >= 1, got {num_clips}, {clips_per_shard}, "
                         f"{workers}")
    clips_dir, records_dir = os.path.join(out, "clips"), os.path.join(out, "records")
    if os.path.isdir(records_dir) and any(n.endswith(records.SHARD_SUFFIX) for n in os.listdir(records_dir)):
        raise FileExistsError(f"{records_dir} already holds {records.SHARD_SUFFIX} shards; choose a new --out")
    os.makedirs(clips_dir, exist_ok=True)
    os.makedirs(records_dir, exist_ok=True)
    jobs = [(seed, i, num_frames, size, fps, factor, clips_dir) for i in range(num_clips)]
    start = time.time()
    pool = _worker_pool(workers) if workers > 1 else None
    try:
        made = pool.imap(_make_clip, jobs) if pool else map(_make_clip, jobs)
        shards = []
        for s in range(0, num_clips, clips_per_shard):
            name = f"shard_{s // clips_per_shard:05d}{records.SHARD_SUFFIX}"
            indices = list(range(s, min(s + clips_per_shard, num_clips)))
            records.write_shard(os.path.join(records_dir, name), (next(made) for _ in indices))
            shards.append(dict(path=name, clips=[clip_name(i) for i in indices]))
    finally:
        if pool:
            pool.close()
            pool.join()
    h = size // factor
    manifest = dict(
        source="actalker_jax.data.synthetic", version=records.VERSION, seed=seed, num_clips=num_clips,
        frames=num_frames, size=size, fps=fps, sample_rate=SAMPLE_RATE, shards=shards, clips_dir="../clips",
        encoders=dict(latents=f"pixel_unshuffle factor {factor} of frames in [-1, 1]", latent_factor=factor,
                      audio=dict(kind="log1p mel", n_fft=demo_encoders.N_FFT, hop=demo_encoders.HOP,
                                 n_mels=demo_encoders.N_MELS, window=demo_encoders.WINDOW),
                      motion=list(EXPRESSION_KEYS), pose="[yaw deg, 0, 0, 0, 0, 0]", id_embed="Appearance.vector"),
        shapes=dict(latents=[num_frames, h, h, 3 * factor ** 2],
                    audio=[num_frames, demo_encoders.WINDOW, 1, demo_encoders.N_MELS],
                    motion=[num_frames, EXPRESSION_DIM], pose=[num_frames, 6], id_embed=[ID_DIM],
                    mask_audio=[size, size]),
        seconds=round(time.time() - start, 3),
    )
    with open(os.path.join(records_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--num-clips", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frames", type=int, default=25)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--fps", type=float, default=12.5)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--clips-per-shard", type=int, default=64)
    parser.add_argument("--factor", type=int, default=demo_encoders.LATENT_FACTOR,
                        help="pixel-unshuffle latent factor of the records")
    args = parser.parse_args(argv)
    manifest = generate_dataset(args.out, args.num_clips, args.seed, args.frames, args.size, args.fps,
                                args.workers, args.clips_per_shard, args.factor)
    print(f"{args.num_clips} clips in {manifest['seconds']:.1f} s "
          f"({args.num_clips / max(manifest['seconds'], 1e-9):.2f} clips/s) -> {args.out}")
    return manifest


if __name__ == "__main__":
    main()
