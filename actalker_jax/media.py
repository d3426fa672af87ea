"""Raw media <-> model inputs for sampling and evaluation, chosen by a run's stored `config.media`.

    media = Media(config)                                   # config: the ml_collections config of the run
    ref = media.reference(image)                            # (H0, W0, 3) uint8 -> Reference (latent, masks, id)
    audio = media.audio_features(wav16, media.num_frames(len(wav16)))   # (T, S, K, A)
    expression, pose = media.driving_motion(frames)        # (T0, H0, W0, 3) uint8 -> (T0, De), (T0, 6)
    frames = media.decode(latents)                          # (T, h, w, c) unscaled -> (T, H, W, 3) uint8

Every step is the code the records were made with, so a model sees at sampling what it saw in training:

| config.media     | value             | reference / driving frames                          | code                          |
|------------------|-------------------|-----------------------------------------------------|-------------------------------|
| face_finder      | "synthetic"       | the renderer's geometry fitted to the image; id = Appearance.vector(); masks = `synthetic.region_masks` | `synthetic_fit`, `synthetic` |
|                  | "dlib"            | dlib track, square crop (CROP_EXPAND), masks, 128-d descriptor; motion = landmark descriptor + PnP pose | `face`, `motion` |
| autoencoder      | "pixel_unshuffle" | pixel_unshuffle(2 x / 255 - 1, f) / its exact inverse (f = latent_factor, default 4) | `demo_encoders` |
|                  | "vae"             | SVD VAE posterior mean (`preprocess.LatentEncoder`) / decode in chunks of 10 frames | `models/vae.py` |
| audio_features   | "log_mel"         | log-mel windows, 8 per frame                        | `demo_encoders.featurize_audio` |
|                  | "whisper"         | Whisper-tiny hidden states, 10-token windows        | `audio.WhisperEncoder`, `frame_windows` |

Synthetic faces: the region masks are the training ones of a clip whose mouth goes from closed to fully open
at the reference's yaw (and at every driving yaw when motion is given), since `region_masks` unites them over
the clip. A driving video's expression is [eye, brow, blink]; blink is not observable apart from the eye
openness and is estimated as clip(1 - eye / synthetic.MEAN_OPEN_EYE, 0, 1) / synthetic.BLINK_DEPTH.
Real photos (dlib): the reference is cropped to the square the preprocessor would cut around its face and
resized to image_size; masks and identity come from that single frame.
Overrides (`face_box`, `mouth_box`, (x0, y0, x1, y1) in pixels of the given image) replace detection: the
face box fixes the face (synthetic: the face ellipse's box; dlib: the detector box), the mouth box is the
audio region (intersected with the face box), the motion region is the face box minus it.
"""

import dataclasses
from typing import Any

import numpy as np

from actalker_jax.data import demo_encoders, synthetic

AUTOENCODERS = ("pixel_unshuffle", "vae")
AUDIO_FEATURES = ("log_mel", "whisper")
FACE_FINDERS = ("synthetic", "dlib")
SAMPLE_RATE = 16000
VAE_DECODE_CHUNK = 10
VAE_FACTOR = 8
REQUIRED_KEYS = ("autoencoder", "vae_path", "audio_features", "whisper_path", "face_finder", "image_size", "fps")


class MediaError(ValueError):
    """An input or stored config the media code cannot use; the message names it."""


@dataclasses.dataclass
class Reference:
    """The reference frame as the model sees it (H = W = image_size, latent h = H / factor)."""

    image: np.ndarray       # (H, W, 3) uint8: the (cropped, resized) reference
    latent: np.ndarray      # (h, w, c) float32, unscaled
    id_embed: np.ndarray    # (Di,) float32
    face_box: np.ndarray    # (4,) float32 x0, y0, x1, y1 in pixels of `image`
    mask_audio: np.ndarray  # (H, W) float32 0/1
    mask_motion: np.ndarray  # (H, W) float32 0/1


