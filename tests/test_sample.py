"""Sampling on the demo-size model (random init saved in the trainer's checkpoint layout), 32x32 frames,
window 4, 2 Euler steps: frame counts, mp4 with audio, reproducibility, control modes, errors, one trace."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from actalker_jax import optim, sample, train
from actalker_jax.data import synthetic
from actalker_jax.models.actalker import ACTalkerModel
from demo_config import small_demo_config


SIZE, WINDOW, STEPS = 32, 4, 2
SAMPLES_PER_FRAME = 1280  # 16 kHz at 12.5 fps


def sampler_config():
    config = small_demo_config()
    config.data.n_frames = WINDOW
    config.model.unet.num_frames = WINDOW
    config.model.pcm.scan_impl = "reference"
    return config


def random_params(abstract: dict, seed: int = 0) -> dict:
    """A random init in numpy (no compilation): unit norms, zero biases, fan-in scaled kernels, Mamba defaults."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, leaf in abstract.items():
        name = key.split(".")[-1]
        if name in ("scale", "Ds", "mix_factor"):
            out[key] = np.ones(leaf.shape, np.float32)
        elif name in ("bias", "dt_projs_bias"):
            out[key] = np.zeros(leaf.shape, np.float32)
        elif name == "A_logs":
            out[key] = np.log(np.broadcast_to(np.arange(1, leaf.shape[-1] + 1, dtype=np.float32), leaf.shape)).copy()
        else:
            fan_in = max(int(np.prod(leaf.shape[:-1])), 1)
            out[key] = (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32)
    return out


def save_checkpoint(workdir: str, config, step: int = 1) -> None:
    """The trainer's layout: CheckpointManager(WORKDIR/checkpoints) with items state (params, opt_state, step,
    key) and config (JSON)."""
    import orbax.checkpoint as ocp

    abstract = train.flatten(nnx.split(nnx.eval_shape(
        lambda: ACTalkerModel(train.model_config(config), rngs=nnx.Rngs(0))))[1])
    params = random_params(abstract)
    optimizer = optim.make_optimizer(config.optim, int(config.total_steps))
    opt_state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(optimizer.init, abstract))
    state = dict(params=params, opt_state=opt_state, step=np.int32(step), key=jax.random.key(0))
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_handlers=dict(
        state=ocp.StandardCheckpointHandler(), config=ocp.JsonCheckpointHandler()))
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               config=ocp.args.JsonSave(json.loads(config.to_json_best_effort()))))
    manager.wait_until_finished()


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sample_run"))
    save_checkpoint(path, sampler_config())
    return path


@pytest.fixture(scope="session")
def loaded(workdir):
    return sample.load_model(workdir)


@pytest.fixture(scope="session")
def clip():
    return synthetic.generate_clip(5, 0, num_frames=3 * WINDOW, size=SIZE)


def motion_of(clip) -> np.ndarray:
    """The clip's ground-truth motion as records store it: [eye, brow, blink ; yaw, 0, 0, 0, 0, 0]."""
    return np.concatenate(synthetic.motion_features(clip["truth"]), -1)


def run(loaded, clip, frames, **kw):
    kw = dict(dict(control="audio", steps=STEPS, seed=0), **kw)
    return sample.generate(loaded, image=clip["frames"][0], wav=clip["wav"][:int(frames * SAMPLES_PER_FRAME)],
                           sample_rate=synthetic.SAMPLE_RATE, **kw)


def record_step_inputs(monkeypatch, record) -> None:
    """Patches `LoadedModel.denoise` so that every window call first hands its inputs dict to `record`."""
    build = sample.LoadedModel.denoise

    def spy(self):
        step = build(self)

        def recorded(x, sigma, sigma_next, scales, inputs):
            record(inputs)
            return step(x, sigma, sigma_next, scales, inputs)
        return recorded

    monkeypatch.setattr(sample.LoadedModel, "denoise", spy)


@pytest.fixture(scope="session")
def one_window(loaded, clip):
    return run(loaded, clip, WINDOW)


