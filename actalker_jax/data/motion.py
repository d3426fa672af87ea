"""Landmark motion descriptors: expression shape, head pose and motion buckets (an open stand-in for the
official private VASA motion encoder, ACTALKER_SPEC §4 and §8).

    motion = expression_descriptor(landmarks)     # (T, 68, 2) -> (T, 96)
    pose = head_pose(landmarks, image_size)       # (T, 68, 2) -> (T, 6) yaw, pitch, roll (deg), 0, 0, 0
    head, exp = motion_buckets(landmarks)         # ints in [0, 128] (spec §5)

Expression: the 48 non-lip landmarks (iBUG points 0-47: jaw, brows, nose, eyes; the lips 48-67 are left
to the audio branch) are similarity-normalised per frame: translation removed (centroid 0), scale removed
(root-mean-square radius 1), rotation removed by 2-D orthogonal Procrustes onto a template. The template
is the clip's generalised-Procrustes mean (3 iterations), turned so the outer eye corners (36 -> 45) lie
along +x. The descriptor is the (x, y) coordinates flattened, (T, 96), in template units.

Head pose: `cv2.solvePnP` (iterative, from a frontal initial guess) of 6 landmarks (nose tip 30, chin 8,
outer eye corners 36 / 45, mouth corners 48 / 54) against the usual generic 3-D face model (mm, origin
at the nose tip), with a pinhole camera of focal length = image size centred in the image. The rotation
is reported as Z-Y-X Euler angles in degrees (R = Rz(roll) Ry(yaw) Rx(pitch), camera frame x right, y down,
z forward; a frontal face is 0, 0, 0): yaw > 0 when the nose turns toward the image's left, pitch > 0 when
it turns down, roll > 0 when the face tilts clockwise in the image. Translation is zeroed, as in the
official pose token.
"""

import numpy as np

NON_LIP = slice(0, 48)
EYE_OUTER = (36, 45)
NOSE_TIP = 30
PNP_POINTS = (30, 8, 36, 45, 48, 54)
# Generic 3-D face (nose tip, chin, left/right outer eye corner, left/right mouth corner), y up, z toward
# the viewer; converted below to the camera frame (y down, z away from the viewer).
GENERIC_FACE = np.array([(0.0, 0.0, 0.0), (0.0, -330.0, -65.0), (-225.0, 170.0, -135.0), (225.0, 170.0, -135.0),
                         (-150.0, -150.0, -125.0), (150.0, -150.0, -125.0)], np.float64)
MODEL_POINTS = GENERIC_FACE * np.array([1.0, -1.0, -1.0])


class MotionError(ValueError):
    """Landmarks a motion descriptor cannot use; the message says why."""


def _normalise(points: np.ndarray) -> np.ndarray:
    centred = points - points.mean(-2, keepdims=True)
    radius = np.sqrt((centred ** 2).sum(-1).mean(-1))[..., None, None]
    if np.any(radius <= 1e-9):
        raise MotionError("degenerate landmarks (all points coincide)")
    return centred / radius


def _rotate_onto(points: np.ndarray, template: np.ndarray) -> np.ndarray:
    """Rotates each (P, 2) shape of points (T, P, 2) about the origin onto template (P, 2) (least squares)."""
    dot = (points * template).sum((-1, -2))
    cross = (points[..., 0] * template[..., 1] - points[..., 1] * template[..., 0]).sum(-1)
    angle = np.arctan2(cross, dot)
    cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
    return np.stack([cos * points[..., 0] - sin * points[..., 1], sin * points[..., 0] + cos * points[..., 1]], -1)


def procrustes_normalise(points: np.ndarray, iterations: int = 3) -> np.ndarray:
    """(T, P, 2) shapes -> (T, P, 2) similarity-normalised onto their eye-levelled generalised-Procrustes mean."""
    shapes = _normalise(np.asarray(points, np.float64))
    template = shapes[0]
    for _ in range(iterations):
        template = _normalise(_rotate_onto(shapes, template).mean(0))
    dx, dy = template[EYE_OUTER[1]] - template[EYE_OUTER[0]]
    angle = -np.arctan2(dy, dx)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    template = template @ rotation.T
    return _rotate_onto(shapes, template)


