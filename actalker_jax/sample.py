"""Sampling: reference image + speech (+ driving motion) -> talking-head mp4 with the speech muxed in.

    python -m actalker_jax.sample --workdir DIR | --checkpoint PATH --image REF.png --audio SPEECH.wav \
        [--motion DRIVING.mp4 | --motion-features F.npy] --control audio|motion|both --out OUT.mp4 \
        [--steps 25] [--seed 0] [--guidance 2.0 7.5 3.0] [--guidance-regions on|off] [--window-stride 1] \
        [--masks regions|official] [--face-box X0 Y0 X1 Y1] [--mouth-box X0 Y0 X1 Y1] [--no-progress]

Python API (used by evaluation):

    loaded = load_model("runs/demo")          # a workdir (newest checkpoint) or one checkpoint step directory
    frames = generate(loaded, image=ref, wav=wav, sample_rate=16000, motion=None, control="audio")
    # ref (H0, W0, 3) uint8, wav (S,) float32 mono -> frames (T, H, W, 3) uint8, T = floor(duration x fps)

Everything about the run comes from the config stored with the checkpoint: the model (config.model), the
compute dtype, the diffusion constants (config.diffusion), the pose-guider box scale (config.train) and how
media become model inputs (config.media, see `media.py`). EMA parameters are used when the checkpoint holds them.

Sampler (ACTALKER_SPEC §6, math in `diffusion.py`): Karras σ from 700 to 0.002 (+ 0), deterministic Euler on
v-prediction, start latent_scale·E(ref) + σ_0·ε; one model call per window on the 4 stacked guidance branches
(ε0 uncond, ε1 + appearance, ε2 + audio, ε3 + motion), combined ε0 + s1(ε1−ε0) + s2(ε2−ε1) + s3(ε3−ε2) with
(s1, s2, s3) = config.diffusion's guidance scales (spec and SVD configs 2.0, 7.5, 3.0; the demo 2.0, 3.0, 6.0) unless
`guidance` is given. Region guidance (config.diffusion.guidance_regions, `--guidance-regions on|off`; off = the
released sampler, on = the demo): the audio term only inside the reference's mouth region (the "regions" audio
mask, whatever `masks` is, averaged over each latent cell) and the motion term only outside it. Gates from the
control: audio (1, 0), motion (0, 1), both (1, 1); masks "regions" (mouth / face minus mouth) or "official".
added_time_ids = [fps / s, 12, 20] as the released inference (s = window stride, below; 1 there).

Long audio: the latent buffer holds T + W frames (W = window = min(25, config.data.n_frames): 25 for SVD-xt,
the training window for smaller models, e.g. 8 for the demo). The W padding frames get zero audio and motion
features, whose projections are the unconditional tokens, in every branch. At step i the buffer is covered by
circular windows of W frames shifted by (7 i) mod W; each window takes an Euler step from the same pre-step
buffer and frames covered twice are averaged; the first T frames are decoded. Memory is that of one window.
Window stride s (config.diffusion.window_stride, `--window-stride`; 1 = the above, the released sampler): a
window's frames are s output frames apart, as the frames of a training window at stride s when the training clips
are at the output fps (the demo: 3); the buffer (padded to a multiple of s, >= s W frames) splits into s
interleaved sequences, each covered by its own circular windows (`diffusion.circular_windows`).
The denoising step is one jitted function of (window latents, σ, σ_next, scales, window conditions): it is
traced once per model and window shape and reused for every window, step and call (`LoadedModel.traces`).
Output frames are at config.media.fps (12.5 for the released model); no frame interpolation.
"""

import argparse
import dataclasses
import functools
import json
import os
import sys
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from actalker_jax import diffusion
from actalker_jax.cli_args import WEIGHTS, add_guidance_argument, add_weights_argument, add_window_stride_argument
from actalker_jax.data.face import FaceError
from actalker_jax.media import Media, MediaError, resample
from actalker_jax.models.actalker import INFERENCE_MASKS, ACTalkerModel, control_masks, face_box_image
from actalker_jax.run_model import TrainError, face_box_scale, flatten, model_config, unflatten

CONTROLS = {"audio": (1.0, 0.0), "motion": (0.0, 1.0), "both": (1.0, 1.0)}
MAX_WINDOW = 25
MOTION_BUCKETS = (12.0, 20.0)
SILENCE = 1e-4


