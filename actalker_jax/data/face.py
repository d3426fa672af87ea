"""Face tracking, square crops and region masks (dlib: HOG detector, 68 landmarks, 128-d descriptor).

    analyzer = DlibFaceAnalyzer()
    track = analyzer.track(frames)                          # frames (T, H, W, 3) uint8 RGB
    square = crop_square(track.boxes, frames.shape[1:3])    # (x0, y0, side) in source pixels
    crops = crop_frames(frames, square, 512)                # (T, 512, 512, 3) uint8
    masks = region_masks(to_crop(track.boxes, square, 512), to_crop(track.landmarks, square, 512), 512)

Choices (official private aligner replaced; see ACTALKER_SPEC §3.5 and §8):
- detection runs on the frame resized so its longer side is `detect_size` (640) px, HOG with no upsampling;
  one face is tracked (the largest in the first frame with a face, then the best-IoU box per frame);
  a frame without a detection reuses the nearest tracked box for its landmarks. A clip fails when fewer
  than `min_detected` (50 %) of its frames have a detection.
- crop: a square of side `CROP_EXPAND` (1.8) x the longer side of the union face box (dlib boxes span
  brows to chin, so 1.8 keeps hair, ears and chin), centred on it, shifted to stay inside the frame;
  a square larger than the frame is padded by edge replication. Resized with INTER_AREA (down) or
  Lanczos (up).
- masks at crop resolution: face = union of the per-frame face boxes; mouth = union over the clip of
  each frame's lip-landmark (48-67) box, each grown by `MOUTH_MARGIN` (0.1) x the union-face-box side on
  every side, then intersected with the face mask; mask_motion = face and not mouth. (The official
  training code builds its mouth box from points 102/103 only, an indexing bug not reproduced here.)
- identity: the 128-d dlib ResNet descriptor of the detected frame nearest to the clip's middle.
"""

import dataclasses
import importlib.util
import os
from typing import Protocol

import numpy as np

CROP_EXPAND = 1.8
MOUTH_MARGIN = 0.1
DETECT_SIZE = 640
MIN_DETECTED = 0.5
LIPS = slice(48, 68)
NOSE = slice(27, 36)


class FaceError(ValueError):
    """No usable face in a clip; the message says why."""


@dataclasses.dataclass
class FaceTrack:
    """One tracked face over T frames, in source-frame pixels."""

    boxes: np.ndarray       # (T, 4) float32 x0, y0, x1, y1
    landmarks: np.ndarray   # (T, 68, 2) float32 x, y
    detected: np.ndarray    # (T,) bool, False where the box was carried over from a neighbour
    id_embed: np.ndarray    # (Di,) float32 identity descriptor of the reference frame
    ref_index: int          # the reference frame


class FaceAnalyzer(Protocol):
    """What the preprocessor needs from a face model: one face tracked over a clip."""

    def track(self, frames: np.ndarray) -> FaceTrack:
        """frames (T, H, W, 3) uint8 RGB -> FaceTrack (68-point iBUG landmark order)."""


