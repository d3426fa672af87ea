"""Video metrics for real data: metric arithmetic, tiny random feature networks in the real formats, the CLI."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from actalker_jax import evaluate
from actalker_jax.data import video_io
from actalker_jax.eval import EvalError, feature_nets, syncnet, video_metrics

WIDTH = 1 / 16   # tiny networks: every channel count / 16


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random tiny networks saved in the real state-dict formats: He-initialised convolutions (so that features do
    not vanish with depth), LPIPS lin weights >= 0 (as trained ones)."""
    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    lpips = feature_nets._lpips_module(WIDTH)
    nets = dict(inception=feature_nets._inception_modules()(WIDTH), i3d=feature_nets._i3d_modules()(WIDTH, 400),
                lpips=lpips, syncnet=syncnet._syncnet(WIDTH))
    paths = {}
    for name, net in nets.items():
        for module in net.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        for i in range(5 if name == "lpips" else 0):
            getattr(lpips, f"lin{i}").model[1].weight.data.abs_()
        paths[name] = str(root / f"{name}.pt")
        torch.save(net.state_dict(), paths[name])
    return paths


def test_pixel_metrics_and_frechet_distance():
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    assert video_metrics.psnr(video, video) == float("inf")
    assert video_metrics.ssim(video, video) == pytest.approx(1.0)
    shifted = np.clip(video.astype(np.int32) + 5, 0, 255).astype(np.uint8)
    mse = np.mean((shifted.astype(np.float64) - video) ** 2)
    assert video_metrics.psnr(shifted, video) == pytest.approx(10 * np.log10(255 ** 2 / mse))
    assert video_metrics.ssim(rng.integers(0, 256, video.shape, dtype=np.uint8), video) < 0.2
    with pytest.raises(EvalError, match=r"got \(3, 16, 16, 3\) and \(2, 16, 16, 3\)"):
        video_metrics.psnr(video, video[:2])
    feats = rng.normal(size=(200, 8))
    feats -= feats.mean(0)
    assert video_metrics.frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-6)
    shift = np.arange(8.0)
    assert video_metrics.frechet_distance(feats + shift, feats) == pytest.approx((shift ** 2).sum(), rel=1e-6)
    scaled = video_metrics.frechet_distance(2 * feats, feats)      # same mean: Tr(4S + S - 2 * 2S) = Tr(S)
    assert scaled == pytest.approx(np.trace(np.cov(feats, rowvar=False)), rel=1e-6)
    with pytest.raises(EvalError, match="Fréchet distance needs >= 2"):
        video_metrics.frechet_distance(feats[:1], feats)


def test_lip_sync_and_identity_helpers():
    landmarks = np.zeros((4, 68, 2))
    landmarks[:, 45, 0] = 10.0                                   # outer eye corners 10 px apart
    for a, b in video_metrics.INNER_LIP_PAIRS:
        landmarks[:, b, 1] = np.arange(4)                        # inner-lip gap 0, 1, 2, 3 px
    np.testing.assert_allclose(video_metrics.mouth_opening(landmarks), [0, 0.1, 0.2, 0.3])
    wav = np.concatenate([np.zeros(1280), np.full(1280, 0.5)])   # 2 frames at 12.5 fps
    np.testing.assert_allclose(video_metrics.audio_energy(wav, 2, 12.5), [0.0, 0.5])
    assert video_metrics.cosine([1, 0], [1, 1]) == pytest.approx(np.sqrt(0.5))


