"""Face finder for the synthetic renderer: fits `synthetic.render_face`'s geometry to an image.

    fit = fit_face(image)                      # (H, W, 3) uint8 -> FaceFit (raises FaceError without a face)
    fit.params                                 # FaceParams: Appearance + mouth, eye, brow, yaw of this frame
    motion = fit_motion(frames, fit.params.appearance)   # (T, H, W, 3) -> dict of (T,) mouth, eye, brow, yaw

The demo models are trained on `synthetic.py` faces, so their reference images and driving videos are
described exactly by a `FaceParams`; this module recovers it, so sampling and evaluation can build the same
identity vector, region masks and motion features the records hold.

Fit, in order (image in [0, 1], pixel centres at (j + 0.5, i + 0.5)):
1. background = median of the top pixel row (the hair ellipse never reaches it);
2. skin = the most frequent foreground colour (quantised to 1/16) in the central half of the image; the skin
   mask is every pixel within `COLOUR_TOLERANCE` of it (max over channels);
3. face ellipse: per row, the half-width of the skin extent plus half a pixel of antialiasing; rows at least
   60 % as wide as the widest (the neck is 45 %) give w(y)^2 = rx^2 (1 - (y - cy)^2 / ry^2), a quadratic in y
   solved by least squares for cy, rx, ry; cx = median row centre. A second candidate refits without the rows
   more than `OUTLIER_PIXELS` off the ellipse (up to `OUTLIER_PASSES` times), used when steps 4-6 on the first
   give no fit within `MAX_RMSE` (then the lower-RMSE fit is kept). A given face box replaces this step;
4. hair = median colour around the fringe centre (cx, cy - 0.8 ry); lips = skin x (0.85, 0.45, 0.45), the
   renderer's mean lip colour (a closed mouth shows too few lip pixels to measure them);
5. motion by grid search on renders: yaw on the whole face box (eyes, brows, mouth at mid values), then
   eye, brow and mouth each on its own feature box, then yaw again, finer;
6. (without a given face box) cx, cy, rx, ry refined by coordinate search (+-1 pixel) on the face box, then
   the motion fitted again.
A fit whose render differs from the image by more than `MAX_RMSE` (root mean square over the face box) is
not a face: FaceError.
"""

import dataclasses

import numpy as np

from actalker_jax.data import synthetic
from actalker_jax.data.face import FaceError

COLOUR_TOLERANCE = 0.07
MAX_RMSE = 0.15
LIPS_FROM_SKIN = np.array([0.85, 0.45, 0.45])
OUTLIER_PASSES = 3      # step 3 refits without rows whose half-width is off the fitted ellipse ...
OUTLIER_PIXELS = 1.0    # ... by more than this (hair / background blends under the hair can match the skin)
YAW_GRID = np.linspace(-synthetic.MAX_YAW - 5, synthetic.MAX_YAW + 5, 31)
UNIT_GRID = np.linspace(0.0, 1.0, 21)


@dataclasses.dataclass(frozen=True)
class FaceFit:
    """A fitted frame: its FaceParams (scalar motion fields) and the render's RMSE over the face box."""

    params: synthetic.FaceParams
    rmse: float


