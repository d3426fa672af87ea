"""Mask resizing and token selection: parity with PyTorch bicubic `F.interpolate` and `.int() != 0`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from actalker_jax.models.masks import (bicubic_matrix, bicubic_resize, level_sizes, select_tokens,
                                       truncate_nonzero)


def torch_resize(masks: np.ndarray, size) -> np.ndarray:
    x = torch.from_numpy(np.asarray(masks, np.float32))[:, None]
    return F.interpolate(x, size=tuple(size), mode="bicubic", align_corners=False)[:, 0].numpy()


def torch_select(masks: np.ndarray, size) -> np.ndarray:
    values = torch.from_numpy(torch_resize(masks, size))
    return (values.int() != 0).reshape(values.shape[0], -1).numpy()


def box_masks(height: int, width: int, boxes) -> np.ndarray:
    """(len(boxes), height, width) float32 masks, 1 inside [y0, y1) x [x0, x1)."""
    out = np.zeros((len(boxes), height, width), np.float32)
    for i, (y0, y1, x0, x1) in enumerate(boxes):
        out[i, y0:y1, x0:x1] = 1.0
    return out


def subposition_boxes(scale: int, cells_h: int, cells_w: int):
    """Boxes whose four edges take every offset 0..scale-1 inside a cell (columns shifted vs rows)."""
    boxes = []
    for a in range(scale):
        for b in range(scale):
            c, d = (a + 3) % scale, (b + 5) % scale
            boxes.append((scale + a, scale * (cells_h - 2) + b, scale + c, scale * (cells_w - 2) + d))
    return boxes


def random_boxes(rng, height, width, n):
    boxes = []
    for _ in range(n):
        y0, y1 = sorted(rng.choice(height + 1, 2, replace=False))
        x0, x1 = sorted(rng.choice(width + 1, 2, replace=False))
        boxes.append((y0, y1, x0, x1))
    return boxes


RESIZES = [((64, 64), (8, 8)), ((96, 64), (12, 8)), ((48, 80), (6, 10)), ((512, 512), (64, 64)),
           ((512, 512), (32, 32)), ((5, 7), (11, 13)), ((100, 60), (7, 9))]


@pytest.mark.parametrize("in_hw,out_hw", RESIZES)
def test_bicubic_resize_matches_torch(in_hw, out_hw):
    rng = np.random.default_rng(sum(in_hw) + sum(out_hw))
    soft = rng.uniform(0.0, 1.0, (2,) + in_hw).astype(np.float32)
    signed = rng.standard_normal((1,) + in_hw).astype(np.float32)
    boxes = box_masks(*in_hw, random_boxes(rng, *in_hw, 4))
    masks = np.concatenate([soft, signed, boxes])
    ours = np.asarray(bicubic_resize(masks, out_hw))
    assert ours.shape == (len(masks),) + out_hw and ours.dtype == np.float32
    np.testing.assert_allclose(ours, torch_resize(masks, out_hw), rtol=0, atol=1e-5)


@pytest.mark.parametrize("in_hw,out_hw", [((64, 64), (8, 8)), ((128, 96), (8, 6)), ((128, 128), (4, 4))])
def test_box_selection_matches_torch_at_every_subposition(in_hw, out_hw):
    scale = in_hw[0] // out_hw[0]
    rng = np.random.default_rng(scale)
    masks = box_masks(*in_hw, subposition_boxes(scale, *out_hw) + random_boxes(rng, *in_hw, 32))
    values = np.asarray(bicubic_resize(masks, out_hw))
    # power-of-two ratio: dyadic weights, bit-identical values
    np.testing.assert_array_equal(values, torch_resize(masks, out_hw))
    selected = np.asarray(select_tokens(masks, out_hw))
    assert selected.dtype == bool and selected.shape == (len(masks), out_hw[0] * out_hw[1])
    np.testing.assert_array_equal(selected, torch_select(masks, out_hw))
    # the sub-position sweep really crosses the keep/drop boundary
    assert 0 < selected[:scale * scale].sum() < selected[:scale * scale].size


def taps_inside(lo: int, hi: int, scale: int, n_out: int) -> np.ndarray:
    """Per output index: how many of its 4 central bicubic taps lie in [lo, hi) (dyadic scale >= 8)."""
    base = scale * np.arange(n_out) + scale // 2 - 1  # floor((o + 0.5) * scale - 0.5)
    taps = base[:, None] + np.arange(-1, 3)[None, :]
    return ((taps >= lo) & (taps < hi)).sum(axis=1)


def test_box_selection_spec_property():
    """Spec §3.5: a box (sides >= 3 px) keeps a token iff >= 3 of its 4 central taps are inside on both axes."""
    scale, out_hw = 8, (8, 10)
    in_hw = (scale * out_hw[0], scale * out_hw[1])
    rng = np.random.default_rng(3)
    boxes = [b for b in subposition_boxes(scale, *out_hw) + random_boxes(rng, *in_hw, 200)
             if b[1] - b[0] >= 3 and b[3] - b[2] >= 3]
    selected = np.asarray(select_tokens(box_masks(*in_hw, boxes), out_hw)).reshape((-1,) + out_hw)
    for (y0, y1, x0, x1), sel in zip(boxes, selected):
        rows = taps_inside(y0, y1, scale, out_hw[0]) >= 3
        cols = taps_inside(x0, x1, scale, out_hw[1]) >= 3
        np.testing.assert_array_equal(sel, rows[:, None] & cols[None, :], err_msg=f"box {(y0, y1, x0, x1)}")


def test_two_pixel_box_on_the_middle_taps_is_kept():
    """Exception to the >=3-taps rule: a 2-px box on exactly the two middle taps has profile 1.1875 >= 1."""
    masks = box_masks(64, 64, [(27, 29, 27, 29), (27, 29, 26, 30), (26, 29, 27, 29)])
    values = np.asarray(bicubic_resize(masks, (8, 8)))
    np.testing.assert_array_equal(values, torch_resize(masks, (8, 8)))
    assert values[0, 3, 3] == 1.1875 ** 2 and values[1, 3, 3] == 1.1875 and values[2, 3, 3] == 1.1875 * 1.09375
    selected = np.asarray(select_tokens(masks, (8, 8)))
    np.testing.assert_array_equal(selected, torch_select(masks, (8, 8)))
    assert selected.sum(axis=1).tolist() == [1, 1, 1]


def test_truncation_toward_zero_matches_torch_int():
    values = np.array([0.0, 0.5, 0.999999, 1.0, 1.09375, 2.5, -0.09375, -0.999999, -1.0, -1.5, 1e9, -1e9],
                      np.float32)
    expected = (torch.from_numpy(values).int() != 0).numpy()
    np.testing.assert_array_equal(np.asarray(truncate_nonzero(values)), expected)
    assert np.asarray(truncate_nonzero(np.array([np.nan], np.float32)))[0]


def test_jax_image_resize_selects_different_tokens():
    """Why we port the PyTorch kernel: jax.image.resize (Keys a=-0.5, antialiased) keeps other tokens."""
    masks = box_masks(64, 64, subposition_boxes(8, 8, 8))
    ours = np.asarray(select_tokens(masks, (8, 8)))
    theirs = np.asarray(jax.image.resize(jnp.asarray(masks), (len(masks), 8, 8), "bicubic"))
    theirs = (np.trunc(theirs) != 0).reshape(len(masks), -1)
    assert (ours != theirs).any(axis=1).sum() > 0


def test_bicubic_matrix_dyadic_weights_and_upscale_rows():
    m = bicubic_matrix(64, 8)
    np.testing.assert_array_equal(m[3, 26:30], [-0.09375, 0.59375, 0.59375, -0.09375])
    assert m.sum(axis=1).tolist() == [1.0] * 8
    up = bicubic_matrix(5, 11)  # border-clamped taps fold into the edge inputs
    np.testing.assert_allclose(up.sum(axis=1), 1.0, atol=1e-6)
    with pytest.raises(ValueError):
        up[0, 0] = 1.0


def test_select_tokens_under_jit_and_row_major_order():
    masks = box_masks(48, 80, [(0, 16, 40, 80)])  # top-right region of a 6x10 grid
    selected = jax.jit(select_tokens, static_argnums=1)(masks, (6, 10))
    grid = np.asarray(selected).reshape(6, 10)
    expected = np.zeros((6, 10), bool)
    expected[:2, 5:] = True
    np.testing.assert_array_equal(grid, expected)


def test_level_sizes():
    assert level_sizes((72, 128), 4) == ((72, 128), (36, 64), (18, 32), (9, 16))
    assert level_sizes((9, 5), 4) == ((9, 5), (5, 3), (3, 2), (2, 1))
    assert level_sizes((7, 7), 1) == ((7, 7),)


@pytest.mark.parametrize("call,match", [
    (lambda: bicubic_resize(np.zeros((4, 4), np.float32), (2, 2)), r"\(B, H, W\).*\(4, 4\)"),
    (lambda: bicubic_resize(np.zeros((1, 4, 4), np.float32), (0, 2)), r"\(0, 2\)"),
    (lambda: select_tokens(np.zeros((1, 4, 4), np.float32), (2.5, 2)), r"2\.5"),
    (lambda: select_tokens(np.zeros((1, 4, 4), np.float32), 8), r"pair"),
    (lambda: level_sizes((8, 8), 0), r"num_levels.*0"),
    (lambda: level_sizes((8, -1), 2), r"-1"),
    (lambda: bicubic_matrix(0, 4), r"in_size=0"),
])
def test_bad_inputs_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()