def test_feature_networks_load_and_run(weights):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 40, 48, 3), dtype=np.uint8)
    inception = feature_nets.load_inception(weights["inception"])
    feats = inception(images)
    assert feats.shape == (3, 128) and np.isfinite(feats).all() and feats.std(0).max() > 0
    np.testing.assert_allclose(inception(images[:1]), feats[:1], rtol=1e-4, atol=1e-5)   # batch-independent
    i3d = feature_nets.load_i3d(weights["i3d"], batch=1)
    logits = i3d(rng.integers(0, 256, (2, 16, 32, 32, 3), dtype=np.uint8))
    assert logits.shape == (2, 400) and not np.allclose(logits[0], logits[1])
    lpips = feature_nets.load_lpips(weights["lpips"])
    np.testing.assert_array_equal(lpips(images, images), 0.0)
    assert (lpips(images, images[::-1])[[0, 2]] > 0).all()
    with pytest.raises(EvalError, match=r"i3d.pt: not the expected state dict \(no key 'Conv2d_1a_3x3.conv.weight'\)"):
        feature_nets.load_inception(weights["i3d"])
    state = torch.load(weights["lpips"])
    state["lin0.model.1.weight"] = torch.zeros(1, 3, 1, 1)
    broken = os.path.join(os.path.dirname(weights["lpips"]), "broken.pt")
    torch.save(state, broken)
    with pytest.raises(EvalError, match="broken.pt: state dict does not match the network"):
        feature_nets.load_lpips(broken)
    with pytest.raises(EvalError, match="nowhere.pt: no such file"):
        feature_nets.load_i3d("/nowhere.pt")


def test_syncnet_scores_and_mfcc(weights):
    wav = np.random.default_rng(0).normal(0, 0.1, 16000).astype(np.float32)
    feat = syncnet.mfcc(wav)
    assert feat.shape == (1 + int(np.ceil((16000 - 400) / 160)), 13)
    emphasised = np.append(wav[0], wav[1:] - 0.97 * wav[:-1]).astype(np.float64)
    frame = emphasised[160:560]
    np.testing.assert_allclose(feat[1, 0], np.log((np.abs(np.fft.rfft(frame, 512)) ** 2).sum() / 512), rtol=1e-6)
    net = syncnet.load_syncnet(weights["syncnet"])
    faces = np.random.default_rng(1).integers(0, 256, (12, 224, 224, 3), dtype=np.uint8)
    offset, conf, dist = syncnet.sync_scores(net, faces, wav[:12 * 640])
    assert -syncnet.VSHIFT <= offset <= syncnet.VSHIFT and conf >= 0 and dist > 0
    with pytest.raises(EvalError, match=r"needs >= 6 face crops \(T, 224, 224, 3\), got \(12, 64, 64, 3\)"):
        syncnet.sync_scores(net, faces[:, :64, :64], wav)
    with pytest.raises(EvalError, match="not the expected state dict"):
        syncnet.load_syncnet(weights["lpips"])


