"""Selective scan: every implementation against a float64 NumPy recurrence and its hand-written adjoint."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from actalker_jax.kernels.selective_scan import resolve_impl, selective_scan

# Small chunks so that short test sequences span several chunks, a ragged last chunk included.
OPTIONS = {
    "reference": None,
    "sequential": None,
    "xla": {"chunk_size": 8},
    "pallas": {"block_d": 4, "sub": 2, "block_d_bwd": 8, "sub_bwd": 4, "chunk": 8},
}
IMPLS = tuple(OPTIONS)
GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


# ----------------------------------------------------------------------------- float64 oracle


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_scan(u, delta, A, B, C, D, z, delta_bias, mask, softplus, reverse):
    """float64 forward recurrence; returns y and the per-token tensors the adjoint needs."""
    batch, length, dim = u.shape
    x = delta + delta_bias
    dt = np.where(mask[..., None], np.logaddexp(0.0, x) if softplus else x, 0.0)
    h = np.zeros((batch, dim, A.shape[1]))
    hs, decays, h_prevs = np.zeros((3, length, batch, dim, A.shape[1]))
    ys = np.zeros((batch, length, dim))
    order = range(length - 1, -1, -1) if reverse else range(length)
    for t in order:
        a = np.exp(dt[:, t, :, None] * A)
        h_prevs[t], decays[t] = h, a
        h = a * h + (dt[:, t] * u[:, t])[..., None] * B[:, t, None, :]
        hs[t] = h
        ys[:, t] = np.einsum("bdn,bn->bd", h, C[:, t]) + D * u[:, t]
    ys = np.where(mask[..., None], ys, 0.0)
    y = ys if z is None else ys * z * _sigmoid(z)
    cache = dict(x=x, dt=dt, hs=hs, decays=decays, h_prevs=h_prevs, ys=ys, order=list(order))
    return y, cache


def np_scan_grads(u, delta, A, B, C, D, z, delta_bias, mask, softplus, reverse, g):
    """Hand-written float64 adjoint of `np_scan` for the cotangent g (batch, L, D)."""
    _, cache = np_scan(u, delta, A, B, C, D, z, delta_bias, mask, softplus, reverse)
    dt, hs, decays, h_prevs = cache["dt"], cache["hs"], cache["decays"], cache["h_prevs"]
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    grads = {name: np.zeros_like(v) for name, v in zip(GRAD_NAMES, inputs) if v is not None}
    gy = g
    if z is not None:
        sig = _sigmoid(z)
        grads["z"] = g * cache["ys"] * sig * (1.0 + z * (1.0 - sig))
        gy = g * z * sig
    gy = np.where(mask[..., None], gy, 0.0)
    dsp = _sigmoid(cache["x"]) if softplus else np.ones_like(cache["x"])
    mu = np.zeros_like(hs[0])
    for t in reversed(cache["order"]):
        mu = mu + gy[:, t, :, None] * C[:, t, None, :]
        grads["C"][:, t] = np.einsum("bd,bdn->bn", gy[:, t], hs[t])
        grads["D"] += np.sum(gy[:, t] * u[:, t], axis=0)
        mu_b = np.einsum("bdn,bn->bd", mu, B[:, t])
        grads["u"][:, t] = gy[:, t] * D + dt[:, t] * mu_b
        grads["B"][:, t] = np.einsum("bdn,bd->bn", mu, dt[:, t] * u[:, t])
        ah = decays[t] * h_prevs[t]
        ddt = np.sum(mu * ah * A, axis=-1) + u[:, t] * mu_b
        grads["A"] += np.sum(mu * ah * dt[:, t, :, None], axis=0)
        grads["delta"][:, t] = np.where(mask[:, t, None], ddt * dsp[:, t], 0.0)
        mu = decays[t] * mu
    grads["delta_bias"] = grads["delta"].sum((0, 1))
    return grads


# ----------------------------------------------------------------------------- inputs


def make_inputs(seed, batch, length, dim, nstate, *, mask="random", with_z=True, with_d=True, with_bias=True):
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(batch, length, dim))
    delta = rng.normal(size=(batch, length, dim)) - 1.0
    A = -np.exp(rng.normal(scale=0.5, size=(dim, nstate)))
    B = rng.normal(size=(batch, length, nstate))
    C = rng.normal(size=(batch, length, nstate))
    D = rng.normal(size=(dim,)) if with_d else None
    z = rng.normal(size=(batch, length, dim)) if with_z else None
    bias = rng.normal(scale=0.5, size=(dim,)) if with_bias else None
    if mask == "random":
        m = rng.random((batch, length)) < 0.6
    elif mask == "all_true":
        m = np.ones((batch, length), bool)
    elif mask == "all_false":
        m = np.zeros((batch, length), bool)
    elif mask == "single":
        m = np.zeros((batch, length), bool)
        m[np.arange(batch), rng.integers(0, length, size=batch)] = True
    else:
        m = None
    g = rng.normal(size=(batch, length, dim))
    return dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=bias), m, g


def to_jax(arrays, dtype=jnp.float32):
    return {k: None if v is None else jnp.asarray(v, dtype) for k, v in arrays.items()}


def run_jax(impl, arrays, mask, g, *, softplus=True, reverse=False, options=None):
    """(y, grads dict) of selective_scan(impl) for cotangent g, under jit (options: OPTIONS[impl] unless given)."""
    options = OPTIONS[impl] if options is None else options
    names = [k for k in GRAD_NAMES if arrays[k] is not None]
    mask = None if mask is None else jnp.asarray(mask)

    @jax.jit
    def f(diff, g):
        def scan(diff):
            return selective_scan(
                **{**{k: None for k in GRAD_NAMES}, **diff},
                delta_softplus=softplus, mask=mask, reverse=reverse, impl=impl, options=options,
            )

        y, vjp = jax.vjp(scan, diff)
        return y, vjp(g)[0]

    y, grads = f({k: arrays[k] for k in names}, jnp.asarray(g, arrays["u"].dtype))
    return np.asarray(y, np.float64), {k: np.asarray(v, np.float64) for k, v in grads.items()}


def rel_err(x, ref):
    return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30))


def np_args(arrays, mask, softplus, reverse):
    batch, length, dim = arrays["u"].shape
    a = dict(arrays)
    a["D"] = np.zeros(dim) if a["D"] is None else a["D"]
    a["delta_bias"] = np.zeros(dim) if a["delta_bias"] is None else a["delta_bias"]
    m = np.ones((batch, length), bool) if mask is None else mask
    return (a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"], a["z"], a["delta_bias"], m, softplus, reverse)


# ----------------------------------------------------------------------------- tests


def test_numpy_adjoint_matches_finite_differences():
    arrays, mask, g = make_inputs(0, batch=2, length=5, dim=3, nstate=2, mask="random")
    for reverse in (False, True):
        args = np_args(arrays, mask, True, reverse)
        grads = np_scan_grads(*args, g)
        for i, name in enumerate(GRAD_NAMES):
            x = args[i]
            fd = np.zeros_like(x)
            for idx in np.ndindex(x.shape):
                plus, minus = x.copy(), x.copy()
                plus[idx] += 1e-6
                minus[idx] -= 1e-6
                lp = np.sum(np_scan(*args[:i], plus, *args[i + 1:])[0] * g)
                lm = np.sum(np_scan(*args[:i], minus, *args[i + 1:])[0] * g)
                fd[idx] = (lp - lm) / 2e-6
            assert rel_err(grads[name], fd) < 1e-6, (name, reverse)


CASES = {
    # name: (make_inputs kwargs, softplus, reverse)
    "odd_length": (dict(batch=3, length=37, dim=8, nstate=4, mask="random"), True, False),
    "reverse": (dict(batch=2, length=29, dim=8, nstate=4, mask="random"), True, True),
    "length_1": (dict(batch=2, length=1, dim=8, nstate=4, mask="all_true"), True, False),
    "all_false": (dict(batch=2, length=13, dim=8, nstate=4, mask="all_false"), True, True),
    "single_kept": (dict(batch=3, length=21, dim=8, nstate=4, mask="single"), True, False),
    "no_z_d_bias_mask": (
        dict(batch=2, length=19, dim=8, nstate=4, mask=None, with_z=False, with_d=False, with_bias=False),
        True, True,
    ),
    "all_true_no_softplus": (dict(batch=2, length=24, dim=12, nstate=8, mask="all_true", with_z=False), False, False),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_recurrence(impl, case):
    kwargs, softplus, reverse = CASES[case]
    arrays, mask, g = make_inputs(list(CASES).index(case), **kwargs)
    if not softplus:
        arrays["delta"] = np.abs(arrays["delta"]) * 0.3  # raw step sizes must be positive
        arrays["delta_bias"] = np.abs(arrays["delta_bias"])
    grads = _check_against_float64(impl, arrays, mask, g, softplus=softplus, reverse=reverse)
    assert set(grads) == {k for k in GRAD_NAMES if arrays[k] is not None}


def _check_against_float64(impl, arrays, mask, g, *, softplus, reverse, options=None):
    """y and every gradient of selective_scan(impl) within 1e-4 (relative) of the float64 recurrence; returns grads."""
    args = np_args(arrays, mask, softplus, reverse)
    y_ref, _ = np_scan(*args)
    grads_ref = np_scan_grads(*args, g)
    y, grads = run_jax(impl, to_jax(arrays), mask, g, softplus=softplus, reverse=reverse, options=options)
    assert rel_err(y, y_ref) <= 1e-4
    for name, value in grads.items():
        if np.max(np.abs(grads_ref[name])) == 0.0:
            assert np.max(np.abs(value)) == 0.0, name
        else:
            assert rel_err(value, grads_ref[name]) <= 1e-4, name
    return grads


def test_pallas_default_tiles_match_float64_recurrence():
    """The kernels' default tiles (pallas.DEFAULTS: 64-channel forward tile, 32-channel backward tile, the tuned
    values of the H200 sweep) over D = 96 channels (the forward tile reduced to 32, 96's largest power-of-two
    divisor; three backward tiles) and a short chunk."""
    from actalker_jax.kernels.selective_scan.pallas import DEFAULTS
    arrays, mask, g = make_inputs(5, batch=2, length=40, dim=96, nstate=4, mask="random")
    options = {**DEFAULTS, "chunk": 16}
    assert options["block_d_bwd"] == 32 and options["block_d"] == 64
    _check_against_float64("pallas", arrays, mask, g, softplus=True, reverse=True, options=options)


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_close_to_float32(impl):
    arrays, mask, g = make_inputs(7, batch=2, length=33, dim=8, nstate=4)
    y32, grads32 = run_jax(impl, to_jax(arrays), mask, g, reverse=True)
    bf = {k: None if v is None else jnp.asarray(v, jnp.bfloat16) for k, v in arrays.items()}
    bf["A"], bf["D"], bf["delta_bias"] = (jnp.asarray(arrays[k], jnp.float32) for k in ("A", "D", "delta_bias"))
    y16, grads16 = run_jax(impl, bf, mask, g, reverse=True)
    np.testing.assert_allclose(y16, y32, rtol=3e-2, atol=5e-2 * np.max(np.abs(y32)))
    for name in grads32:
        scale = np.max(np.abs(grads32[name]))
        np.testing.assert_allclose(grads16[name], grads32[name], rtol=3e-2, atol=5e-2 * scale, err_msg=name)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reverse", [False, True])
def test_mask_equals_gather_scan_scatter(impl, reverse):
    arrays, mask, _ = make_inputs(11, batch=3, length=26, dim=8, nstate=4, mask="random")
    mask[2] = False  # one sample keeps nothing
    arrays = to_jax(arrays)
    scan = jax.jit(
        lambda arrays, mask: selective_scan(**arrays, mask=mask, reverse=reverse, impl=impl, options=OPTIONS[impl])
    )
    y = np.asarray(scan(arrays, jnp.asarray(mask)))
    seq = ("u", "delta", "B", "C", "z")
    for b in range(3):
        keep = np.flatnonzero(mask[b])
        expected = np.zeros(y.shape[1:], np.float32)
        if keep.size:
            gathered = {k: (v[b : b + 1, keep] if k in seq else v) for k, v in arrays.items()}
            expected[keep] = np.asarray(scan(gathered, None)[0])
        np.testing.assert_allclose(y[b], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_vmap_matches_batch(impl):
    arrays, mask, _ = make_inputs(3, batch=4, length=17, dim=8, nstate=4)
    arrays = to_jax(arrays)
    mask = jnp.asarray(mask)
    seq = ("u", "delta", "B", "C", "z")

    def one(u, delta, B, C, z, mask):
        return selective_scan(
            u, delta, arrays["A"], B, C, arrays["D"], z, arrays["delta_bias"], mask=mask, impl=impl,
            options=OPTIONS[impl],
        )

    # Fold (4,) -> (2, 2): vmap over the outer axis, batch over the inner one.
    split = lambda x: x.reshape(2, 2, *x.shape[1:])
    y_vmap = jax.jit(jax.vmap(one))(*(split(arrays[k]) for k in seq), split(mask))
    y_batch = one(*(arrays[k] for k in seq), mask)
    np.testing.assert_allclose(np.asarray(y_vmap).reshape(y_batch.shape), np.asarray(y_batch), rtol=1e-5, atol=1e-6)


def _shape_error_inputs():
    arrays, mask, _ = make_inputs(0, batch=2, length=6, dim=4, nstate=2)
    return to_jax(arrays), jnp.asarray(mask)


@pytest.mark.parametrize(
    "name, bad, message",
    [
        ("u", jnp.zeros((6, 4)), r"u must have shape \(batch, L, D\), got \(6, 4\)"),
        ("delta", jnp.zeros((2, 5, 4)), r"delta must have shape \(2, 6, 4\), got \(2, 5, 4\)"),
        ("A", jnp.zeros((3, 2)), r"A must have shape \(D, N\) = \(4, N\), got \(3, 2\)"),
        ("B", jnp.zeros((2, 6, 3)), r"B must have shape \(2, 6, 2\), got \(2, 6, 3\)"),
        ("C", jnp.zeros((1, 6, 2)), r"C must have shape \(2, 6, 2\), got \(1, 6, 2\)"),
        ("z", jnp.zeros((2, 6, 5)), r"z must have shape \(2, 6, 4\), got \(2, 6, 5\)"),
        ("D", jnp.zeros((5,)), r"D must have shape \(4,\), got \(5,\)"),
        ("delta_bias", jnp.zeros((4, 1)), r"delta_bias must have shape \(4,\), got \(4, 1\)"),
        ("mask", jnp.ones((2, 7), bool), r"mask must have shape \(2, 6\), got \(2, 7\)"),
        ("mask", jnp.ones((2, 6), jnp.int32), r"mask must be bool, got dtype int32"),
        ("u", jnp.zeros((2, 0, 4)), r"u must hold at least one token, got shape \(2, 0, 4\)"),
    ],
)
def test_bad_shapes_raise(name, bad, message):
    arrays, mask = _shape_error_inputs()
    kwargs = {**arrays, "mask": mask, name: bad}
    with pytest.raises(ValueError, match=message):
        selective_scan(**kwargs, impl="xla")


def test_bad_impl_and_pallas_constraints():
    arrays, mask = _shape_error_inputs()
    with pytest.raises(ValueError, match=r"impl must be one of .* got 'cuda'"):
        selective_scan(**arrays, mask=mask, impl="cuda")
    with pytest.raises(ValueError, match=r"options \['chunk'\] are not knobs of impl='xla'"):
        selective_scan(**arrays, mask=mask, impl="xla", options={"chunk": 8})
    odd = dict(arrays, A=jnp.full((4, 3), -1.0), B=jnp.zeros((2, 6, 3)), C=jnp.zeros((2, 6, 3)))
    with pytest.raises(ValueError, match=r"N \(A.shape\[1\]\) to be a power of two, got A shape \(4, 3\)"):
        selective_scan(**odd, mask=mask, impl="pallas")


def test_auto_is_xla_off_gpu():
    assert resolve_impl("auto") == ("pallas" if jax.default_backend() == "gpu" else "xla")


@pytest.mark.parametrize("impl", ["sequential", "pallas"])
def test_repeated_scans_trace_once(impl):
    """A model's many scans of one shape share one traced (and lowered) program, backward included: the SVD-xt
    step's 360 Pallas calls lower to 72 kernels."""
    arrays = to_jax(make_inputs(0, 2, 16, 8, 4)[0])
    u, delta, A, B, C = (arrays[k] for k in ("u", "delta", "A", "B", "C"))

    def loss(u):
        first = selective_scan(u, delta, A, B, C, impl=impl)
        second = selective_scan(first, delta, 2 * A, B, C, impl=impl)
        other_direction = selective_scan(u, delta, A, B, C, reverse=True, impl=impl)
        return jnp.sum(second) + jnp.sum(other_direction)

    jaxpr = jax.make_jaxpr(jax.grad(loss))(u)
    scans = [id(e.params["jaxpr"]) for e in jaxpr.eqns
             if e.primitive.name in ("jit", "pjit") and e.params["name"].startswith("selective_scan_")]
    assert len(scans) >= 3 and len(set(scans)) < len(scans)