def test_loads_the_checkpoint(loaded, workdir):
    assert loaded.step == 1 and loaded.window == WINDOW
    assert loaded.config.media.face_finder == "synthetic"
    step_dir = sample.load_model(os.path.join(workdir, "checkpoints", "1"), weights="params")
    assert step_dir.step == 1
    with pytest.raises(sample.InputError, match=r"checkpoint: .*holds no 'ema' weights \(stored: \['key', 'opt_state'"):
        sample.load_model(workdir, weights="ema")
    with pytest.raises(sample.InputError, match=r"weights: must be one of"):
        sample.load_model(workdir, weights="best")


@pytest.mark.parametrize("multiple", [1.0, 2.3, 3.0])
def test_frame_count(loaded, clip, one_window, multiple):
    """T = floor(duration x fps) for 1x, 2.3x and 3x the window. No recompilation per window: the jitted step is
    traced once for every window, step and call (3x: 4 windows x 2 steps)."""
    frames = one_window if multiple == 1.0 else run(loaded, clip, multiple * WINDOW)
    assert frames.shape == (int(multiple * WINDOW), SIZE, SIZE, 3) and frames.dtype == np.uint8
    assert loaded.traces == 1


def test_same_seed_same_frames(loaded, clip, one_window):
    np.testing.assert_array_equal(run(loaded, clip, WINDOW), one_window)
    assert not np.array_equal(run(loaded, clip, WINDOW, seed=1), one_window)


@pytest.mark.parametrize("control,masks", [("motion", "regions"), ("both", "official")])
def test_control_modes(loaded, clip, one_window, control, masks):
    frames = run(loaded, clip, WINDOW, control=control, masks=masks, motion=motion_of(clip))
    assert frames.shape == one_window.shape
    assert not np.array_equal(frames, one_window)


def test_window_stride(loaded, clip, one_window, monkeypatch):
    """Stride 2: each window's frames are 2 apart, the fps id is fps / 2, the jitted step is reused; bad strides name
    the argument."""
    calls = []
    record_step_inputs(monkeypatch, lambda inputs: calls.append(float(np.asarray(inputs["added_time_ids"])[0, 0])))
    frames = run(loaded, clip, WINDOW, window_stride=2)
    assert frames.shape == one_window.shape and not np.array_equal(frames, one_window)
    assert calls == [loaded.media.fps / 2] * (2 * STEPS) and loaded.traces == 1   # 2 interleaved windows a step
    for bad in (0, 1.5, True):
        with pytest.raises(sample.InputError, match=rf"window_stride: .* must be an integer >= 1, got {bad}"):
            run(loaded, clip, WINDOW, window_stride=bad)


def test_guidance_regions(loaded, clip, one_window, monkeypatch):
    """On (the demo config's default): the guidance gets the reference's mouth mask averaged over each 4x4-pixel
    latent cell; off: no region, other frames, one more trace of the jitted step (another input structure)."""
    regions = []
    record_step_inputs(monkeypatch, lambda inputs: regions.append(inputs["guidance_mouth"]))
    assert loaded.config.diffusion.guidance_regions
    np.testing.assert_array_equal(run(loaded, clip, WINDOW, guidance_regions=True), one_window)
    mouth = loaded.media.reference(clip["frames"][0]).mask_audio.astype(np.float32)
    expected = mouth.reshape(8, 4, 8, 4).mean(axis=(1, 3))[None, None, :, :, None]
    calls = len(regions)      # windows x steps
    assert calls >= STEPS and 0 < expected.sum() < 64 and expected.max() == 1.0
    for region in regions:
        np.testing.assert_array_equal(np.asarray(region), expected)
    regions.clear()
    frames = run(loaded, clip, WINDOW, guidance_regions=False)
    assert regions == [None] * calls and not np.array_equal(frames, one_window) and loaded.traces == 2


def test_bench_inputs_match_the_sampler(loaded, clip, monkeypatch):
    """bench.sample's random static inputs have the keys, ranks and dtypes `generate` gives the sampler."""
    from actalker_jax.bench.sample import random_inputs

    given = {}

    def capture(loaded, static, *args, **kwargs):
        given.update(static)
        raise StopIteration

    monkeypatch.setattr(sample, "_sample_latents", capture)
    with pytest.raises(StopIteration):
        run(loaded, clip, WINDOW, guidance_regions=False)
    bench = random_inputs(loaded.model.config, WINDOW, (8, 8), factor=4)[0]
    assert set(bench) == set(given)
    for key, value in given.items():
        assert (value is None) == (bench[key] is None), key
        if value is not None:
            assert np.ndim(bench[key]) == np.ndim(value) and np.asarray(bench[key]).dtype == np.asarray(value).dtype, key


