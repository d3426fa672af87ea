"""PCM layer: parameter count, equality with the official gather -> scan -> scatter (float64 NumPy),
locality, closed gates, per-sample masks in one batch, scan over the whole video."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from actalker_jax.models.masks import select_tokens
from actalker_jax.models.pcm import PCMLayer, pcm_param_count
from actalker_jax.models.unet import count_params

C, DC, GRID, FRAMES = 32, 24, (4, 6), 3
IMAGE = (8 * GRID[0], 8 * GRID[1])


def softplus(x):
    return np.logaddexp(0.0, x)


def silu(x):
    return x / (1.0 + np.exp(-x))


def numpy_unit(unit, seq):
    """Official SS2D_Unit on one gathered sequence (T, D), float64: forward scan + flipped reverse scan."""
    p = {k: np.asarray(getattr(unit, k)[...], np.float64)
         for k in ("x_proj_weight", "dt_projs_weight", "dt_projs_bias", "A_logs", "Ds")}
    d, r, n = unit.d_inner, unit.dt_rank, unit.d_state
    out = np.zeros_like(seq)
    for k in range(2):
        s = seq if k == 0 else seq[::-1]
        x_dbl = s @ p["x_proj_weight"][k].T
        dt = softplus(x_dbl[:, :r] @ p["dt_projs_weight"][k].T + p["dt_projs_bias"][k])
        b, c = x_dbl[:, r:r + n], x_dbl[:, r + n:]
        a = -np.exp(p["A_logs"][k * d:(k + 1) * d])
        dk = p["Ds"][k * d:(k + 1) * d]
        h = np.zeros((d, n))
        y = np.zeros_like(s)
        for t in range(s.shape[0]):
            h = np.exp(dt[t][:, None] * a) * h + (dt[t] * s[t])[:, None] * b[t][None, :]
            y[t] = h @ c[t] + dk * s[t]
        out += y if k == 0 else y[::-1]
    return out


def numpy_pcm(layer, x, id_token, audio, motion, keep_audio, keep_motion, placement="end"):
    """The official SS2D_cond_v10 for one frame, float64, with explicit NumPy gathers and scatters.

    x (L, C), id_token (1, Dc), audio (Na, Dc), motion (Nm, Dc), keep_* (L,) bool. placement "both_ends": the
    sequence [reversed(c); e; region; e; c] instead of the official [region; e; c].
    """
    w = lambda dense: np.asarray(dense.kernel[...], np.float64)  # noqa: E731  (in, out)
    e = silu(id_token @ w(layer.id_proj))
    branches = []
    for in_proj, cond_proj, cond, keep, unit in (
            (layer.in_proj1, layer.audio_proj, audio, keep_audio, layer.audio_unit),
            (layer.in_proj2, layer.exp_proj, motion, keep_motion, layer.exp_unit)):
        u = x @ w(in_proj)
        idx = np.nonzero(keep)[0]
        tail = np.concatenate([e, silu(cond @ w(cond_proj))], axis=0)
        head = tail[::-1] if placement == "both_ends" else tail[:0]
        y = numpy_unit(unit, np.concatenate([head, u[idx], tail], axis=0))
        u = u.copy()
        u[idx] = y[len(head):len(head) + len(idx)]
        branches.append(u)
    s = branches[0] + branches[1]
    s = (s - s.mean(-1, keepdims=True)) / np.sqrt(s.var(-1, keepdims=True) + 1e-5)
    s = s * np.asarray(layer.out_norm.scale[...]) + np.asarray(layer.out_norm.bias[...])
    return s @ w(layer.out_proj)


def make_inputs(batch, seed, na=5, nm=1):
    rng = np.random.default_rng(seed)
    bf = batch * FRAMES
    return dict(
        x=rng.standard_normal((bf, GRID[0] * GRID[1], C)).astype(np.float32),
        id_token=rng.standard_normal((bf, 1, DC)).astype(np.float32),
        audio=rng.standard_normal((batch, FRAMES, na, DC)).astype(np.float32),
        motion=rng.standard_normal((batch, FRAMES, nm, DC)).astype(np.float32),
    )


def box_mask(batch_boxes):
    """Image-resolution masks (B, H, W) from one (y0, y1, x0, x1) box per sample (None: empty)."""
    m = np.zeros((len(batch_boxes),) + IMAGE, np.float32)
    for i, box in enumerate(batch_boxes):
        if box is not None:
            y0, y1, x0, x1 = box
            m[i, y0:y1, x0:x1] = 1
    return m


@functools.lru_cache(maxsize=None)
def _forward(graphdef):
    def forward(state, x, id_token, conditions):
        return nnx.merge(graphdef, state)(x, encoder_hidden_states=id_token, conditions=conditions,
                                          num_frames=FRAMES, grid=GRID)
    return jax.jit(forward)


def run(layer, inp, mask_audio, mask_motion):
    """Jitted layer call (one compile per layer structure and input shape)."""
    conditions = dict(audio_tokens=jnp.asarray(inp["audio"]), motion_tokens=jnp.asarray(inp["motion"]),
                      mask_audio=jnp.asarray(mask_audio), mask_motion=jnp.asarray(mask_motion))
    graphdef, state = nnx.split(layer)
    return np.asarray(_forward(graphdef)(state, jnp.asarray(inp["x"]), jnp.asarray(inp["id_token"]), conditions))


@pytest.fixture(scope="module")
def layer():
    return PCMLayer(C, DC, rngs=nnx.Rngs(3), scan_impl="xla")


@pytest.mark.parametrize("channels", [320, 640, 1280])
def test_param_count_formula(channels):
    layer = nnx.eval_shape(lambda: PCMLayer(channels, 1024, rngs=nnx.Rngs(0)))
    assert count_params(layer) == 7 * channels ** 2 + 6548 * channels == pcm_param_count(channels)


def test_inits_follow_the_official_code(layer):
    unit = layer.audio_unit
    np.testing.assert_allclose(np.exp(np.asarray(unit.A_logs[...])), np.tile(np.arange(1, 17), (2 * 2 * C, 1)),
                               rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(unit.Ds[...]), 1.0)
    dt = np.log1p(np.exp(np.asarray(unit.dt_projs_bias[...], np.float64)))
    assert dt.min() >= 1e-4 - 1e-9 and dt.max() <= 0.1 + 1e-6
    assert np.abs(np.asarray(unit.dt_projs_weight[...])).max() <= unit.dt_rank ** -0.5


@pytest.mark.parametrize("placement", ["end", "both_ends"])
def test_matches_official_gather_scan_scatter_per_sample(layer, placement):
    """Batch 2 with different region masks == the official per-sample nonzero() gather, float64 oracle (and the
    both-ends placement of the conditions == the same oracle on that sequence)."""
    if placement != "end":
        layer = PCMLayer(C, DC, rngs=nnx.Rngs(3), scan_impl="xla", condition_placement=placement)
    inp = make_inputs(2, seed=0)
    mask_audio = box_mask([(16, 30, 10, 38), (0, 32, 0, 48)])
    mask_motion = box_mask([(2, 20, 4, 44), (9, 23, 13, 29)])
    got = run(layer, inp, mask_audio, mask_motion)
    keep_a = np.asarray(select_tokens(jnp.asarray(mask_audio), GRID))
    keep_m = np.asarray(select_tokens(jnp.asarray(mask_motion), GRID))
    assert 0 < keep_a[0].sum() < keep_a[1].sum() == GRID[0] * GRID[1]
    for i in range(2 * FRAMES):
        b, f = divmod(i, FRAMES)
        want = numpy_pcm(layer, inp["x"][i].astype(np.float64), inp["id_token"][i].astype(np.float64),
                         inp["audio"][b, f].astype(np.float64), inp["motion"][b, f].astype(np.float64),
                         keep_a[b], keep_m[b], placement)
        np.testing.assert_allclose(got[i], want, rtol=2e-4, atol=2e-4)


def test_batch_of_two_equals_two_batch_one_runs(layer):
    inp = make_inputs(2, seed=1)
    mask_audio = box_mask([(16, 30, 10, 38), None])
    mask_motion = box_mask([(2, 20, 4, 44), (0, 32, 0, 48)])
    both = run(layer, inp, mask_audio, mask_motion)
    for b in range(2):
        single = {k: v[b * FRAMES:(b + 1) * FRAMES] if k in ("x", "id_token") else v[b:b + 1] for k, v in inp.items()}
        np.testing.assert_allclose(both[b * FRAMES:(b + 1) * FRAMES],
                                   run(layer, single, mask_audio[b:b + 1], mask_motion[b:b + 1]),
                                   rtol=1e-5, atol=1e-5)


def test_audio_changes_only_audio_region_tokens(layer):
    inp = make_inputs(1, seed=2)
    mask_audio, mask_motion = box_mask([(16, 30, 10, 38)]), box_mask([(2, 20, 4, 44)])
    base = run(layer, inp, mask_audio, mask_motion)
    changed = dict(inp, audio=inp["audio"] + 1.0)
    diff = np.abs(run(layer, changed, mask_audio, mask_motion) - base).max(axis=-1)  # (BF, L)
    region = np.asarray(select_tokens(jnp.asarray(mask_audio), GRID))[0]
    assert np.all(diff[:, region] > 1e-4)
    assert np.all(diff[:, ~region] == 0.0)


def test_closed_audio_gate_ignores_audio(layer):
    """A closed branch has an empty mask: its condition tokens cannot reach any output."""
    inp = make_inputs(1, seed=3)
    empty, mask_motion = box_mask([None]), box_mask([(2, 20, 4, 44)])
    base = run(layer, inp, empty, mask_motion)
    np.testing.assert_array_equal(run(layer, dict(inp, audio=inp["audio"] * 3.0 + 1.0), empty, mask_motion), base)


def test_scan_over_video_crosses_frames():
    """Per frame: frame 0's motion token cannot reach frame 2. Over the video it can (and only via the scan)."""
    inp = make_inputs(1, seed=4)
    mask_audio, mask_motion = box_mask([(16, 30, 10, 38)]), box_mask([(2, 20, 4, 44)])
    changed = dict(inp, motion=inp["motion"].copy())
    changed["motion"][0, 0] += 1.0
    for scan_over, frame2_changes in (("frame", False), ("video", True)):
        layer = PCMLayer(C, DC, rngs=nnx.Rngs(3), scan_impl="xla", scan_over=scan_over)
        diff = np.abs(run(layer, changed, mask_audio, mask_motion) - run(layer, inp, mask_audio, mask_motion))
        assert (diff[2].max() > 1e-5) == frame2_changes, scan_over
        assert diff[0].max() > 1e-5


def test_zero_init_residual_is_identity_at_init():
    layer = PCMLayer(C, DC, rngs=nnx.Rngs(3), scan_impl="xla", residual="zero_init_residual")
    inp = make_inputs(1, seed=5)
    out = run(layer, inp, box_mask([(16, 30, 10, 38)]), box_mask([(2, 20, 4, 44)]))
    np.testing.assert_array_equal(out, inp["x"])


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="scan_over"):
        PCMLayer(C, DC, rngs=nnx.Rngs(0), scan_over="clip")
    with pytest.raises(ValueError, match="residual"):
        PCMLayer(C, DC, rngs=nnx.Rngs(0), residual="add")
    with pytest.raises(ValueError, match="condition_placement"):
        PCMLayer(C, DC, rngs=nnx.Rngs(0), condition_placement="start")