class InputError(ValueError):
    """A sampling input that cannot be used. `.input` names it (image, audio, motion, checkpoint, ...)."""

    def __init__(self, input_name: str, detail: str):
        super().__init__(f"{input_name}: {detail}")
        self.input, self.detail = input_name, detail


@dataclasses.dataclass
class LoadedModel:
    """A restored model with its run config. `traces` counts traces of the jitted denoising step."""

    model: ACTalkerModel
    config: ml_collections.ConfigDict
    step: int
    path: str
    media: Media
    window: int
    traces: int = 0
    _denoise: object = None

    def denoise(self):
        """The jitted window step (built once per LoadedModel)."""
        if self._denoise is None:
            self._denoise = _make_denoise(self, *nnx.split(self.model))
        return self._denoise

    def set_params(self, params: dict, step: int) -> None:
        """New parameter values ({"dotted.key": array}, same shapes), keeping the compiled denoising step."""
        _, state = nnx.split(self.model)
        if set(params) != set(flatten(state)):
            raise ValueError("set_params: the parameter keys differ from the model's")
        nnx.update(self.model, unflatten(state, params))
        self.step = step
        if self._denoise is not None:
            self._denoise = functools.partial(self._denoise.func, nnx.split(self.model)[1])

    @classmethod
    def from_params(cls, config, params: dict, step: int, path: str) -> "LoadedModel":
        """A LoadedModel of a run config and its parameters ({"dotted.key": array}), e.g. a train state's."""
        media = Media(config)
        dtype = jnp.dtype(config.get("compute_dtype", "float32"))
        graphdef, abstract = nnx.split(nnx.eval_shape(
            lambda: ACTalkerModel(model_config(config), rngs=nnx.Rngs(0), dtype=dtype)))
        model = nnx.merge(graphdef, unflatten(abstract, params))
        window = min(MAX_WINDOW, int(config.get("data", {}).get("n_frames", MAX_WINDOW)))
        return cls(model=model, config=config, step=step, path=path, media=media, window=window)


# ----------------------------------------------------------------------------- checkpoints