def media_config(config) -> dict[str, Any]:
    """config.media as a validated dict; a missing or bad key raises MediaError naming it."""
    media = config.get("media") if hasattr(config, "get") else None
    if media is None:
        raise MediaError("the run's config has no 'media' section (config.media.autoencoder, ...): it predates "
                         "sampling; add the section of configs/demo.py to the stored config")
    values = {}
    for key in REQUIRED_KEYS:
        if key not in media:
            raise MediaError(f"the run's config lacks config.media.{key}")
        values[key] = media[key]
    for key, choices in (("autoencoder", AUTOENCODERS), ("audio_features", AUDIO_FEATURES),
                         ("face_finder", FACE_FINDERS)):
        if values[key] not in choices:
            raise MediaError(f"config.media.{key} must be one of {choices}, got {values[key]!r}")
    for key, kind in (("vae_path", "vae"), ("whisper_path", "whisper")):
        if kind in (values["autoencoder"], values["audio_features"]) and not values[key]:
            raise MediaError(f"config.media.{key} is empty but config.media selects {kind!r}")
    size = int(values["image_size"])
    if size < 8 or size % 8:
        raise MediaError(f"config.media.image_size must be a positive multiple of 8, got {values['image_size']}")
    if not float(values["fps"]) > 0:
        raise MediaError(f"config.media.fps must be positive, got {values['fps']}")
    factor = _latent_factor(media, values["autoencoder"], size)
    return dict(values, image_size=size, fps=float(values["fps"]), latent_factor=factor)


def _latent_factor(media, autoencoder: str, size: int) -> int:
    """config.media.latent_factor (optional): pixels per latent side. pixel_unshuffle: any f >= 1 dividing
    image_size (default demo_encoders.LATENT_FACTOR, 3 f^2 latent channels); vae: 8 (the SVD VAE)."""
    default = demo_encoders.LATENT_FACTOR if autoencoder == "pixel_unshuffle" else VAE_FACTOR
    factor = media.get("latent_factor", default) if hasattr(media, "get") else default
    if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 1:
        raise MediaError(f"config.media.latent_factor must be a positive int, got {factor!r}")
    if autoencoder == "vae" and factor != VAE_FACTOR:
        raise MediaError(f"config.media.latent_factor must be {VAE_FACTOR} for the SVD VAE, got {factor}")
    if size % factor:
        raise MediaError(f"config.media.latent_factor {factor} does not divide config.media.image_size {size}")
    return int(factor)


