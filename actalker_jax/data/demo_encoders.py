"""Demo encoders for the CPU demo on synthetic talking faces: fixed, deterministic, no weights.

Each one stands in for a frozen encoder of the paper model (a config choice; the model code is the same):

- `pixel_unshuffle` / `pixel_shuffle`: an exactly invertible "autoencoder" in place of the SVD VAE.
  Images (..., H, W, 3) in [-1, 1] -> latents (..., H/f, W/f, 3 f^2); f = 4 on 64x64 gives 16x16x48, the demo's
  f = 2 on 32x32 (config.media.latent_factor) 16x16x12.
  Channel order: latent[..., y, x, (fy * f + fx) * C + c] = image[..., y * f + fy, x * f + fx, c].
  The demo UNet sees [noisy latents ; reference latents], so its in_channels = 2 x latent channels (24 for f = 2)
  and its out_channels = latent channels (12).
- `log_mel` + `audio_windows` (= `featurize_audio`): log-mel frames in place of Whisper hidden states, windowed
  per video frame as spec §4 windows the Whisper states, in the record's `audio` layout (T, S, K=1, A=n_mels).
- The synthetic ground truth in place of the expression / pose / identity encoders (see `synthetic.py`).

Window arithmetic (`audio_windows`): feature frame j is centred on sample j * hop (time j * hop / sr); the STFT
pads the waveform with n_fft // 2 zeros on both sides, so there are M = len(wav) // hop + 1 frames. Video frame t
spans [t / fps, (t + 1) / fps) and is centred at (t + 0.5) / fps, i.e. at feature index
    c_t = floor((t + 0.5) * sr / (fps * hop) + 0.5)
and takes the S feature frames [c_t - S // 2, c_t - S // 2 + S), zeros where the index is outside [0, M).
At 16 kHz, hop 160 (100 Hz) and 12.5 fps: c_t = 8 t + 4, so S = 8 gives exactly the frames [8 t, 8 t + 8)
whose centres lie inside video frame t; at 25 fps, c_t = 4 t + 2 and S = 8 gives [4 t - 2, 4 t + 6).
Features are log1p(mel power) of a periodic-Hann STFT with HTK-mel triangular filters (peak 1): digital
silence and the zero padding are both exactly 0.
"""

import numpy as np

SAMPLE_RATE = 16000
N_FFT = 400          # 25 ms at 16 kHz
HOP = 160            # 10 ms at 16 kHz -> 100 feature frames per second
N_MELS = 16
WINDOW = 8           # feature frames per video frame (S)
LATENT_FACTOR = 4


def _check_factor(height: int, width: int, factor: int) -> None:
    if not isinstance(factor, (int, np.integer)) or factor < 1:
        raise ValueError(f"factor must be a positive integer, got {factor!r}")
    if height % factor or width % factor:
        raise ValueError(f"image size {height}x{width} is not divisible by factor {factor}")


