"""Region masks -> per-level token selections, exactly as the official ACTalker code computes them.

The official pipeline resizes each image-resolution mask to a UNet level's token grid with PyTorch
`F.interpolate(mode="bicubic", align_corners=False)` (Keys cubic, a = -0.75, no antialias, border-clamped
taps; diffusers `IPAdapterMaskProcessor.downsample`) and keeps a token iff `value.int() != 0`
(truncation toward zero, so a box mask keeps a token only where its bicubic value is >= 1; spec §3.5).
The soft resized values also scale the masked IP-adapter attention.

`bicubic_resize` reproduces the PyTorch kernel with two separable interpolation matrices built in
NumPy (float32, ATen's formulas) and applied with matmuls, so shapes are static and it runs under jit
on any backend. `jax.image.resize(..., "bicubic")` is a different filter (Keys a = -0.5, antialiased
when downscaling) and selects different tokens.

Exactness: when in/out is a power of two (every UNet level of an image whose sides are multiples of
64) all tap weights are dyadic, (-0.09375, 0.59375, 0.59375, -0.09375) at scale 8·2^k, and a 0/1 mask
gives bit-identical values and token sets. At other ratios the weights agree with ATen to float32
rounding (~1e-6; ATen's exact rounding depends on its compiler's FMA contraction), so a token whose
value lies within ~1e-6 of ±1 may flip. Beware: at such ratios even an all-ones mask resizes to values
just below 1 in roughly a quarter of the rows (in PyTorch too), and those tokens are dropped.
"""

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np

CUBIC_A = -0.75  # PyTorch's bicubic coefficient


def _check_size(size) -> tuple[int, int]:
    try:
        h, w = (int(s) for s in size)
    except (TypeError, ValueError):
        raise ValueError(f"size must be a pair of positive ints (h, w), got {size!r}") from None
    if h <= 0 or w <= 0 or (h, w) != tuple(size):
        raise ValueError(f"size must be a pair of positive ints (h, w), got {size!r}")
    return h, w


def _cubic_near(x: np.float32) -> np.float32:
    """ATen cubic_convolution1, |x| <= 1, float32."""
    a = np.float32(CUBIC_A)
    return ((a + np.float32(2)) * x - (a + np.float32(3))) * x * x + np.float32(1)


def _cubic_far(x: np.float32) -> np.float32:
    """ATen cubic_convolution2, 1 < |x| < 2, float32."""
    a = np.float32(CUBIC_A)
    return ((a * x - np.float32(5) * a) * x + np.float32(8) * a) * x - np.float32(4) * a


@functools.lru_cache(maxsize=256)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float32 matrix M with resize(x) = M @ x along one axis.

    Row o holds the four tap weights of output o, taps at floor(src) - 1 .. floor(src) + 2 clamped to
    the border, src = (o + 0.5) * in_size / out_size - 0.5. Weights that clamp onto the same input are
    summed in tap order, as ATen's loop does for a one-hot input. Read-only (cached).
    """
    if int(in_size) != in_size or int(out_size) != out_size or in_size <= 0 or out_size <= 0:
        raise ValueError(f"bicubic_matrix: sizes must be positive ints, got in_size={in_size!r}, "
                         f"out_size={out_size!r}")
    in_size, out_size = int(in_size), int(out_size)
    one = np.float32(1)
    scale = np.float32(in_size) / np.float32(out_size)
    m = np.zeros((out_size, in_size), np.float32)
    for o in range(out_size):
        # one rounding, as ATen's fused multiply-add gives: (o + 0.5) * scale - 0.5 is exact in float64
        src = np.float32(np.float64(scale) * (o + 0.5) - 0.5)
        base = int(np.floor(src))
        t = src - np.float32(base)
        weights = (_cubic_far(t + one), _cubic_near(t), _cubic_near(one - t), _cubic_far((one - t) + one))
        for j, wj in enumerate(weights):
            m[o, min(max(base - 1 + j, 0), in_size - 1)] += wj
    m.setflags(write=False)
    return m


def bicubic_resize(masks: jax.Array, size) -> jax.Array:
    """PyTorch `F.interpolate(masks[:, None], size, mode="bicubic", align_corners=False)[:, 0]`.

    masks: (B, H, W), any real or bool dtype -> (B, h, w) float32 (values may leave [0, 1]).
    """
    h, w = _check_size(size)
    if jnp.ndim(masks) != 3:
        raise ValueError(f"bicubic_resize: masks must be (B, H, W), got shape {jnp.shape(masks)}")
    _, in_h, in_w = jnp.shape(masks)
    if in_h == 0 or in_w == 0:
        raise ValueError(f"bicubic_resize: empty masks of shape {jnp.shape(masks)}")
    mh = jnp.asarray(bicubic_matrix(in_h, h))
    mw = jnp.asarray(bicubic_matrix(in_w, w))
    x = jnp.asarray(masks).astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    # ATen sums the width taps inside, then the height taps: same nesting here
    rows = jnp.einsum("bhw,pw->bhp", x, mw, precision=hi)
    return jnp.einsum("oh,bhp->bop", mh, rows, precision=hi)


def truncate_nonzero(values: jax.Array) -> jax.Array:
    """`values.int() != 0` (truncation toward zero): True iff value >= 1 or value <= -1 (or NaN)."""
    return jnp.trunc(values) != 0


def select_tokens(masks: jax.Array, size) -> jax.Array:
    """Tokens of an (h, w) grid that a Mask-SSM branch scans: (B, H, W) -> bool (B, h*w), row-major."""
    h, w = _check_size(size)
    values = bicubic_resize(masks, (h, w))
    return truncate_nonzero(values).reshape(values.shape[0], h * w)


def level_sizes(latent_hw, num_levels: int) -> tuple[tuple[int, int], ...]:
    """Token grids of the UNet levels: the latent (h, w), then (n + 1) // 2 per stride-2 conv (padding 1).

    level_sizes((72, 128), 4) -> ((72, 128), (36, 64), (18, 32), (9, 16)).
    """
    h, w = _check_size(latent_hw)
    if isinstance(num_levels, bool) or not isinstance(num_levels, numbers.Integral) or num_levels < 1:
        raise ValueError(f"level_sizes: num_levels must be a positive int, got {num_levels!r}")
    sizes = [(h, w)]
    for _ in range(num_levels - 1):
        h, w = (h + 1) // 2, (w + 1) // 2
        sizes.append((h, w))
    return tuple(sizes)