def resample(wav: np.ndarray, sample_rate: int) -> np.ndarray:
    """Mono waveform at `sample_rate` -> (S,) float32 at 16 kHz (polyphase resampling)."""
    from math import gcd

    from scipy.signal import resample_poly

    wav = np.asarray(wav, np.float32)
    if wav.ndim == 2:
        wav = wav.mean(axis=-1 if wav.shape[-1] < wav.shape[0] else 0)
    if wav.ndim != 1:
        raise MediaError(f"audio must be a mono waveform (S,), got shape {wav.shape}")
    if int(sample_rate) == SAMPLE_RATE:
        return wav
    if int(sample_rate) <= 0:
        raise MediaError(f"sample rate must be positive, got {sample_rate}")
    g = gcd(SAMPLE_RATE, int(sample_rate))
    return resample_poly(wav, SAMPLE_RATE // g, int(sample_rate) // g).astype(np.float32)


def square_resize(image: np.ndarray, size: int) -> tuple[np.ndarray, float, np.ndarray]:
    """(H, W, 3) uint8 -> its centred square crop resized to (size, size), with the box map (scale, offset).

    A point (x, y) of the input is at (x - offset[0], y - offset[1]) * scale in the output.
    """
    from PIL import Image

    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = image[top:top + side, left:left + side]
    if side != size:
        square = np.asarray(Image.fromarray(square).resize((size, size), Image.Resampling.LANCZOS))
    return square, size / side, np.array([left, top], np.float32)


def box_mask(box, size: int) -> np.ndarray:
    """(size, size) bool: pixels whose centre lies in box (x0, y0, x1, y1)."""
    centres = np.arange(size) + 0.5
    x0, y0, x1, y1 = (float(v) for v in box)
    return ((centres[:, None] >= y0) & (centres[:, None] <= y1) & (centres[None, :] >= x0)
            & (centres[None, :] <= x1))


def _check_box(name: str, box) -> np.ndarray:
    box = np.asarray(box, np.float32).reshape(-1)
    if box.shape != (4,) or not (box[2] > box[0] and box[3] > box[1]):
        raise MediaError(f"{name} must be x0 y0 x1 y1 with x1 > x0 and y1 > y0, got {box.tolist()}")
    return box


class Media:
    """Reference, audio, motion and decoding per `config.media` (module doc). Heavy models load on first use."""

    def __init__(self, config):
        self.options = media_config(config)
        self.size = self.options["image_size"]
        self.fps = self.options["fps"]
        self._latent_encoder = None
        self._whisper = None
        self._dlib = None
        self._vae_decode = None

    # ------------------------------------------------------------------ autoencoder

    @property
    def factor(self) -> int:
        """Image pixels per latent pixel along each side (config.media.latent_factor)."""
        return self.options["latent_factor"]

    @property
    def latent_channels(self) -> int:
        return 3 * self.factor ** 2 if self.options["autoencoder"] == "pixel_unshuffle" else 4

    def _encoder(self):
        if self._latent_encoder is None:
            from actalker_jax.data.preprocess import LatentEncoder

            try:
                self._latent_encoder = LatentEncoder(self.options["vae_path"])
            except (OSError, ValueError) as err:
                raise MediaError(f"config.media.vae_path: {err}") from None
        return self._latent_encoder

    def encode(self, frames: np.ndarray) -> np.ndarray:
        """(T, H, W, 3) uint8 -> (T, h, w, c) float32 unscaled latents (as the records store them)."""
        if self.options["autoencoder"] == "pixel_unshuffle":
            return demo_encoders.pixel_unshuffle(frames.astype(np.float32) / 127.5 - 1.0, self.factor)
        return self._encoder()(frames)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """(T, h, w, c) unscaled latents -> (T, H, W, 3) uint8; the VAE decodes VAE_DECODE_CHUNK frames per call."""
        if self.options["autoencoder"] == "pixel_unshuffle":
            images = demo_encoders.pixel_shuffle(np.asarray(latents, np.float32), self.factor)
        else:
            images = np.concatenate([self._decode_chunk(latents[i:i + VAE_DECODE_CHUNK])
                                     for i in range(0, len(latents), VAE_DECODE_CHUNK)])
        return np.round(np.clip((images + 1.0) * 127.5, 0, 255)).astype(np.uint8)

    def _decode_chunk(self, latents: np.ndarray) -> np.ndarray:
        if self._vae_decode is None:
            import jax
            from flax import nnx

            graphdef, state = nnx.split(self._encoder().vae)

            @jax.jit
            def decode(state, z):
                return nnx.merge(graphdef, state).decode(z, z.shape[0])

            self._vae_decode = lambda z: decode(state, z)
        return np.asarray(self._vae_decode(np.asarray(latents, np.float32)), np.float32)

    # ------------------------------------------------------------------ audio

    def num_frames(self, num_samples: int) -> int:
        """Output frames of `num_samples` 16 kHz samples: floor(duration x fps)."""
        return int(np.floor(num_samples * self.fps / SAMPLE_RATE + 1e-6))

    def audio_features(self, wav: np.ndarray, num_frames: int) -> np.ndarray:
        """16 kHz mono (S,) -> per-frame windows (T, S_w, K, A) float32, the records' `audio` key."""
        if self.options["audio_features"] == "log_mel":
            return demo_encoders.featurize_audio(wav, num_frames, self.fps)
        from actalker_jax.data.audio import WhisperEncoder, frame_windows

        if self._whisper is None:
            try:
                self._whisper = WhisperEncoder(self.options["whisper_path"])
            except (OSError, ValueError) as err:
                raise MediaError(f"config.media.whisper_path: {err}") from None
        windows = frame_windows(self._whisper(wav), len(wav), self.fps)
        return windows[:num_frames].astype(np.float32)

    # ------------------------------------------------------------------ faces

    def _analyzer(self):
        if self._dlib is None:
            from actalker_jax.data.face import DlibFaceAnalyzer

            self._dlib = DlibFaceAnalyzer()
        return self._dlib

    def reference(self, image: np.ndarray, *, face_box=None, mouth_box=None, yaws=None) -> Reference:
        """(H0, W0, 3) uint8 -> Reference. Raises FaceError when no face is found (and no face_box is given).

        yaws: driving yaw values (degrees) the synthetic mouth region must also cover.
        """
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8 or min(image.shape[:2]) < 8:
            raise MediaError(f"the image must be (H, W, 3) uint8 with sides >= 8, got {image.dtype} {image.shape}")
        face_box = None if face_box is None else _check_box("face box", face_box)
        mouth_box = None if mouth_box is None else _check_box("mouth box", mouth_box)
        if self.options["face_finder"] == "synthetic":
            crop, face, id_embed, mask_audio, mask_motion = self._synthetic_reference(image, face_box, mouth_box, yaws)
        else:
            crop, face, id_embed, mask_audio, mask_motion = self._dlib_reference(image, face_box, mouth_box)
        return Reference(image=crop, latent=self.encode(crop[None])[0].astype(np.float32),
                         id_embed=np.asarray(id_embed, np.float32), face_box=np.asarray(face, np.float32),
                         mask_audio=mask_audio.astype(np.float32), mask_motion=mask_motion.astype(np.float32))

    def _synthetic_reference(self, image, face_box, mouth_box, yaws):
        from actalker_jax.data.synthetic_fit import fit_face

        crop, scale, offset = square_resize(image, self.size)
        if face_box is not None:
            face_box = (face_box - np.tile(offset, 2)) * scale
        fit = fit_face(crop, face_box)
        yaw = np.concatenate([[float(fit.params.yaw)], np.asarray(yaws if yaws is not None else [], np.float32)])
        mouth = np.repeat(np.array([0.0, 1.0]), len(yaw))
        clip = synthetic.FaceParams(fit.params.appearance, mouth=mouth, eye=np.ones_like(mouth),
                                    brow=np.full_like(mouth, 0.5), yaw=np.tile(yaw, 2))
        face = synthetic.clip_boxes(clip, self.size)["face"]
        mask_audio, mask_motion = synthetic.region_masks(clip, self.size)
        if mouth_box is not None:
            mask_audio, mask_motion = self._override_mouth((mouth_box - np.tile(offset, 2)) * scale, face)
        return crop, face, fit.params.appearance.vector(), mask_audio, mask_motion

    def _dlib_reference(self, image, face_box, mouth_box):
        from actalker_jax.data import face as facelib

        analyzer = self._analyzer()
        if face_box is None:
            track = analyzer.track(image[None])
            boxes, landmarks, id_embed = track.boxes, track.landmarks, track.id_embed
        else:
            import dlib

            shape = analyzer.predictor(image, dlib.rectangle(*(int(round(v)) for v in face_box)))
            boxes = face_box[None]
            landmarks = np.array([[(p.x, p.y) for p in shape.parts()]], np.float32)
            id_embed = np.asarray(analyzer.recognizer.compute_face_descriptor(image, shape), np.float32)
        square = facelib.crop_square(boxes, image.shape[:2])
        crop = facelib.crop_frames(image[None], square, self.size)[0]
        boxes_c = facelib.to_crop(boxes, square, self.size)
        mask_audio, mask_motion, face = facelib.region_masks(boxes_c, facelib.to_crop(landmarks, square, self.size),
                                                             self.size)
        if mouth_box is not None:
            mask_audio, mask_motion = self._override_mouth(facelib.to_crop(mouth_box, square, self.size), face)
        return crop, face, id_embed, mask_audio, mask_motion

    def _override_mouth(self, mouth_box, face_box) -> tuple[np.ndarray, np.ndarray]:
        face = box_mask(face_box, self.size)
        mouth = box_mask(mouth_box, self.size) & face
        if not mouth.any():
            raise MediaError(f"the mouth box {np.round(mouth_box, 1).tolist()} (model-frame pixels) lies outside "
                             f"the face box {np.round(face_box, 1).tolist()}")
        return mouth.astype(np.uint8), (face & ~mouth).astype(np.uint8)

    def driving_motion(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Driving frames (T, H0, W0, 3) uint8 at the model's fps -> (expression (T, De), pose (T, 6)) float32."""
        frames = np.asarray(frames)
        if self.options["face_finder"] == "synthetic":
            from actalker_jax.data.synthetic_fit import fit_face, fit_motion

            frames = np.stack([square_resize(f, self.size)[0] for f in frames])
            motion = fit_motion(frames, fit_face(frames[0]).params.appearance)
            blink = np.clip(1.0 - motion["eye"] / synthetic.MEAN_OPEN_EYE, 0.0, 1.0) / synthetic.BLINK_DEPTH
            expression = np.stack([motion["eye"], motion["brow"], np.minimum(blink, 1.0)], axis=-1)
            pose = np.zeros((len(frames), 6), np.float32)
            pose[:, 0] = motion["yaw"]
            return expression.astype(np.float32), pose
        from actalker_jax.data import face as facelib
        from actalker_jax.data import motion as motionlib

        track = self._analyzer().track(frames)
        square = facelib.crop_square(track.boxes, frames.shape[1:3])
        landmarks = facelib.to_crop(track.landmarks, square, self.size)
        return (motionlib.expression_descriptor(landmarks).astype(np.float32),
                motionlib.head_pose(landmarks, self.size).astype(np.float32))