def pixel_unshuffle(images, factor: int = LATENT_FACTOR):
    """(..., H, W, C) -> (..., H/f, W/f, C f^2). Works on numpy and jax arrays (reshape + transpose only)."""
    *lead, height, width, channels = images.shape
    _check_factor(height, width, factor)
    n = len(lead)
    x = images.reshape(*lead, height // factor, factor, width // factor, factor, channels)
    x = x.transpose(*range(n), n, n + 2, n + 1, n + 3, n + 4)
    return x.reshape(*lead, height // factor, width // factor, factor * factor * channels)


def pixel_shuffle(latents, factor: int = LATENT_FACTOR):
    """(..., h, w, C f^2) -> (..., h f, w f, C): the exact inverse of `pixel_unshuffle`."""
    *lead, h, w, channels = latents.shape
    if not isinstance(factor, (int, np.integer)) or factor < 1 or channels % (factor * factor):
        raise ValueError(f"latent channels {channels} are not a multiple of factor^2 for factor {factor!r}")
    c = channels // (factor * factor)
    n = len(lead)
    x = latents.reshape(*lead, h, w, factor, factor, c)
    x = x.transpose(*range(n), n, n + 2, n + 1, n + 3, n + 4)
    return x.reshape(*lead, h * factor, w * factor, c)


def mel_filterbank(sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS, fmin: float = 0.0,
                   fmax: float | None = None) -> np.ndarray:
    """HTK-mel triangular filters with peak 1: (n_mels, n_fft // 2 + 1) float64."""
    fmax = sample_rate / 2 if fmax is None else fmax
    if not 0 <= fmin < fmax <= sample_rate / 2:
        raise ValueError(f"need 0 <= fmin < fmax <= sample_rate / 2, got fmin={fmin}, fmax={fmax}, "
                         f"sample_rate={sample_rate}")
    mel_min, mel_max = 2595.0 * np.log10(1.0 + np.array([fmin, fmax]) / 700.0)
    edges = 700.0 * (10.0 ** (np.linspace(mel_min, mel_max, n_mels + 2) / 2595.0) - 1.0)
    freqs = np.arange(n_fft // 2 + 1) * sample_rate / n_fft
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    return np.maximum(0.0, np.minimum((freqs - lower) / (centre - lower), (upper - freqs) / (upper - centre)))


def log_mel(wav: np.ndarray, sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT, hop: int = HOP,
            n_mels: int = N_MELS) -> np.ndarray:
    """Mono waveform (N,) in [-1, 1] -> log1p(mel power) (M, n_mels) float32, M = N // hop + 1 (centred frames)."""
    wav = np.asarray(wav, dtype=np.float64)
    if wav.ndim != 1:
        raise ValueError(f"wav must be mono (N,), got shape {wav.shape}")
    padded = np.pad(wav, n_fft // 2)
    frames = len(wav) // hop + 1
    index = np.arange(frames)[:, None] * hop + np.arange(n_fft)[None, :]
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_fft) / n_fft)
    power = np.abs(np.fft.rfft(padded[index] * window, axis=-1)) ** 2
    return np.log1p(power @ mel_filterbank(sample_rate, n_fft, n_mels).T).astype(np.float32)


def window_centres(num_frames: int, fps: float, sample_rate: int = SAMPLE_RATE, hop: int = HOP) -> np.ndarray:
    """Feature index c_t centred on each video frame t: floor((t + 0.5) * sr / (fps * hop) + 0.5), (T,) int64."""
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    return np.floor((np.arange(num_frames) + 0.5) * sample_rate / (fps * hop) + 0.5).astype(np.int64)


def audio_windows(features: np.ndarray, num_frames: int, fps: float, window: int = WINDOW,
                  sample_rate: int = SAMPLE_RATE, hop: int = HOP) -> np.ndarray:
    """Features (M, A) -> windows (T, S, 1, A): frames [c_t - S//2, c_t - S//2 + S) per video frame, zero padded."""
    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"features must be (M, A), got shape {features.shape}")
    if window < 1 or num_frames < 1:
        raise ValueError(f"window and num_frames must be >= 1, got window={window}, num_frames={num_frames}")
    index = window_centres(num_frames, fps, sample_rate, hop)[:, None] - window // 2 + np.arange(window)[None, :]
    valid = (index >= 0) & (index < len(features))
    out = np.where(valid[..., None], features[np.clip(index, 0, max(len(features) - 1, 0))], 0)
    return out[:, :, None, :].astype(features.dtype)


def featurize_audio(wav: np.ndarray, num_frames: int, fps: float, sample_rate: int = SAMPLE_RATE,
                    window: int = WINDOW, n_mels: int = N_MELS) -> np.ndarray:
    """Waveform (N,) -> per-video-frame log-mel windows (T, S, 1, n_mels) float32 (the record's `audio` key)."""
    if sample_rate != SAMPLE_RATE:
        raise ValueError(f"the demo featuriser expects {SAMPLE_RATE} Hz audio, got {sample_rate} Hz")
    return audio_windows(log_mel(wav, sample_rate, N_FFT, HOP, n_mels), num_frames, fps, window, sample_rate, HOP)