def _videos(root, names, frames=16, seed=0):
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        video = np.repeat(rng.integers(0, 256, (frames, 8, 8, 3), dtype=np.uint8), 4, axis=1).repeat(4, axis=2)
        video_io.write_video(os.path.join(root, name), video, 12.5, rng.normal(0, 0.1, 16000 * frames // 12)
                             .astype(np.float32))
    return str(root)


def test_video_command(weights, tmp_path):
    pred = _videos(tmp_path / "pred", ["a.mp4", "b.mp4"])
    ref = str(tmp_path / "ref")
    shutil.copytree(pred, ref)
    out = str(tmp_path / "out")
    result = evaluate.main(["video", "--pred", pred, "--ref", ref, "--out", out, "--no-dlib",
                            "--inception", weights["inception"], "--i3d", weights["i3d"], "--lpips", weights["lpips"]])
    with open(os.path.join(out, "video.json")) as f:
        stored = json.load(f)
    assert stored["num_videos"] == 2 and set(stored["videos"]) == {"a.mp4", "b.mp4"}
    assert stored["videos"]["a.mp4"]["frames"] == 16
    assert stored["mean"]["psnr"] == float("inf") and stored["mean"]["ssim"] == pytest.approx(1.0)
    assert stored["mean"]["lpips"] == 0.0
    assert result["fid"] == pytest.approx(0.0, abs=1e-8) and result["fvd"] == pytest.approx(0.0, abs=1e-8)
    assert "| psnr | ssim | lpips | fid | fvd |" in open(os.path.join(out, "video.md")).read()

    other = _videos(tmp_path / "other", ["a.mp4", "b.mp4"], seed=1)
    result = evaluate.main(["video", "--pred", pred, "--ref", other, "--out", out, "--no-dlib",
                            "--inception", weights["inception"]])
    assert result["fid"] > 1e-4 and result["mean"]["psnr"] < 15 and result["fvd"] is None


@pytest.mark.parametrize("case, message", [
    ("no_ref", "--ref {tmp}/ref: no reference for b.mp4"),
    ("not_dir", "--pred {tmp}/missing: not a directory"),
    ("empty", "--pred {tmp}/empty: no video files"),
    ("broken", "{tmp}/ref/a.mp4: cannot open"),
    ("weights", "{tmp}/w.pt: cannot read a PyTorch state dict"),
])
def test_video_command_bad_inputs(case, message, tmp_path, capsys):
    pred = _videos(tmp_path / "pred", ["a.mp4", "b.mp4"], frames=4)
    ref = _videos(tmp_path / "ref", ["a.mp4"], frames=4)
    args = ["video", "--pred", pred, "--ref", ref, "--no-dlib"]
    if case == "not_dir":
        args[2] = str(tmp_path / "missing")
    if case == "empty":
        os.makedirs(tmp_path / "empty")
        args[2] = str(tmp_path / "empty")
    if case in ("broken", "weights"):
        _videos(tmp_path / "ref", ["b.mp4"], frames=4)
        (tmp_path / "ref" / "a.mp4").write_bytes(b"not a video")
        (tmp_path / "w.pt").write_bytes(b"not weights")
    if case == "weights":
        args += ["--lpips", str(tmp_path / "w.pt")]
    with pytest.raises(SystemExit) as exc:
        evaluate.main(args)
    text = str(exc.value)
    assert text.startswith("evaluate video: ") and message.format(tmp=tmp_path) in text and "\n" not in text


class _BrightnessAnalyzer:
    """A `face.FaceAnalyzer` stand-in: a fixed face box, the inner-lip gap = the frame's mean brightness / 10."""

    def track(self, frames):
        from actalker_jax.data import face

        count = len(frames)
        landmarks = np.zeros((count, 68, 2), np.float32)
        landmarks[:, 45, 0] = 10.0
        for a, b in video_metrics.INNER_LIP_PAIRS:
            landmarks[:, b, 1] = frames.mean((1, 2, 3)) / 10
        return face.FaceTrack(boxes=np.tile(np.float32([16, 16, 48, 48]), (count, 1)), landmarks=landmarks,
                              detected=np.ones(count, bool), id_embed=np.float32([1, 2, 3]), ref_index=0)


def test_video_command_lip_sync_identity_and_syncnet(weights, tmp_path):
    """Frames whose brightness follows the audio loudness: lip sync ~1 with the sidecar audio, ~0 when shifted."""
    from actalker_jax.data import synthetic
    from actalker_jax.eval import video

    rng = np.random.default_rng(0)
    loudness = rng.uniform(0.05, 1.0, 16)
    frames = np.repeat((40 + 200 * loudness).astype(np.uint8)[:, None, None, None], 64, 1).repeat(64, 2).repeat(3, 3)
    for root in ("pred", "ref"):
        os.makedirs(tmp_path / root)
        video_io.write_video(str(tmp_path / root / "a.mp4"), frames, 12.5)
    wav = (rng.normal(0, 0.2, 16 * 1280) * np.repeat(loudness, 1280)).astype(np.float32)
    synthetic.write_wav(str(tmp_path / "pred" / "a.wav"), wav)
    result = video.run_video(str(tmp_path / "pred"), str(tmp_path / "ref"), out=str(tmp_path), dlib=True,
                             syncnet=weights["syncnet"], analyzer=_BrightnessAnalyzer())
    metrics = result["videos"]["a.mp4"]
    assert metrics["lip_sync"] > 0.95 and metrics["identity"] == pytest.approx(1.0)
    assert np.isfinite([metrics["sync_c"], metrics["sync_d"]]).all() and abs(metrics["sync_offset"]) <= 15
    synthetic.write_wav(str(tmp_path / "pred" / "a.wav"), np.roll(wav, 5 * 1280))
    result = video.run_video(str(tmp_path / "pred"), str(tmp_path / "ref"), out=str(tmp_path), dlib=True,
                             analyzer=_BrightnessAnalyzer())
    assert abs(result["videos"]["a.mp4"]["lip_sync"]) < 0.5