def dlib_model_paths() -> tuple[str, str]:
    """(68-point shape predictor, face recognition ResNet) from the `face_recognition_models` package.

    The package's own helpers import `pkg_resources` (gone from recent setuptools), so the files are
    located from the package directory directly.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FaceError("dlib face models missing: pip install face-recognition-models dlib-bin")
    models = os.path.join(list(spec.submodule_search_locations)[0], "models")
    paths = (os.path.join(models, "shape_predictor_68_face_landmarks.dat"),
             os.path.join(models, "dlib_face_recognition_resnet_model_v1.dat"))
    for path in paths:
        if not os.path.isfile(path):
            raise FaceError(f"dlib model file missing: {path}")
    return paths


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class DlibFaceAnalyzer:
    """The default `FaceAnalyzer`: dlib HOG detector, 68-point predictor and 128-d face descriptor."""

    def __init__(self, detect_size: int = DETECT_SIZE, min_detected: float = MIN_DETECTED):
        import dlib

        predictor, recognizer = dlib_model_paths()
        self._dlib = dlib
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(predictor)
        self.recognizer = dlib.face_recognition_model_v1(recognizer)
        self.detect_size = detect_size
        self.min_detected = min_detected

    def detect(self, frame: np.ndarray) -> np.ndarray:
        """frame (H, W, 3) uint8 -> (n, 4) float32 face boxes x0, y0, x1, y1 in frame pixels."""
        import cv2

        scale = self.detect_size / max(frame.shape[:2])
        small = cv2.resize(frame, (round(frame.shape[1] * scale), round(frame.shape[0] * scale)),
                           interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        rects = self.detector(small, 0)
        return np.array([[r.left(), r.top(), r.right(), r.bottom()] for r in rects], np.float32).reshape(-1, 4) / scale

    def _rect(self, box: np.ndarray):
        return self._dlib.rectangle(*(int(round(v)) for v in box))

    def track(self, frames: np.ndarray) -> FaceTrack:
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise FaceError(f"track expects frames (T, H, W, 3) uint8, got {frames.dtype} {frames.shape}")
        count = frames.shape[0]
        boxes = np.zeros((count, 4), np.float32)
        detected = np.zeros(count, bool)
        previous = None
        for t, frame in enumerate(frames):
            found = self.detect(frame)
            if not len(found):
                continue
            if previous is None:
                areas = (found[:, 2] - found[:, 0]) * (found[:, 3] - found[:, 1])
                best = found[int(np.argmax(areas))]
            else:
                best = max(found, key=lambda b: _iou(b, previous))
                if _iou(best, previous) <= 0.0:
                    continue
            boxes[t], detected[t], previous = best, True, best
        hits = int(detected.sum())
        if hits == 0:
            raise FaceError(f"no face detected in {count} frames")
        if hits < self.min_detected * count:
            raise FaceError(f"face detected in only {hits} of {count} frames (need {self.min_detected:.0%})")
        found_at = np.flatnonzero(detected)
        nearest = found_at[np.abs(np.arange(count)[:, None] - found_at[None]).argmin(1)]
        boxes = boxes[nearest]
        landmarks = np.zeros((count, 68, 2), np.float32)
        shapes = []
        for t, frame in enumerate(frames):
            shape = self.predictor(frame, self._rect(boxes[t]))
            shapes.append(shape)
            landmarks[t] = [(p.x, p.y) for p in shape.parts()]
        ref = int(found_at[np.abs(found_at - count // 2).argmin()])
        id_embed = np.asarray(self.recognizer.compute_face_descriptor(frames[ref], shapes[ref]), np.float32)
        return FaceTrack(boxes=boxes, landmarks=landmarks, detected=detected, id_embed=id_embed, ref_index=ref)


def crop_square(boxes: np.ndarray, frame_hw: tuple[int, int], expand: float = CROP_EXPAND) -> tuple[int, int, int]:
    """Union of boxes (T, 4) -> square (x0, y0, side) in pixels: side = expand x longer union side, centred,
    shifted to lie inside the frame where it fits."""
    height, width = frame_hw
    x0, y0 = boxes[:, 0].min(), boxes[:, 1].min()
    x1, y1 = boxes[:, 2].max(), boxes[:, 3].max()
    side = int(round(expand * max(x1 - x0, y1 - y0)))
    if side < 8:
        raise FaceError(f"face box {x1 - x0:.0f}x{y1 - y0:.0f} px is too small to crop")
    left = int(round((x0 + x1) / 2 - side / 2))
    top = int(round((y0 + y1) / 2 - side / 2))
    if side <= width:
        left = min(max(left, 0), width - side)
    if side <= height:
        top = min(max(top, 0), height - side)
    return left, top, side


def crop_frames(frames: np.ndarray, square: tuple[int, int, int], size: int) -> np.ndarray:
    """frames (T, H, W, 3) uint8 -> (T, size, size, 3) uint8 crops of `square`, edge-replicated outside."""
    import cv2

    left, top, side = square
    height, width = frames.shape[1:3]
    pad = (max(0, -top), max(0, top + side - height), max(0, -left), max(0, left + side - width))
    interp = cv2.INTER_AREA if size < side else cv2.INTER_LANCZOS4
    out = np.empty((frames.shape[0], size, size, 3), np.uint8)
    for t, frame in enumerate(frames):
        if any(pad):
            frame = cv2.copyMakeBorder(frame, *pad, cv2.BORDER_REPLICATE)
        patch = frame[top + pad[0]:top + pad[0] + side, left + pad[2]:left + pad[2] + side]
        out[t] = cv2.resize(patch, (size, size), interpolation=interp)
    return out


def to_crop(points: np.ndarray, square: tuple[int, int, int], size: int) -> np.ndarray:
    """Source-pixel coordinates (..., 2k) (x, y pairs, e.g. boxes (T, 4) or landmarks (T, P, 2)) -> crop pixels."""
    left, top, side = square
    scale = size / side
    shape = points.shape
    flat = np.asarray(points, np.float32).reshape(*shape[:-1], -1, 2)
    return ((flat - np.array([left, top], np.float32)) * scale).reshape(shape)


def _box_mask(mask: np.ndarray, box: np.ndarray) -> None:
    size = mask.shape[0]
    x0, y0 = (int(np.clip(np.floor(v), 0, size)) for v in box[:2])
    x1, y1 = (int(np.clip(np.ceil(v), 0, size)) for v in box[2:])
    mask[y0:y1, x0:x1] = 1


def region_masks(boxes: np.ndarray, landmarks: np.ndarray, size: int,
                 mouth_margin: float = MOUTH_MARGIN) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crop-pixel boxes (T, 4) and landmarks (T, 68, 2) -> (mask_audio, mask_motion) (size, size) uint8 0/1
    and the union face box (4,) float32."""
    face = np.zeros((size, size), np.uint8)
    for box in boxes:
        _box_mask(face, box)
    union = np.array([boxes[:, 0].min(), boxes[:, 1].min(), boxes[:, 2].max(), boxes[:, 3].max()], np.float32)
    margin = mouth_margin * max(union[2] - union[0], union[3] - union[1])
    mouth = np.zeros((size, size), np.uint8)
    for lips in landmarks[:, LIPS]:
        _box_mask(mouth, np.concatenate([lips.min(0) - margin, lips.max(0) + margin]))
    mouth &= face
    if not mouth.any():
        raise FaceError("the mouth region lies outside the face box")
    return mouth, face & (1 - mouth), np.clip(union, 0, size).astype(np.float32)