def expression_descriptor(landmarks: np.ndarray) -> np.ndarray:
    """(T, 68, 2) landmarks -> (T, 96) float32 similarity-normalised non-lip landmark coordinates."""
    landmarks = np.asarray(landmarks)
    if landmarks.ndim != 3 or landmarks.shape[1:] != (68, 2):
        raise MotionError(f"expected landmarks (T, 68, 2), got {landmarks.shape}")
    aligned = procrustes_normalise(landmarks[:, NON_LIP])
    return aligned.reshape(len(landmarks), -1).astype(np.float32)


def _euler_zyx(rotation: np.ndarray) -> tuple[float, float, float]:
    """R = Rz(roll) Ry(yaw) Rx(pitch) -> (yaw, pitch, roll) in degrees."""
    yaw = np.arcsin(np.clip(-rotation[2, 0], -1.0, 1.0))
    pitch = np.arctan2(rotation[2, 1], rotation[2, 2])
    roll = np.arctan2(rotation[1, 0], rotation[0, 0])
    return tuple(float(np.degrees(a)) for a in (yaw, pitch, roll))


def head_pose(landmarks: np.ndarray, image_size: int) -> np.ndarray:
    """(T, 68, 2) landmarks in pixels of a square image -> (T, 6) float32 [yaw, pitch, roll, 0, 0, 0] (degrees)."""
    import cv2

    landmarks = np.asarray(landmarks, np.float64)
    if landmarks.ndim != 3 or landmarks.shape[1:] != (68, 2):
        raise MotionError(f"expected landmarks (T, 68, 2), got {landmarks.shape}")
    focal = float(image_size)
    camera = np.array([[focal, 0, image_size / 2], [0, focal, image_size / 2], [0, 0, 1]], np.float64)
    model_width = MODEL_POINTS[3, 0] - MODEL_POINTS[2, 0]
    pose = np.zeros((len(landmarks), 6), np.float32)
    for t, points in enumerate(landmarks):
        image_points = np.ascontiguousarray(points[list(PNP_POINTS)])
        eye_width = max(float(np.linalg.norm(image_points[3] - image_points[2])), 1.0)
        rvec = np.zeros((3, 1))
        tvec = np.array([[0.0], [0.0], [focal * model_width / eye_width]])
        ok, rvec, tvec = cv2.solvePnP(MODEL_POINTS, image_points, camera, None, rvec, tvec,
                                      useExtrinsicGuess=True, flags=cv2.SOLVEPNP_ITERATIVE)
        if not ok:
            raise MotionError(f"solvePnP failed on frame {t}")
        pose[t, :3] = _euler_zyx(cv2.Rodrigues(rvec)[0])
    return pose


def motion_buckets(landmarks: np.ndarray, max_value: int = 128) -> tuple[int, int]:
    """(T, 68, 2) landmarks -> (head, expression) buckets, the official `get_head_exp_motion_bucketid` on the
    68-point layout: nose tip 30 for the official point 80, all 68 points for its points 0-101.

    scale = diagonal of the first frame's nose-relative landmark box; head = mean distance of the nose from
    its mean / scale x 256; expression = mean distance of the nose-relative points from their means / scale
    x 1024; both truncated to int and clipped to [0, max_value].
    """
    landmarks = np.asarray(landmarks, np.float64)
    rel = landmarks - landmarks[:, NOSE_TIP:NOSE_TIP + 1]
    scale = np.sqrt(((rel[0].max(0) - rel[0].min(0)) ** 2).sum())
    if scale <= 0:
        raise MotionError("degenerate landmarks (zero extent)")
    exp = np.sqrt(((rel - rel.mean(0)) ** 2).sum(-1)).mean() / scale * 1024
    nose = landmarks[:, NOSE_TIP]
    head = np.sqrt(((nose - nose.mean(0)) ** 2).sum(-1)).mean() / scale * 256
    return int(np.clip(int(head), 0, max_value)), int(np.clip(int(exp), 0, max_value))
