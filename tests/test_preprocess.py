"""Preprocessing (actalker_jax.data.preprocess and its parts) on a real face photo made into a talking clip.

The clip: skimage's astronaut photo cropped around the face (128 px), the region below the nose warped a little
per frame (a mouth opening and closing) plus a 1-2 px head sway, 40 frames at 25 fps, with speech-like audio
(voiced syllables: harmonics of a 110-150 Hz pitch under two formant peaks, 4 syllables/s), written as
mp4 (h264 + aac) with PyAV. Models: a tiny random Whisper (4 encoder layers -> 5 states) and a tiny random
diffusers AutoencoderKLTemporalDecoder, saved to temp folders.
"""

import json
import os

import numpy as np
import pytest

pytest.importorskip("dlib")
pytest.importorskip("av")
pytest.importorskip("cv2")
pytest.importorskip("skimage")

from actalker_jax.data import audio as audio_mod  # noqa: E402
from actalker_jax.data import face, motion, preprocess, records, video_io  # noqa: E402

SRC_FPS = 25
SRC_FRAMES = 40
SIZE = 64
OPTS = dict(fps=12.5, size=SIZE, frames_per_clip=10, min_frames=8, vae_batch=8)
WHISPER_DIM = 64


def speech_like(seconds: float, rate: int = 16000, seed: int = 0) -> np.ndarray:
    """Voiced syllables: a pitch contour's harmonics weighted by two formants, 4 syllables per second, silences."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 110 + 40 * np.sin(2 * np.pi * 1.3 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    formants = (rng.uniform(500, 800), rng.uniform(1100, 1800))
    wave = np.zeros_like(t)
    for k in range(1, 30):
        freq = k * f0
        gain = sum(np.exp(-((freq - f) / 150.0) ** 2) for f in formants) + 0.05 / k
        wave += gain * np.sin(k * phase)
    syllable = np.clip(np.sin(2 * np.pi * 4 * t), 0, None) ** 2
    wave = wave * syllable + 0.005 * rng.standard_normal(len(t))
    return (0.5 * wave / np.abs(wave).max()).astype(np.float32)


def talking_frames(count: int = SRC_FRAMES, size: int = 128) -> np.ndarray:
    """(count, size, size, 3) uint8: the astronaut's face with a moving mouth and a small head sway."""
    import cv2
    import skimage.data

    image = skimage.data.astronaut()[40:240, 120:320]  # face box ~ (179, 83)-(266, 170) in the full photo
    image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    scale = size / 200
    mouth = np.array([223 - 120, 150 - 40], np.float64) * scale
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    weight = np.exp(-(((xs - mouth[0]) / (12 * scale)) ** 2 + ((ys - mouth[1]) / (10 * scale)) ** 2))
    frames = []
    for t in range(count):
        opening = 0.35 * max(0.0, np.sin(2 * np.pi * t / 6))
        sway = 1.5 * np.sin(2 * np.pi * t / 20)
        map_x = (xs - sway).astype(np.float32)
        map_y = (ys - opening * (ys - mouth[1]) * weight).astype(np.float32)
        frames.append(cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT))
    return np.stack(frames)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(whisper dir, diffusers vae dir, converted orbax dir) with tiny random weights."""
    import torch
    from diffusers import AutoencoderKLTemporalDecoder
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    from actalker_jax import convert

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    config = WhisperConfig(d_model=WHISPER_DIM, encoder_layers=4, encoder_attention_heads=2, encoder_ffn_dim=128,
                           decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=128, num_mel_bins=80,
                           vocab_size=100, max_target_positions=32, max_source_positions=1500, pad_token_id=0,
                           bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    whisper = str(root / "whisper")
    WhisperModel(config).save_pretrained(whisper)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(whisper)
    svd = str(root / "svd")
    vae = AutoencoderKLTemporalDecoder(down_block_types=("DownEncoderBlock2D",) * 2, block_out_channels=(32, 64),
                                       layers_per_block=1, latent_channels=4, sample_size=32)
    vae.save_pretrained(os.path.join(svd, "vae"))
    module = convert.load_diffusers_vae(svd)
    vae_config = module.config
    converted = str(root / "converted")
    convert.save_converted(converted, "vae", module, vae_config)
    return whisper, svd, converted


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """A folder with two talking clips, a corrupt mp4 and a face-less (plain colour) video."""
    root = tmp_path_factory.mktemp("videos")
    seconds = SRC_FRAMES / SRC_FPS + 0.1
    frames = talking_frames()
    video_io.write_video(str(root / "a_talk.mp4"), frames, SRC_FPS, speech_like(seconds, seed=0))
    os.makedirs(root / "sub")
    video_io.write_video(str(root / "sub" / "b_talk.mp4"), frames[:, :, ::-1], SRC_FPS, speech_like(seconds, seed=1))
    with open(root / "c_corrupt.mp4", "wb") as f:
        f.write(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    plain = np.full((SRC_FRAMES, 128, 128, 3), (90, 140, 200), np.uint8)
    video_io.write_video(str(root / "d_noface.mp4"), plain, SRC_FPS, speech_like(seconds, seed=2))
    return str(root)


@pytest.fixture(scope="module")
def full_run(models, videos, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("out_full"))
    whisper, svd, _ = models
    stats = preprocess.run(videos, out, whisper, svd, preprocess.Options(**OPTS), progress=False)
    return out, stats


def _by_source(path: str) -> dict[str, dict]:
    return {str(clip["source"]): clip for clip in records.iter_records(path)}


def test_decode_resamples_video_and_audio(videos):
    path = os.path.join(videos, "a_talk.mp4")
    frames = list(video_io.decode_frames(path, 12.5))
    assert len(frames) == SRC_FRAMES // 2 and frames[0].shape == (128, 128, 3)
    assert len(list(video_io.decode_frames(path, 25))) == SRC_FRAMES
    wave = video_io.PyAVDecoder().audio(path)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(len(wave) / 16000 - (SRC_FRAMES / SRC_FPS + 0.1)) < 0.1
    assert 0.05 < np.abs(wave).max() <= 1.0
    with pytest.raises(video_io.DecodeError, match="c_corrupt.mp4"):
        video_io.PyAVDecoder().audio(os.path.join(videos, "c_corrupt.mp4"))


def test_sidecar_wav_for_a_silent_video(tmp_path):
    import wave as wavfile

    path = video_io.write_video(str(tmp_path / "mute.mp4"), talking_frames(4, 64), SRC_FPS)
    with pytest.raises(video_io.DecodeError, match=r"no audio stream and no sidecar .*mute\.wav"):
        video_io.PyAVDecoder().audio(path)
    speech = speech_like(0.5)
    with wavfile.open(str(tmp_path / "mute.wav"), "wb") as f:  # 22.05 kHz, as espeak-ng writes
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(22050)
        f.writeframes((np.interp(np.arange(11025) / 22050, np.arange(8000) / 16000, speech) * 32767).astype("<i2"))
    wave = video_io.PyAVDecoder().audio(path)
    assert abs(len(wave) - 8000) < 100
    assert np.corrcoef(wave[:7800], speech[:7800])[0, 1] > 0.9


def test_audio_windows_follow_the_spec():
    states = np.arange(1, 1501, dtype=np.float32)[:, None, None] * np.ones((1, 5, 3), np.float32)
    samples = 16000 * 2 + 100  # n25 = 50 -> 100 tokens kept
    low = audio_mod.frame_windows(states, samples, 12.5)
    assert low.shape == (25, 10, 5, 3)
    np.testing.assert_array_equal(low[0, :, 0, 0], [0, 0, 0, 0, 1, 2, 3, 4, 5, 6])  # padded [0, 10): 4 zeros
    np.testing.assert_array_equal(low[3, :, 0, 0], np.arange(9, 19))  # padded [12, 22) = tokens 8..17 (1-based 9..18)
    assert low[-1, :, 0, 0].tolist() == [93, 94, 95, 96, 97, 98, 99, 100, 0, 0]  # truncation to 2 * n25 then zeros
    high = audio_mod.frame_windows(states, samples, 25)
    assert high.shape == (50, 10, 5, 3)
    np.testing.assert_array_equal(high[6, :, 0, 0], np.arange(9, 19))  # 25-fps frame 6 = 12.5-fps frame 3
    np.testing.assert_array_equal(high[::2], low)
    np.testing.assert_array_equal(audio_mod.frame_windows(states, samples, 12.5, 20, 5), low[20:])
    with pytest.raises(ValueError, match=r"frames \[20, 30\) lie outside the 25 frames"):
        audio_mod.frame_windows(states, samples, 12.5, 20, 10)


def test_motion_descriptors():
    rng = np.random.default_rng(0)
    base = rng.uniform(20, 40, (68, 2))
    base[36], base[45] = (22, 30), (38, 30)
    angle = np.radians(10)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = np.stack([base, 2.5 * base @ rot.T + 7.0])
    desc = motion.expression_descriptor(moved)
    assert desc.shape == (2, 96) and desc.dtype == np.float32
    np.testing.assert_allclose(desc[0], desc[1], atol=1e-5)  # similarity transforms are removed
    lips = moved.copy()
    lips[:, 48:68] += 5.0
    np.testing.assert_allclose(motion.expression_descriptor(lips), desc, atol=1e-5)  # lips are excluded
    assert motion.motion_buckets(np.stack([base] * 4)) == (0, 0)
    with pytest.raises(motion.MotionError, match=r"\(T, 68, 2\)"):
        motion.expression_descriptor(base)


def test_full_run_records(full_run, videos):
    out, stats = full_run
    assert stats == {"done": 2, "failed": 2, "skipped": 0, "clips": 4}
    assert sorted(n for n in os.listdir(out) if n.endswith(records.SHARD_SUFFIX)) == [
        "a_talk.mp4.array_record", "sub__b_talk.mp4.array_record"]
    clips = list(records.iter_records(out))
    assert len(clips) == 4
    detector = face.DlibFaceAnalyzer()
    for clip in clips:
        assert clip["latents"].shape == (10, SIZE // 2, SIZE // 2, 4) and clip["latents"].dtype == np.float16
        assert clip["audio"].shape == (10, 10, 5, WHISPER_DIM)
        assert clip["motion"].shape == (10, 96) and clip["pose"].shape == (10, 6)
        assert clip["id_embed"].shape == (128,)
        assert np.isfinite(clip["audio"]).all() and np.abs(clip["audio"]).max() > 0
        assert clip["motion"].astype(np.float32).std(0).max() > 1e-3  # the moving mouth and head show up
        assert np.all(clip["pose"][:, 3:] == 0) and np.all(np.abs(clip["pose"][:, :3]) < 45)
        assert float(clip["fps"]) == 12.5 and 0 <= clip["motion_buckets"].min() <= clip["motion_buckets"].max() <= 128
        mouth, rest = clip["mask_audio"].astype(bool), clip["mask_motion"].astype(bool)
        assert mouth.shape == (SIZE, SIZE) and mouth.any() and rest.any()
        assert not (mouth & rest).any()
        x0, y0, x1, y1 = clip["face_box"]
        ys, xs = np.nonzero(mouth | rest)
        assert xs.min() >= np.floor(x0) and xs.max() < np.ceil(x1)
        assert ys.min() >= np.floor(y0) and ys.max() < np.ceil(y1)
        assert np.nonzero(mouth)[0].mean() > (y0 + y1) / 2  # the mouth lies in the lower half of the face box
    # the mouth mask is centred below the nose landmarks of the stored crop
    frames = np.stack(list(video_io.decode_frames(os.path.join(videos, "a_talk.mp4"), 12.5)))[:10]
    track = detector.track(frames)
    square = face.crop_square(track.boxes, frames.shape[1:3])
    landmarks = face.to_crop(track.landmarks, square, SIZE)
    first = _by_source(os.path.join(out, "a_talk.mp4.array_record"))["a_talk.mp4#clip0:0-10"]
    mys, mxs = np.nonzero(first["mask_audio"])
    nose = landmarks[:, 27:36].reshape(-1, 2)
    lips = landmarks[:, 48:68].reshape(-1, 2)
    assert mys.mean() > nose[:, 1].max() - 1
    assert abs(mxs.mean() - lips[:, 0].mean()) < 3 and abs(mys.mean() - lips[:, 1].mean()) < 3
    assert first["mask_audio"][int(lips[:, 1].mean()), int(lips[:, 0].mean())] == 1
    # the same person in both clips of a video: identity descriptors are close
    ids = [c["id_embed"].astype(np.float32) for c in clips]
    assert np.linalg.norm(ids[0] - ids[1]) < 0.3


def test_failures_are_reported(full_run):
    out, _ = full_run
    with open(os.path.join(out, preprocess.FAILURES)) as f:
        failures = {entry["video"]: entry["reason"] for entry in map(json.loads, f)}
    assert set(failures) == {"c_corrupt.mp4", "d_noface.mp4"}
    assert "DecodeError" in failures["c_corrupt.mp4"]
    assert "no face detected" in failures["d_noface.mp4"]
    manifest = preprocess.read_manifest(out)
    assert {k: v["status"] for k, v in manifest.items()} == {
        "a_talk.mp4": "ok", "sub/b_talk.mp4": "ok", "c_corrupt.mp4": "failed", "d_noface.mp4": "failed"}


def _assert_same_shards(out: str, out_full: str) -> None:
    assert sorted(os.listdir(out)) == sorted(os.listdir(out_full))
    for name in os.listdir(out_full):
        if name.endswith(records.SHARD_SUFFIX):
            resumed, full = _by_source(os.path.join(out, name)), _by_source(os.path.join(out_full, name))
            assert resumed.keys() == full.keys()
            for key in resumed:
                for field in records.SCHEMA:
                    np.testing.assert_array_equal(resumed[key][field], full[key][field], err_msg=f"{key} {field}")


def test_cli_sigkill_then_resume(full_run, models, videos, tmp_path):
    """A real `kill -9` of the CLI once its first shard is done; the re-run completes the same shards."""
    import signal
    import subprocess
    import sys
    import time

    out_full, _ = full_run
    whisper, svd, _ = models
    out = str(tmp_path / "out")
    flags = ["--fps", "12.5", "--size", str(SIZE), "--frames-per-clip", "10", "--min-frames", "8"]
    cmd = [sys.executable, "-m", "actalker_jax.data.preprocess", "--videos", videos, "--out", out,
           "--whisper", whisper, "--svd", svd, "--no-progress"] + flags
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300  # a guard against hangs only
    while proc.poll() is None and time.time() < deadline:
        if preprocess.read_manifest(out):  # one complete line (a non-empty file may still be mid-append)
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 1 <= len(preprocess.read_manifest(out)) < 4  # killed after the first video, before the last
    assert preprocess.main(cmd[3:]) == 0
    _assert_same_shards(out, out_full)


def test_resume_after_kill_gives_the_same_shards(full_run, models, videos, tmp_path, monkeypatch):
    out_full, _ = full_run
    whisper, svd, _ = models
    out = str(tmp_path / "out")
    real = preprocess._run_one

    def killed_on_second_video(relpath):
        if relpath != "a_talk.mp4":
            raise KeyboardInterrupt
        return real(relpath)

    monkeypatch.setattr(preprocess, "_run_one", killed_on_second_video)
    with pytest.raises(KeyboardInterrupt):
        preprocess.run(videos, out, whisper, svd, preprocess.Options(**OPTS), progress=False)
    monkeypatch.setattr(preprocess, "_run_one", real)
    assert os.listdir(out).count("a_talk.mp4.array_record") == 1
    with open(os.path.join(out, "sub__b_talk.mp4.array_record.tmp"), "wb") as f:
        f.write(b"half a shard")  # what a kill during a write leaves
    with open(os.path.join(out, preprocess.MANIFEST), "a") as f:
        f.write('{"video": "sub/b_ta')  # a torn manifest line
    stats = preprocess.run(videos, out, whisper, svd, preprocess.Options(**OPTS), progress=False)
    assert stats == {"done": 1, "failed": 2, "skipped": 1, "clips": 2}
    _assert_same_shards(out, out_full)
    again = preprocess.run(videos, out, whisper, svd, preprocess.Options(**OPTS), progress=False)
    assert again == {"done": 0, "failed": 0, "skipped": 4, "clips": 0}


def test_internal_errors_are_retried_bad_inputs_are_not(models, videos, tmp_path, monkeypatch):
    whisper, svd, _ = models
    out = str(tmp_path / "out")

    def crash(self, path, name):
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")

    def bad(self, path, name):
        raise ValueError(f"{name}: bad input")

    monkeypatch.setattr(preprocess.Preprocessor, "process", crash)
    assert preprocess.run(videos, out, whisper, svd, preprocess.Options(**OPTS), progress=False)["failed"] == 4
    assert {e["status"] for e in preprocess.read_manifest(out).values()} == {"error"}
    monkeypatch.setattr(preprocess.Preprocessor, "process", bad)
    assert preprocess.run(videos, out, whisper, svd, preprocess.Options(**OPTS), progress=False)["failed"] == 4
    assert {e["status"] for e in preprocess.read_manifest(out).values()} == {"failed"}
    stats = preprocess.run(videos, out, whisper, svd, preprocess.Options(**OPTS), progress=False)
    assert stats == {"done": 0, "failed": 0, "skipped": 4, "clips": 0}
    stats = preprocess.run(videos, out, whisper, svd, preprocess.Options(**OPTS), progress=False, retry_failed=True)
    assert stats["failed"] == 4


def test_converted_vae_matches_diffusers_folder(models, full_run):
    _, svd, converted = models
    frames = talking_frames(2, SIZE)
    np.testing.assert_array_equal(preprocess.LatentEncoder(converted, 2)(frames),
                                  preprocess.LatentEncoder(svd, 2)(frames))


def test_cli_errors_name_the_input(models, tmp_path, capsys):
    whisper, svd, _ = models
    assert preprocess.main(["--videos", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--whisper", whisper,
                            "--svd", svd]) == 2
    assert "nope" in capsys.readouterr().err
    assert preprocess.main(["--videos", str(tmp_path), "--out", str(tmp_path / "o"), "--whisper", whisper,
                            "--svd", svd, "--size", "100"]) == 2
    assert "--size" in capsys.readouterr().err
    assert preprocess.main(["--videos", str(tmp_path), "--out", str(tmp_path / "o"), "--whisper", str(tmp_path),
                            "--svd", svd, "--workers", "2"]) == 2
    assert f"--whisper {tmp_path}: expected a Whisper folder" in capsys.readouterr().err
