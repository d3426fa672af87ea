"""Whisper audio features and per-frame windows (ACTALKER_SPEC §4).

    encoder = WhisperEncoder("/models/whisper-tiny")   # a local transformers folder, nothing downloaded
    states = encoder(wave)                              # (S,) 16 kHz -> (T50, K, A): K = layers + 1 (5 for tiny)
    audio = frame_windows(states, len(wave), fps=12.5)  # (T, 10, K, A)

Hidden states: the waveform is cut into 30 s chunks (480,000 samples); `WhisperFeatureExtractor` pads each to
3000 log-mel frames; the encoder runs with `output_hidden_states`; the states are [embedding output, layers
1 .. L-1, final-LayerNorm'd layer L] (the last is `last_hidden_state`), stacked to (1500, K, A) per chunk and
concatenated over chunks at 50 tokens/s.

Windows (exact official arithmetic at 12.5 fps, generalised): n25 = floor(S / 640); the tokens are truncated
to 2 * n25, padded with 4 zero tokens in front and 6 behind; with r = 50 / fps tokens per output frame
(4 at 12.5 fps, 2 at 25 fps), output frame i takes padded tokens [r*i, r*i + 10). Both rates thus centre
the window on the frame: tokens of 25-fps frames j-2 .. j+2 where j = i * 25 / fps. Output frames:
T = floor(S * fps / 16000) (= floor(n25 / 2) at 12.5 fps, n25 at 25 fps). No 500-frame cap (the official
`frame_num` is an inference limit).
"""

from typing import Protocol

import numpy as np

SAMPLE_RATE = 16000
CHUNK_SAMPLES = 30 * SAMPLE_RATE
TOKENS_PER_SECOND = 50
WINDOW = 10
PAD_FRONT, PAD_BACK = 4, 6
FPS_CHOICES = (12.5, 25.0)


class AudioEncoder(Protocol):
    """What the preprocessor needs from an audio model."""

    def __call__(self, wave: np.ndarray) -> np.ndarray:
        """(S,) float32 16 kHz mono -> (T50, K, A) float32 hidden states at 50 tokens per second."""


def samples_per_frame(fps: float) -> int:
    """Audio samples per output frame: 1280 at 12.5 fps, 640 at 25 fps."""
    if float(fps) not in FPS_CHOICES:
        raise ValueError(f"fps must be one of {FPS_CHOICES}, got {fps}")
    return int(SAMPLE_RATE / fps)


def num_frames(num_samples: int, fps: float) -> int:
    """Output frames covered by `num_samples` of 16 kHz audio: floor(S * fps / 16000)."""
    return num_samples // samples_per_frame(fps)


def frame_windows(states: np.ndarray, num_samples: int, fps: float = 12.5, start: int = 0,
                  count: int | None = None) -> np.ndarray:
    """Hidden states (T50, K, A) of `num_samples` 16 kHz samples -> (T, 10, K, A) per-frame windows.

    start, count: only output frames [start, start + count) (default: all T), e.g. one clip of a long video.
    """
    states = np.asarray(states)
    if states.ndim != 3:
        raise ValueError(f"frame_windows expects hidden states (T50, K, A), got shape {states.shape}")
    per_frame = samples_per_frame(fps)
    n25 = num_samples // 640
    tokens = states[:2 * n25]
    if tokens.shape[0] < 2 * n25:
        raise ValueError(f"{states.shape[0]} hidden states are too few for {num_samples} samples "
                         f"(need {2 * n25})")
    padded = np.concatenate([np.zeros((PAD_FRONT,) + states.shape[1:], states.dtype), tokens,
                             np.zeros((PAD_BACK,) + states.shape[1:], states.dtype)])
    stride = per_frame * TOKENS_PER_SECOND // SAMPLE_RATE
    total = num_samples // per_frame
    count = total - start if count is None else count
    if start < 0 or count < 0 or start + count > total:
        raise ValueError(f"frames [{start}, {start + count}) lie outside the {total} frames of {num_samples} samples")
    index = stride * np.arange(start, start + count)[:, None] + np.arange(WINDOW)[None]
    return padded[index]


class WhisperEncoder:
    """The default `AudioEncoder`: a local Whisper checkpoint (feature extractor + encoder) via transformers."""

    def __init__(self, path: str, batch_size: int = 4, device: str = "cpu"):
        import os

        import torch
        from transformers import WhisperFeatureExtractor, WhisperModel

        if not os.path.isdir(path):
            raise FileNotFoundError(f"--whisper {path}: not a directory (expected a local Whisper folder)")
        try:
            self.features = WhisperFeatureExtractor.from_pretrained(path, local_files_only=True)
            self.encoder = WhisperModel.from_pretrained(path, local_files_only=True).get_encoder().to(device).eval()
        except Exception as err:  # noqa: BLE001  (transformers / safetensors raise many types)
            raise ValueError(f"--whisper {path}: cannot load a Whisper model ({type(err).__name__}: {err})") from None
        if self.features.feature_size != self.encoder.config.num_mel_bins:
            raise ValueError(f"--whisper {path}: feature extractor has {self.features.feature_size} mel bins, "
                             f"the encoder expects {self.encoder.config.num_mel_bins}")
        self.torch, self.device, self.batch_size = torch, device, batch_size

    def __call__(self, wave: np.ndarray) -> np.ndarray:
        wave = np.asarray(wave, np.float32)
        if wave.ndim != 1 or not len(wave):
            raise ValueError(f"expected a non-empty mono waveform (S,), got shape {wave.shape}")
        chunks = [wave[i:i + CHUNK_SAMPLES] for i in range(0, len(wave), CHUNK_SAMPLES)]
        out = []
        with self.torch.no_grad():
            for start in range(0, len(chunks), self.batch_size):
                batch = self.features(chunks[start:start + self.batch_size], sampling_rate=SAMPLE_RATE,
                                      return_tensors="pt").input_features.to(self.device)
                result = self.encoder(batch, output_hidden_states=True)
                states = list(result.hidden_states[:-1]) + [result.last_hidden_state]
                stacked = self.torch.stack(states, dim=2).float().cpu().numpy()  # (B, 1500, K, A)
                out.append(stacked.reshape(-1, *stacked.shape[2:]))
        return np.concatenate(out)