def _step_dir(path: str) -> tuple[str, int]:
    """A workdir (its newest checkpoint) or a step directory -> (step directory, step)."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        manager = ocp.CheckpointManager(os.path.join(path, "checkpoints"),
                                        options=ocp.CheckpointManagerOptions(read_only=True))
        step = manager.latest_step()
        if step is None:
            raise InputError("checkpoint", f"{path}: the workdir holds no complete checkpoint")
        return os.path.join(path, "checkpoints", str(step)), int(step)
    if os.path.isdir(os.path.join(path, "state")) and os.path.isdir(os.path.join(path, "config")):
        name = os.path.basename(path)
        return path, int(name) if name.isdigit() else -1
    raise InputError("checkpoint", f"{path}: neither a workdir (with checkpoints/) nor a checkpoint step directory "
                     "(with state/ and config/)")


def load_model(path: str, weights: str = "auto") -> LoadedModel:
    """A workdir or checkpoint step directory -> LoadedModel.

    weights: "auto" (the EMA of the parameters when the checkpoint stores one, else the parameters), "ema" or
    "params". Errors name the checkpoint and the config key or parameter that does not fit.
    """
    if weights not in WEIGHTS:
        raise InputError("weights", f"must be one of {WEIGHTS}, got {weights!r}")
    import orbax.checkpoint as ocp

    step_dir, step = _step_dir(path)
    try:
        config = ml_collections.ConfigDict(ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(
            os.path.join(step_dir, "config")))
    except Exception as err:  # noqa: BLE001  (orbax raises many types for a broken item)
        raise InputError("checkpoint", f"{step_dir}: unreadable config ({type(err).__name__}: {err})") from None
    try:
        Media(config)  # validates config.media
        mcfg = model_config(config)
    except (MediaError, TrainError, ValueError) as err:
        raise InputError("checkpoint", f"{step_dir}: {err}") from None
    dtype = jnp.dtype(config.get("compute_dtype", "float32"))
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: ACTalkerModel(mcfg, rngs=nnx.Rngs(0), dtype=dtype)))
    expected = flatten(abstract)
    stored = ocp.PyTreeCheckpointer().metadata(os.path.join(step_dir, "state")).item_metadata.tree
    item = weights if weights != "auto" else ("ema" if "ema" in stored else "params")
    if item not in stored:
        raise InputError("checkpoint", f"{step_dir}: holds no {item!r} weights (stored: {sorted(stored)})")
    _check_parameters(step_dir, item, expected, stored[item])
    target = {item: {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in expected.items()}}
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(global_shape=s.shape, dtype=s.dtype, sharding=device),
                                target)
    restored = ocp.PyTreeCheckpointer().restore(os.path.join(step_dir, "state"), args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True))
    return LoadedModel.from_params(config, restored[item], step, step_dir)


def _check_parameters(step_dir: str, item: str, expected: dict, stored: dict) -> None:
    missing = sorted(set(expected) - set(stored))
    extra = sorted(set(stored) - set(expected))
    if missing or extra:
        names = (f"missing {missing[:3]}" if missing else "") + (" " if missing and extra else "") + \
                (f"unexpected {extra[:3]}" if extra else "")
        raise InputError("checkpoint", f"{step_dir}: the stored {item} do not match the stored config.model "
                         f"({names}, {len(missing)} missing, {len(extra)} unexpected)")
    for key, value in expected.items():
        if tuple(stored[key].shape) != tuple(value.shape):
            raise InputError("checkpoint", f"{step_dir}: parameter {key} has shape {tuple(stored[key].shape)} in the "
                             f"checkpoint but {tuple(value.shape)} from the stored config.model")


# ----------------------------------------------------------------------------- the sampler

def _make_denoise(loaded: LoadedModel, graphdef, state):
    """jit(window step): (x (1, W, h, w, c), σ, σ_next, scales (3,), inputs) -> Euler-stepped x, float32."""

    def step(state, x, sigma, sigma_next, scales, inputs):
        loaded.traces += 1
        model = nnx.merge(graphdef, state)
        sample, timestep = diffusion.model_inputs(x, inputs["ref_latent"], sigma, inputs["prior"])
        conditions = dict(audio=inputs["audio"], expression=inputs["expression"], pose=inputs["pose"],
                          id_embed=inputs["id_embed"], face_image=inputs["face_image"])
        b = diffusion.repeat_branches(dict(sample=sample, timestep=timestep, added=inputs["added_time_ids"],
                                           conditions=conditions, gates=inputs["gates"],
                                           mask_audio=inputs["mask_audio"], mask_motion=inputs["mask_motion"]))
        out = model(b["sample"], b["timestep"], b["added"], b["conditions"], b["gates"], mask_audio=b["mask_audio"],
                    mask_motion=b["mask_motion"], **diffusion.guidance_batch(x.shape[0]))
        guided = diffusion.guided_denoised(diffusion.split_branches(out.astype(jnp.float32)), scales,
                                           inputs["guidance_mouth"])
        x0 = diffusion.denoised(guided, x, sigma, inputs["prior"])
        return diffusion.euler_step(x, x0, sigma, sigma_next)

    return functools.partial(jax.jit(step), state)


def _sample_latents(loaded: LoadedModel, static: dict, audio: np.ndarray, expression: np.ndarray, pose: np.ndarray,
                    *, ref_latent: np.ndarray, seed: int, edm: diffusion.EDMConfig, scales, progress: bool
                    ) -> np.ndarray:
    """Circular-window Euler sampling (module doc). audio (T, ...), expression (T, De), pose (T, 6) ->
    (T, h, w, c) unscaled latents."""
    from tqdm import tqdm

    frames, window, stride = len(audio), loaded.window, edm.window_stride
    total = diffusion.sampling_buffer_length(frames, window, stride)

    def padded(a):
        return np.concatenate([a, np.zeros((total - frames,) + a.shape[1:], np.float32)]).astype(np.float32)

    audio, expression, pose = padded(audio), padded(expression), padded(pose)
    shape = (1, total) + ref_latent.shape
    x = np.asarray(diffusion.init_latents(jax.random.key(seed), diffusion.scale_latents(ref_latent, edm), shape, edm))
    sigmas = np.asarray(diffusion.karras_sigmas(edm))
    scales = jnp.asarray(scales, jnp.float32)
    static = {k: None if v is None else jnp.asarray(v) for k, v in static.items()}
    static["prior"] = diffusion.data_prior(static["ref_latent"], edm)
    denoise = loaded.denoise()
    num_windows = len(diffusion.circular_windows(total, window, 0, stride))
    bar = tqdm(total=edm.num_steps * num_windows, unit="window", disable=not progress, dynamic_ncols=True)
    try:
        for i in range(edm.num_steps):
            acc = np.zeros_like(x)
            count = np.zeros((total,), np.float32)
            for index in diffusion.circular_windows(total, window, diffusion.window_shift(i, window), stride):
                inputs = dict(static, audio=audio[index][None], expression=expression[index][None],
                              pose=pose[index][None])
                acc[:, index] += np.asarray(denoise(x[:, index], sigmas[i], sigmas[i + 1], scales, inputs))
                count[index] += 1.0
                bar.update(1)
            x = acc / count[None, :, None, None, None]
    finally:
        bar.close()
    return np.asarray(diffusion.unscale_latents(x[0, :frames], edm))


def _motion_inputs(motion, frames: int, control: str, expression_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """motion (T0, De + 6) = [expression ; pose] or (T0, De) -> (expression (T, De), pose (T, 6)) float32.

    Audio control ignores motion (zeros: its gate closes the branch). A longer motion is cut to T frames, a
    shorter one is held at its last frame (with a warning).
    """
    if control == "audio" or motion is None:
        if control != "audio":
            raise InputError("motion", f"--control {control} needs driving motion (--motion or --motion-features)")
        return np.zeros((frames, expression_dim), np.float32), np.zeros((frames, 6), np.float32)
    motion = np.asarray(motion, np.float32)
    if motion.ndim != 2 or motion.shape[1] not in (expression_dim, expression_dim + 6) or not len(motion):
        raise InputError("motion", f"motion features must be (T, {expression_dim + 6}) = [expression ; pose] or "
                         f"(T, {expression_dim}), got shape {motion.shape}")
    if not np.all(np.isfinite(motion)):
        raise InputError("motion", "motion features hold NaN or inf")
    if len(motion) < frames:
        warnings.warn(f"motion has {len(motion)} frames, the audio {frames}: holding the last motion frame",
                      stacklevel=3)
        motion = np.concatenate([motion, np.repeat(motion[-1:], frames - len(motion), axis=0)])
    motion = motion[:frames]
    pose = motion[:, expression_dim:] if motion.shape[1] > expression_dim else np.zeros((frames, 6), np.float32)
    return motion[:, :expression_dim], pose


def _check_audio(wav: np.ndarray, frames: int, fps: float, control: str) -> None:
    if wav.size == 0:
        raise InputError("audio", "empty (no samples)")
    if not np.all(np.isfinite(wav)):
        raise InputError("audio", "holds NaN or inf samples")
    if frames < 1:
        raise InputError("audio", f"too short: {wav.size / 16000:.3f} s gives no frame at {fps:g} fps "
                         f"(need at least {1 / fps:.3f} s)")
    if control != "motion" and np.max(np.abs(wav)) < SILENCE:
        raise InputError("audio", f"silent (peak amplitude {np.max(np.abs(wav)):.1e} < {SILENCE:g})")


def generate(loaded: LoadedModel, *, image: np.ndarray, wav: np.ndarray, sample_rate: int,
             motion: np.ndarray | None = None, control: str, seed: int = 0, steps: int = 25,
             guidance: tuple | None = None, masks: str = "regions", window_stride: int | None = None,
             guidance_regions: bool | None = None, face_box=None, mouth_box=None, progress: bool = False
             ) -> np.ndarray:
    """Reference image (H0, W0, 3) uint8 + mono speech (S,) at `sample_rate` (+ motion (T0, De + 6) or (T0, De),
    [expression ; pose] per output frame as in records) -> frames (T, H, W, 3) uint8, T = floor(S / sr x fps).

    control: "audio" | "motion" | "both" (gates); masks: "regions" | "official"; guidance (s1, s2, s3) =
    (appearance, audio, motion), default config.diffusion's; window_stride: output frames between a sampling
    window's frames, default config.diffusion's (module doc); guidance_regions: audio guidance inside the mouth
    region and motion guidance outside it (module doc), default config.diffusion's; face_box / mouth_box
    (x0, y0, x1, y1) pixels of `image` override detection. Same inputs and seed -> identical frames. Raises
    InputError naming the input.
    """
    if control not in CONTROLS:
        raise InputError("control", f"must be one of {tuple(CONTROLS)}, got {control!r}")
    if masks not in INFERENCE_MASKS:
        raise InputError("masks", f"must be one of {INFERENCE_MASKS}, got {masks!r}")
    if int(steps) < 1:
        raise InputError("steps", f"must be >= 1, got {steps}")
    config, media = loaded.config, loaded.media
    mcfg = loaded.model.config
    try:
        wav = resample(wav, sample_rate)
    except MediaError as err:
        raise InputError("audio", str(err)) from None
    frames = media.num_frames(len(wav))
    _check_audio(wav, frames, media.fps, control)
    expression, pose = _motion_inputs(motion, frames, control, mcfg.expression_dim)
    try:
        ref = media.reference(image, face_box=face_box, mouth_box=mouth_box,
                              yaws=pose[:, 0] if control != "audio" else None)
    except FaceError as err:
        raise InputError("image", f"no face found ({err})") from None
    except MediaError as err:
        raise InputError("image", str(err)) from None
    audio = media.audio_features(wav, frames)
    _check_shapes(loaded, ref, audio)

    edm = diffusion.EDMConfig(**{**config.get("diffusion", ml_collections.ConfigDict()).to_dict(),
                                 "num_steps": int(steps)})
    if window_stride is not None:
        try:
            edm = dataclasses.replace(edm, window_stride=window_stride)
        except ValueError as err:
            raise InputError("window_stride", str(err)) from None
    if guidance_regions is not None:
        edm = dataclasses.replace(edm, guidance_regions=bool(guidance_regions))
    scales = edm.guidance_scales if guidance is None else tuple(float(s) for s in guidance)
    if len(scales) != 3:
        raise InputError("guidance", f"needs 3 scales (appearance, audio, motion), got {guidance}")
    gates = np.asarray([CONTROLS[control]], np.float32)
    size = (media.size, media.size)
    face_image = face_box_image(jnp.asarray(ref.face_box[None]), size, face_box_scale(config))
    mask_audio, mask_motion = control_masks(masks, jnp.asarray(gates), mouth=jnp.asarray(ref.mask_audio[None]),
                                            face_minus_mouth=jnp.asarray(ref.mask_motion[None]),
                                            face_box=face_image[..., 0])
    guidance_mouth = (diffusion.guidance_region(ref.mask_audio[None], ref.latent.shape[:2])
                      if edm.guidance_regions else None)
    static = dict(ref_latent=ref.latent[None], id_embed=ref.id_embed[None], face_image=face_image, gates=gates,
                  mask_audio=mask_audio, mask_motion=mask_motion, guidance_mouth=guidance_mouth,
                  added_time_ids=np.asarray([[media.fps / edm.window_stride, *MOTION_BUCKETS]], np.float32))
    latents = _sample_latents(loaded, static, audio, expression, pose, ref_latent=ref.latent, seed=seed, edm=edm,
                              scales=scales, progress=progress)
    return media.decode(latents)


def _check_shapes(loaded: LoadedModel, ref, audio: np.ndarray) -> None:
    """The media features must fit the model the config describes (a mismatched config names its key)."""
    mcfg = loaded.model.config
    checks = [("config.model.audio_seq_len / audio_blocks / audio_channels",
               (mcfg.audio_seq_len, mcfg.audio_blocks, mcfg.audio_channels), audio.shape[1:]),
              ("config.model.id_dim", (mcfg.id_dim,), ref.id_embed.shape),
              ("config.model.unet.out_channels", (mcfg.unet.out_channels,), ref.latent.shape[-1:]),
              ("config.model.unet.in_channels", (mcfg.unet.in_channels,), (2 * ref.latent.shape[-1],))]
    for key, model_shape, media_shape in checks:
        if tuple(model_shape) != tuple(media_shape):
            raise InputError("checkpoint", f"{loaded.path}: {key} = {tuple(model_shape)} does not fit config.media "
                             f"(its inputs give {tuple(media_shape)})")


# ----------------------------------------------------------------------------- command line

def read_image(path: str) -> np.ndarray:
    """An image file -> (H, W, 3) uint8 RGB; InputError naming the file when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise InputError("image", f"cannot read {path} ({type(err).__name__}: {err})") from None


