"""Video metrics on numpy arrays: PSNR, SSIM, Fréchet distance (FID / FVD), landmark lip sync, identity.

    psnr(pred, ref)                     # (T, H, W, 3) uint8 each -> dB (inf when identical)
    ssim(pred, ref)                     # mean per-frame SSIM (scikit-image, Gaussian weights as Wang et al.)
    frechet_distance(feats_a, feats_b)  # (N, D) each -> ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 sqrt(S_a S_b))
    mouth_opening(landmarks)            # (T, 68, 2) dlib points -> (T,) inner-lip gap / inter-ocular distance
    audio_energy(wav, T, fps)           # (S,) 16 kHz -> (T,) RMS over each frame's samples
    cosine(a, b)                        # identity embeddings (D,) -> cosine similarity
"""

import warnings

import numpy as np

from actalker_jax.data import synthetic
from actalker_jax.eval import EvalError

INNER_LIP_PAIRS = ((61, 67), (62, 66), (63, 65))   # iBUG 68: upper / lower inner lip
EYE_OUTER = (36, 45)


def _pair(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape or pred.ndim != 4 or pred.shape[-1] != 3:
        raise EvalError(f"pred and ref must both be (T, H, W, 3) of one shape, got {pred.shape} and {ref.shape}")
    return pred, ref


def psnr(pred: np.ndarray, ref: np.ndarray) -> float:
    """PSNR (dB) of uint8 videos (T, H, W, 3) over all frames; inf for identical videos."""
    pred, ref = _pair(pred, ref)
    mse = float(np.mean((pred.astype(np.float64) - ref.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def ssim(pred: np.ndarray, ref: np.ndarray) -> float:
    """Mean per-frame SSIM of uint8 videos (T, H, W, 3) (Gaussian window sigma 1.5, as Wang et al. 2004)."""
    from skimage.metrics import structural_similarity

    pred, ref = _pair(pred, ref)
    return float(np.mean([structural_similarity(p, r, channel_axis=-1, data_range=255, gaussian_weights=True,
                                                sigma=1.5, use_sample_covariance=False) for p, r in zip(pred, ref)]))


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance of Gaussians fitted to features (N, D) and (M, D), N, M >= 2 (pytorch-fid's formula)."""
    from scipy import linalg

    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise EvalError(f"Fréchet distance needs >= 2 feature vectors of one size per set, got {a.shape} and "
                        f"{b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings():      # few samples: singular covariances are expected, handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(root).all():
        offset = np.eye(len(cov_a)) * 1e-6
        root = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    root = root.real
    return float(max(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root), 0.0))


def mouth_opening(landmarks: np.ndarray) -> np.ndarray:
    """dlib 68-point landmarks (T, 68, 2) -> (T,) mean inner-lip gap divided by the outer-eye-corner distance."""
    points = np.asarray(landmarks, np.float64)
    gap = np.mean([np.linalg.norm(points[:, a] - points[:, b], axis=-1) for a, b in INNER_LIP_PAIRS], axis=0)
    eyes = np.linalg.norm(points[:, EYE_OUTER[0]] - points[:, EYE_OUTER[1]], axis=-1)
    return gap / np.maximum(eyes, 1e-6)


def audio_energy(wav: np.ndarray, num_frames: int, fps: float, sample_rate: int = 16000) -> np.ndarray:
    """RMS of the audio samples of each video frame: (S,) -> (T,)."""
    return np.sqrt(synthetic.frame_means(np.asarray(wav, np.float64) ** 2, num_frames, fps, sample_rate))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two embeddings (D,)."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))
