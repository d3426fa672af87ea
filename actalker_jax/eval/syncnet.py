"""SyncNet (syncnet_v2) lip-sync confidence and distance, Sync-C / Sync-D as in joonson/syncnet_python.

    net = load_syncnet("syncnet_v2.model")          # weights are not shipped: get them from syncnet_python
    offset, sync_c, sync_d = sync_scores(net, faces, wav, sample_rate)

`faces`: (T, 224, 224, 3) uint8 RGB face crops at 25 fps (the crops syncnet_python's pipeline makes: the face box
grown and resized to 224x224); `wav`: mono audio. As in `SyncNetInstance.evaluate`: the network sees 5-frame
windows (BGR, raw 0-255 values) and 0.2 s of 13 MFCCs (`mfcc`, python_speech_features' defaults: 25 ms windows
every 10 ms, 26 mel filters, 512-point FFT, pre-emphasis 0.97, lifter 22, first coefficient = log frame energy);
window i pairs video frames i..i+4 with MFCC frames 4i..4i+19. Audio in [-1, 1] is scaled to the 16-bit range
first (syncnet_python takes the MFCCs of the int16 samples; the scale changes the first coefficient). Mean
distances over the windows for audio shifts of -15..15 frames: Sync-D = the smallest mean distance, Sync-C =
median - smallest, offset = 15 - argmin.

Weights: `syncnet_v2.model` of syncnet_python is a state dict of its `SyncNetModel.S` (keys netcnnaud.*,
netfcaud.*, netcnnlip.*, netfclip.*), loaded here as is. Only the architecture is reproduced; without the real
weights the tests check the arithmetic with random weights saved in that format.
"""

import numpy as np

from actalker_jax.eval import EvalError
from actalker_jax.eval.feature_nets import _load_into, _load_state, _torch

FPS = 25.0
VSHIFT = 15


def _syncnet(width: float):
    nn = _torch().nn
    s = lambda c: max(1, int(round(c * width)))  # noqa: E731

    def block2d(cin, cout, kernel=3, padding=1):
        return [nn.Conv2d(cin, cout, kernel, 1, padding), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    def block3d(cin, cout, kernel, stride=(1, 1, 1), padding=(0, 0, 0)):
        return [nn.Conv3d(cin, cout, kernel, stride, padding), nn.BatchNorm3d(cout), nn.ReLU(inplace=True)]

    def fc(cin):
        return nn.Sequential(nn.Linear(cin, s(512)), nn.BatchNorm1d(s(512)), nn.ReLU(), nn.Linear(s(512), s(1024)))

    class S(nn.Module):
        def __init__(self):
            super().__init__()
            self.netcnnaud = nn.Sequential(
                *block2d(1, s(64)), nn.MaxPool2d(1, 1), *block2d(s(64), s(192)), nn.MaxPool2d(3, (1, 2)),
                *block2d(s(192), s(384)), *block2d(s(384), s(256)), *block2d(s(256), s(256)), nn.MaxPool2d(3, 2),
                *block2d(s(256), s(512), (5, 4), 0))
            self.netfcaud = fc(s(512))
            self.netcnnlip = nn.Sequential(
                *block3d(3, s(96), (5, 7, 7), (1, 2, 2)), nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
                *block3d(s(96), s(256), (1, 5, 5), (1, 2, 2), (0, 1, 1)), nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)),
                *block3d(s(256), s(256), (1, 3, 3), padding=(0, 1, 1)),
                *block3d(s(256), s(256), (1, 3, 3), padding=(0, 1, 1)),
                *block3d(s(256), s(256), (1, 3, 3), padding=(0, 1, 1)), nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
                *block3d(s(256), s(512), (1, 6, 6)))
            self.netfclip = fc(s(512))

        def forward_aud(self, x):
            return self.netfcaud(self.netcnnaud(x).flatten(1))

        def forward_lip(self, x):
            return self.netfclip(self.netcnnlip(x).flatten(1))

    return S()


def load_syncnet(path: str):
    """syncnet_v2 state dict (syncnet_python format) -> the network (eval mode, CPU)."""
    state, width = _load_state(path, "netcnnaud.0.weight", 64)
    return _load_into(_syncnet(width), state, path)