def read_motion_features(path: str) -> np.ndarray:
    """.npy (T, De + 6) / (T, De), or .npz with `motion` (T, De) [and `pose` (T, 6)] as in records."""
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise InputError("motion", f"cannot read {path} ({type(err).__name__}: {err})") from None
    if isinstance(data, np.ndarray):
        return data
    with data:
        if "motion" not in data:
            raise InputError("motion", f"{path} has no 'motion' array (keys {sorted(data.files)})")
        parts = [data["motion"]] + ([data["pose"]] if "pose" in data else [])
        return np.concatenate([np.asarray(p, np.float32) for p in parts], axis=-1)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m actalker_jax.sample", description=__doc__.split("\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--workdir", help="training workdir (its newest checkpoint)")
    where.add_argument("--checkpoint", help="one checkpoint step directory (WORKDIR/checkpoints/STEP)")
    parser.add_argument("--image", required=True, help="reference image")
    parser.add_argument("--audio", required=True, help="speech (any audio or video file PyAV reads)")
    driving = parser.add_mutually_exclusive_group()
    driving.add_argument("--motion", help="driving video")
    driving.add_argument("--motion-features", help=".npy (T, De + 6) [expression ; pose] or .npz (motion, pose)")
    parser.add_argument("--control", required=True, choices=tuple(CONTROLS))
    parser.add_argument("--out", required=True, help="output .mp4")
    parser.add_argument("--steps", type=int, default=25)
    add_weights_argument(parser)
    parser.add_argument("--seed", type=int, default=0)
    add_guidance_argument(parser)
    add_window_stride_argument(parser)
    parser.add_argument("--masks", choices=INFERENCE_MASKS,
                        help="region masks (default: the run's config.model.inference_masks)")
    parser.add_argument("--face-box", type=float, nargs=4, metavar=("X0", "Y0", "X1", "Y1"))
    parser.add_argument("--mouth-box", type=float, nargs=4, metavar=("X0", "Y0", "X1", "Y1"))
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