def _as_float(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise FaceError(f"expected an (H, W, 3) uint8 image, got {image.dtype} {image.shape}")
    return image.astype(np.float32) / 255.0


def _skin_colour(image: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Most frequent non-background colour of the central half of the image (3,)."""
    height, width = image.shape[:2]
    centre = image[height // 4:3 * height // 4, width // 4:3 * width // 4].reshape(-1, 3)
    centre = centre[np.abs(centre - background).max(-1) > COLOUR_TOLERANCE]
    if len(centre) < 0.1 * height * width / 4:
        raise FaceError("no foreground in the image centre")
    bins = np.minimum((centre * 16).astype(np.int64), 15)
    codes = bins[:, 0] * 256 + bins[:, 1] * 16 + bins[:, 2]
    mode = np.bincount(codes).argmax()
    return np.median(centre[codes == mode], axis=0)


def _ellipse_from_rows(rows: np.ndarray, centres: np.ndarray, widths: np.ndarray, keep: np.ndarray
                       ) -> tuple[float, float, float, float] | None:
    """(cx, cy, rx, ry) from the kept rows' half-widths, w(y)^2 = rx^2 (1 - (y - cy)^2 / ry^2); None if no ellipse."""
    y = rows[keep]
    a, b, c = np.linalg.lstsq(np.stack([np.ones_like(y), y, y * y], -1), widths[keep] ** 2, rcond=None)[0]
    if c >= 0 or a - b * b / (4 * c) <= 1.0:
        return None
    rx = float(np.sqrt(a - b * b / (4 * c)))
    return float(np.median(centres[keep])), float(-b / (2 * c)), rx, float(rx / np.sqrt(-c))


def _face_ellipses(image: np.ndarray, skin: np.ndarray) -> list[tuple[float, float, float, float]]:
    """Candidate (cx, cy, rx, ry) in pixels from the skin mask's row extents (module doc, step 3): the fit of every
    wide row, then (when it differs) the fit without the rows off the first by more than `OUTLIER_PIXELS`."""
    mask = np.abs(image - skin).max(-1) < COLOUR_TOLERANCE
    rows, centres, widths = [], [], []
    for i, row in enumerate(mask):
        xs = np.flatnonzero(row)
        if len(xs) >= 2:
            rows.append(i + 0.5)
            centres.append((xs[0] + xs[-1] + 1) / 2)
            widths.append((xs[-1] - xs[0] + 1) / 2 + 0.5)
    rows, centres, widths = map(np.asarray, (rows, centres, widths))
    if len(rows) < 5:
        raise FaceError("no face-shaped skin region")
    keep = widths >= 0.6 * widths.max()
    if keep.sum() < 3:
        raise FaceError("no face-shaped skin region")
    first = _ellipse_from_rows(rows, centres, widths, keep)
    if first is None:
        raise FaceError("the skin region is not an ellipse")
    candidates = [first]
    for _ in range(OUTLIER_PASSES):
        cx, cy, rx, ry = candidates[-1]
        fitted = rx * np.sqrt(np.maximum(1.0 - ((rows - cy) / ry) ** 2, 0.0))
        inliers = keep & (np.abs(fitted - widths) <= OUTLIER_PIXELS)
        if inliers.sum() < 3 or np.array_equal(inliers, keep):
            break
        keep = inliers
        refit = _ellipse_from_rows(rows, centres, widths, keep)
        if refit is None:
            break
        candidates = [first, refit]
    return candidates


def _box(ellipses: list[tuple], height: int, width: int, pad: float = 1.0) -> tuple[slice, slice]:
    """Pixel slices (rows, columns) of the union box of ellipses, padded."""
    boxes = np.stack([synthetic.ellipse_box(e) for e in ellipses])
    x0, y0 = np.floor(boxes[:, :2].min(0) - pad).astype(int)
    x1, y1 = np.ceil(boxes[:, 2:].max(0) + pad).astype(int)
    return slice(max(y0, 0), min(y1, height)), slice(max(x0, 0), min(x1, width))


def _best(image: np.ndarray, appearance: synthetic.Appearance, motion: dict, name: str, grid: np.ndarray,
          features: tuple[str, ...]) -> float:
    """The value of motion field `name` on `grid` whose render best matches the image on the features' box."""
    height, width = image.shape[:2]
    candidate = dict(motion, **{name: grid})
    params = synthetic.FaceParams(appearance, **candidate)
    geometry = synthetic.face_geometry(params, height, width)
    rows, cols = _box([geometry[f] for f in features], height, width)
    renders = synthetic.render_face(params, height, width)
    errors = ((renders[:, rows, cols] - image[rows, cols]) ** 2).mean((1, 2, 3))
    return float(grid[int(np.argmin(errors))])


def fit_motion_frame(image: np.ndarray, appearance: synthetic.Appearance) -> dict[str, float]:
    """mouth, eye, brow in [0, 1] and yaw (degrees) of one frame (H, W, 3) float in [0, 1] (module doc, step 5)."""
    motion = dict(mouth=0.3, eye=0.75, brow=0.5, yaw=0.0)
    everything = ("face", "left_eye", "right_eye", "left_brow", "right_brow", "mouth", "nose")
    motion["yaw"] = _best(image, appearance, motion, "yaw", YAW_GRID, everything)
    for _ in range(2):
        motion["eye"] = _best(image, appearance, motion, "eye", UNIT_GRID, ("left_eye", "right_eye"))
        motion["brow"] = _best(image, appearance, motion, "brow", UNIT_GRID, ("left_brow", "right_brow"))
        motion["mouth"] = _best(image, appearance, motion, "mouth", UNIT_GRID, ("mouth",))
        step = YAW_GRID[1] - YAW_GRID[0]
        motion["yaw"] = _best(image, appearance, motion, "yaw", motion["yaw"] + np.linspace(-step, step, 9),
                              everything)
    return motion


def _rmse(image: np.ndarray, params: synthetic.FaceParams) -> float:
    height, width = image.shape[:2]
    geometry = synthetic.face_geometry(params, height, width)
    rows, cols = _box([geometry["face"]], height, width)
    render = synthetic.render_face(params, height, width)
    return float(np.sqrt(((render[rows, cols] - image[rows, cols]) ** 2).mean()))


def _refine_ellipse(image: np.ndarray, appearance: synthetic.Appearance, motion: dict) -> synthetic.Appearance:
    """Coordinate search of cx, cy, rx, ry (+-1 pixel in quarter pixels, twice) on the face box RMSE."""
    height, width = image.shape[:2]
    scale = dict(cx=width, cy=height, rx=width, ry=height)
    for _ in range(2):
        for name, size in scale.items():
            base = getattr(appearance, name)
            candidates = [dataclasses.replace(appearance, **{name: base + d / size})
                          for d in np.linspace(-1.0, 1.0, 9)]
            errors = [_rmse(image, synthetic.FaceParams(a, **motion)) for a in candidates]
            appearance = candidates[int(np.argmin(errors))]
    return appearance


def _fit_from_ellipse(image: np.ndarray, background: np.ndarray, skin: np.ndarray, ellipse: tuple, refine: bool
                      ) -> FaceFit:
    """Steps 4-6 of the module doc from a face ellipse (cx, cy, rx, ry) in pixels."""
    height, width = image.shape[:2]
    cx, cy, rx, ry = ellipse
    if not (0 < cx < width and 0 < cy < height and 2 < rx < width and 2 < ry < height):
        raise FaceError(f"implausible face ellipse centre ({cx:.1f}, {cy:.1f}), radii ({rx:.1f}, {ry:.1f})")
    rows = slice(max(int(cy - 0.9 * ry), 0), max(int(cy - 0.7 * ry), 1))
    cols = slice(max(int(cx - 0.1 * rx), 0), max(int(cx + 0.1 * rx) + 1, 1))
    hair = np.median(image[rows, cols].reshape(-1, 3), axis=0)
    appearance = synthetic.Appearance(
        background=tuple(float(v) for v in background), skin=tuple(float(v) for v in skin),
        hair=tuple(float(v) for v in hair), lips=tuple(float(v) for v in np.clip(skin * LIPS_FROM_SKIN, 0, 1)),
        cx=cx / width, cy=cy / height, rx=rx / width, ry=ry / height)
    motion = fit_motion_frame(image, appearance)
    if refine:
        appearance = _refine_ellipse(image, appearance, motion)
        motion = fit_motion_frame(image, appearance)
    params = synthetic.FaceParams(appearance, **motion)
    return FaceFit(params=params, rmse=_rmse(image, params))


def fit_face(image: np.ndarray, face_box=None) -> FaceFit:
    """(H, W, 3) uint8 -> FaceFit. face_box (x0, y0, x1, y1) pixels: the face ellipse's box, skips step 3.

    Raises FaceError (message: why) when the image holds no synthetic face. Step 3's second candidate ellipse is
    tried only when the first gives no fit within `MAX_RMSE`.
    """
    image = _as_float(image)
    background = np.median(image[0], axis=0)
    skin = _skin_colour(image, background)
    if face_box is None:
        candidates = _face_ellipses(image, skin)
    else:
        x0, y0, x1, y1 = (float(v) for v in face_box)
        if x1 <= x0 or y1 <= y0:
            raise FaceError(f"face box {tuple(face_box)} is empty")
        candidates = [((x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2)]
    fits, errors = [], []
    for ellipse in candidates:
        try:
            fits.append(_fit_from_ellipse(image, background, skin, ellipse, refine=face_box is None))
        except FaceError as err:
            errors.append(err)
        if fits and fits[-1].rmse <= MAX_RMSE:
            break
    if not fits:
        raise errors[0]
    best = min(fits, key=lambda f: f.rmse)
    if best.rmse > MAX_RMSE:
        raise FaceError(f"no synthetic face: the best fit differs by RMSE {best.rmse:.3f} > {MAX_RMSE}")
    return best


def fit_motion(frames: np.ndarray, appearance: synthetic.Appearance) -> dict[str, np.ndarray]:
    """Frames (T, H, W, 3) uint8 of one face -> mouth, eye, brow, yaw, each (T,) float32."""
    fits = [fit_motion_frame(_as_float(frame), appearance) for frame in np.asarray(frames)]
    return {k: np.array([f[k] for f in fits], np.float32) for k in ("mouth", "eye", "brow", "yaw")}