def mfcc(wav: np.ndarray, sample_rate: int = 16000, numcep: int = 13, nfilt: int = 26, nfft: int = 512,
         winlen: float = 0.025, winstep: float = 0.01, preemph: float = 0.97, ceplifter: int = 22) -> np.ndarray:
    """python_speech_features.mfcc with its defaults: wav (S,) -> (frames, numcep) float64.

    Checked once against python_speech_features 0.6 (identical to float64 precision on random signals of
    16000, 12345, 400 and 300 samples); not a test dependency.
    """
    from scipy.fft import dct

    signal = np.asarray(wav, np.float64)
    signal = np.append(signal[0], signal[1:] - preemph * signal[:-1])
    frame_len, step = int(round(winlen * sample_rate)), int(round(winstep * sample_rate))
    count = 1 if len(signal) <= frame_len else 1 + int(np.ceil((len(signal) - frame_len) / step))
    padded = np.concatenate([signal, np.zeros((count - 1) * step + frame_len - len(signal))])
    frames = padded[np.arange(frame_len)[None] + step * np.arange(count)[:, None]]
    power = np.abs(np.fft.rfft(frames, nfft)) ** 2 / nfft
    energy = power.sum(1)
    energy = np.where(energy == 0, np.finfo(float).eps, energy)
    mel = np.linspace(0, 2595 * np.log10(1 + sample_rate / 2 / 700), nfilt + 2)
    bins = np.floor((nfft + 1) * (700 * (10 ** (mel / 2595) - 1)) / sample_rate).astype(int)
    bank = np.zeros((nfilt, nfft // 2 + 1))
    for j in range(nfilt):
        for i in range(bins[j], bins[j + 1]):
            bank[j, i] = (i - bins[j]) / (bins[j + 1] - bins[j])
        for i in range(bins[j + 1], bins[j + 2]):
            bank[j, i] = (bins[j + 2] - i) / (bins[j + 2] - bins[j + 1])
    feat = power @ bank.T
    feat = np.log(np.where(feat == 0, np.finfo(float).eps, feat))
    feat = dct(feat, type=2, axis=1, norm="ortho")[:, :numcep]
    feat *= 1 + (ceplifter / 2.0) * np.sin(np.pi * np.arange(numcep) / ceplifter)
    feat[:, 0] = np.log(energy)
    return feat


def sync_scores(net, faces: np.ndarray, wav: np.ndarray, sample_rate: int = 16000, batch: int = 20
                ) -> tuple[int, float, float]:
    """faces (T, 224, 224, 3) uint8 RGB at 25 fps, wav (S,) -> (offset in frames, Sync-C, Sync-D)."""
    torch = _torch()
    faces = np.asarray(faces)
    if faces.ndim != 4 or faces.shape[1:] != (224, 224, 3) or len(faces) < 6:
        raise EvalError(f"sync_scores needs >= 6 face crops (T, 224, 224, 3), got {faces.shape}")
    if sample_rate != 16000:
        raise EvalError(f"sync_scores needs 16 kHz audio, got {sample_rate} Hz")
    cc = mfcc(np.asarray(wav, np.float64) * 32768.0, sample_rate).T.astype(np.float32)   # (13, frames) at 100 Hz
    count = min(len(faces), len(wav) // 640) - 5               # 640 samples = one frame at 25 fps
    if count < 1:
        raise EvalError(f"sync_scores: {len(faces)} frames and {len(wav) / sample_rate:.2f} s of audio are too short")
    video = torch.from_numpy(np.ascontiguousarray(faces[..., ::-1])).float().permute(3, 0, 1, 2)   # BGR, (3,T,H,W)
    lip, aud = [], []
    with torch.no_grad():
        for start in range(0, count, batch):
            idx = range(start, min(start + batch, count))
            lip.append(net.forward_lip(torch.stack([video[:, i:i + 5] for i in idx])))
            aud.append(net.forward_aud(torch.stack([torch.from_numpy(cc[None, :, 4 * i:4 * i + 20]) for i in idx])))
    lip, aud = torch.cat(lip), torch.cat(aud)
    padded = torch.nn.functional.pad(aud, (0, 0, VSHIFT, VSHIFT))
    dists = torch.stack([torch.nn.functional.pairwise_distance(lip[[i]].repeat(2 * VSHIFT + 1, 1),
                                                               padded[i:i + 2 * VSHIFT + 1]) for i in range(count)])
    mean = dists.mean(0).numpy()
    best = int(np.argmin(mean))
    return VSHIFT - best, float(np.median(mean) - mean[best]), float(mean[best])