def test_motion_control_needs_motion(loaded, clip):
    with pytest.raises(sample.InputError, match="motion: --control motion needs driving motion"):
        run(loaded, clip, WINDOW, control="motion")


def test_command_writes_mp4_with_audio(workdir, clip, tmp_path, capsys):
    import av

    image, audio, driving, out = (str(tmp_path / n) for n in ("ref.png", "speech.wav", "driving.mp4", "out.mp4"))
    from PIL import Image

    Image.fromarray(clip["frames"][0]).save(image)
    frames = round(2.3 * WINDOW)
    synthetic.write_wav(audio, clip["wav"][:int(2.3 * WINDOW * SAMPLES_PER_FRAME)])
    synthetic.write_mp4(driving, clip["frames"], clip["fps"])
    assert sample.main(["--workdir", workdir, "--image", image, "--audio", audio, "--motion", driving,
                        "--control", "both", "--out", out, "--steps", str(STEPS), "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["frames"] == frames
    with av.open(out) as container:
        video, sound = container.streams.video[0], container.streams.audio[0]
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert video.codec_context.name in ("h264", "libx264")
        assert len(decoded) == frames and decoded[0].shape == (SIZE, SIZE, 3)
        video_seconds = float(video.duration * video.time_base)
        audio_seconds = float(sound.duration * sound.time_base)
    assert abs(video_seconds - frames / 12.5) < 1e-3
    assert abs(audio_seconds - frames / 12.5) < 0.07  # AAC frames of 1024 samples


def test_motion_features_files(clip, tmp_path):
    """--motion-features: .npy [expression ; pose] as generate takes it, or .npz with the records' keys."""
    motion = motion_of(clip)
    np.save(tmp_path / "m.npy", motion)
    expression_dim = synthetic.EXPRESSION_DIM
    np.savez(tmp_path / "m.npz", motion=motion[:, :expression_dim], pose=motion[:, expression_dim:])
    np.testing.assert_array_equal(sample.read_motion_features(str(tmp_path / "m.npy")), motion)
    np.testing.assert_array_equal(sample.read_motion_features(str(tmp_path / "m.npz")), motion)


def test_errors_name_the_input(loaded, workdir, clip, tmp_path, capsys):
    with pytest.raises(sample.InputError, match=r"audio: too short: 0\.030 s gives no frame"):
        sample.generate(loaded, image=clip["frames"][0], wav=clip["wav"][:480], sample_rate=16000, control="audio")
    with pytest.raises(sample.InputError, match="audio: silent"):
        sample.generate(loaded, image=clip["frames"][0], wav=np.zeros(16000, np.float32), sample_rate=16000,
                        control="audio")
    with pytest.raises(sample.InputError, match="audio: empty"):
        sample.generate(loaded, image=clip["frames"][0], wav=np.zeros(0, np.float32), sample_rate=16000,
                        control="audio")
    grey = np.full((SIZE, SIZE, 3), 128, np.uint8)
    with pytest.raises(sample.InputError, match="image: no face found"):
        sample.generate(loaded, image=grey, wav=clip["wav"], sample_rate=16000, control="audio")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    audio = str(tmp_path / "speech.wav")
    synthetic.write_wav(audio, clip["wav"])
    assert sample.main(["--workdir", workdir, "--image", str(bad), "--audio", audio, "--control", "audio",
                        "--out", str(tmp_path / "o.mp4")]) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("error: --image") and str(bad) in message and "\n" not in message


def test_mismatched_checkpoint_config(workdir, tmp_path):
    step_dir = str(tmp_path / "1")
    shutil.copytree(os.path.join(workdir, "checkpoints", "1"), step_dir)
    config_file = os.path.join(step_dir, "config", "metadata")
    with open(config_file) as f:
        stored = json.load(f)
    stored["model"]["id_dim"] = 7
    with open(config_file, "w") as f:
        json.dump(stored, f)
    with pytest.raises(sample.InputError, match=r"checkpoint: .*parameter id_proj\.proj1\.kernel has shape"):
        sample.load_model(step_dir)
    del stored["media"]["face_finder"]
    with open(config_file, "w") as f:
        json.dump(stored, f)
    with pytest.raises(sample.InputError, match=r"lacks config\.media\.face_finder"):
        sample.load_model(step_dir)


def test_circular_windows():
    """Spec §6: windows of W start at j·W − shift (mod N), cover every frame, the wrap-around one twice."""
    from actalker_jax import diffusion

    windows = diffusion.circular_windows(35, 25, 0)
    np.testing.assert_array_equal(windows[0], np.arange(25))
    np.testing.assert_array_equal(windows[1], np.r_[25:35, 0:15])
    shifted = diffusion.circular_windows(35, 25, diffusion.window_shift(1, 25))
    np.testing.assert_array_equal(shifted[0], np.r_[28:35, 0:18])
    assert [diffusion.window_shift(i, 25) for i in range(5)] == [0, 7, 14, 21, 3]
    for n, w, shift in [(8, 4, 3), (13, 4, 1), (50, 25, 21)]:
        counts = np.bincount(diffusion.circular_windows(n, w, shift).ravel(), minlength=n)
        assert counts.min() == 1 and counts.max() <= 2 and counts.sum() == -(-n // w) * w


def test_circular_windows_with_stride():
    """Stride s: s interleaved sequences r, r + s, ..., each covered by its own circular windows; stride 1 is the
    spec's windows. The buffer: T + W frames at stride 1, else a multiple of s with >= W frames per sequence."""
    from actalker_jax import diffusion

    for n, w, shift in [(35, 25, 7), (13, 4, 1)]:
        np.testing.assert_array_equal(diffusion.circular_windows(n, w, shift, 1),
                                      diffusion.circular_windows(n, w, shift))
    windows = diffusion.circular_windows(33, 8, 7, 3)
    assert windows.shape == (6, 8)
    np.testing.assert_array_equal(windows[0], 3 * ((np.arange(8) - 7) % 11))
    np.testing.assert_array_equal(windows[2], 3 * ((np.arange(8) - 7) % 11) + 1)
    np.testing.assert_array_equal(windows[5], 3 * ((np.arange(8) + 1) % 11) + 2)
    assert all(len(set(window % 3)) == 1 for window in windows)
    counts = np.bincount(windows.ravel(), minlength=33)
    assert counts.min() == 1 and counts.max() == 2 and counts.sum() == 48
    assert [diffusion.sampling_buffer_length(t, 8, s) for t, s in [(25, 1), (1, 1), (25, 3), (1, 3), (26, 3)]] == [
        33, 9, 33, 24, 36]
    with pytest.raises(ValueError, match=r"stride \(3\) >= 1 dividing num_latents \(32\)"):
        diffusion.circular_windows(32, 8, 0, 3)
    with pytest.raises(ValueError, match=r"window \(8\) <= num_latents / stride \(7\)"):
        diffusion.circular_windows(21, 8, 0, 3)


def test_media_latent_factor():
    from actalker_jax.media import Media, MediaError

    config = sampler_config()
    config.media.latent_factor = 2
    media = Media(config)
    assert (media.factor, media.latent_channels) == (2, 12)
    frames = np.random.default_rng(0).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    latents = media.encode(frames)
    assert latents.shape == (2, SIZE // 2, SIZE // 2, 12)
    np.testing.assert_array_equal(media.decode(latents), frames)
    for value, message in ((3, "latent_factor 3 does not divide config.media.image_size 32"),
                           (0, "latent_factor must be a positive int, got 0"),
                           (True, "latent_factor must be a positive int, got True")):
        bad = sampler_config()
        bad.media.latent_factor = value
        with pytest.raises(MediaError, match=message):
            Media(bad)
    bad = sampler_config()
    bad.media.update(autoencoder="vae", vae_path="/nowhere", latent_factor=4)
    with pytest.raises(MediaError, match="must be 8 for the SVD VAE, got 4"):
        Media(bad)