_FLAGS = dict(image="--image", audio="--audio", motion="--motion")


def run(args: argparse.Namespace) -> dict:
    """The command: load, read inputs, generate, write the mp4. Returns a summary."""
    from actalker_jax.data import video_io

    loaded = load_model(args.workdir or args.checkpoint, args.weights)
    image = read_image(args.image)
    try:
        wav = video_io.decode_audio(args.audio)
    except video_io.DecodeError as err:
        raise InputError("audio", f"cannot read {args.audio} ({err})") from None
    motion = None
    if args.motion_features:
        motion = read_motion_features(args.motion_features)
    elif args.motion and args.control != "audio":
        try:
            driving = np.stack(list(video_io.decode_frames(args.motion, loaded.media.fps)))
            expression, pose = loaded.media.driving_motion(driving)
        except (video_io.DecodeError, ValueError) as err:
            raise InputError("motion", f"{args.motion}: {err}") from None
        motion = np.concatenate([expression, pose], axis=-1)
    masks = args.masks or loaded.config.model.get("inference_masks", "regions")
    frames = generate(loaded, image=image, wav=wav, sample_rate=video_io.SAMPLE_RATE, motion=motion,
                      control=args.control, seed=args.seed, steps=args.steps, guidance=args.guidance, masks=masks,
                      window_stride=args.window_stride, guidance_regions=args.guidance_regions,
                      face_box=args.face_box, mouth_box=args.mouth_box,
                      progress=not args.no_progress)
    fps = loaded.media.fps
    samples = int(round(len(frames) * video_io.SAMPLE_RATE / fps))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    video_io.write_video(args.out, frames, fps, audio=wav[:samples], sample_rate=video_io.SAMPLE_RATE)
    return dict(out=args.out, frames=len(frames), fps=fps, seconds=len(frames) / fps, step=loaded.step)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        summary = run(args)
    except InputError as err:
        flag = ("--workdir" if args.workdir else "--checkpoint") if err.input == "checkpoint" else \
            _FLAGS.get(err.input, err.input)
        given = {"image": args.image, "audio": args.audio, "motion": args.motion or args.motion_features,
                 "checkpoint": None}.get(err.input)
        name = f"{flag} {given}" if given and given not in err.detail else flag
        print(f"error: {name}: {err.detail}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
