"""`selective_scan`: one masked, bidirectional Mamba-1 selective scan with several implementations."""
import inspect

import jax
import jax.numpy as jnp

from actalker_jax.kernels.selective_scan.pallas import selective_scan_pallas
from actalker_jax.kernels.selective_scan.reference import selective_scan_reference
from actalker_jax.kernels.selective_scan.sequential import selective_scan_sequential
from actalker_jax.kernels.selective_scan.xla import selective_scan_xla

IMPLS = ("auto", "reference", "sequential", "xla", "pallas")


def _on_cuda():
    if jax.default_backend() != "gpu":
        return False
    try:
        return bool(jax.devices("cuda"))
    except RuntimeError:  # a ROCm GPU
        return False


def resolve_impl(impl):
    """The implementation `impl` names on this machine ("auto": pallas on CUDA GPUs, xla elsewhere)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "pallas" if _on_cuda() else "xla"
    return impl


_IMPL_FNS = {
    "reference": selective_scan_reference,
    "sequential": selective_scan_sequential,
    "xla": selective_scan_xla,
    "pallas": selective_scan_pallas,
}


def _knobs(impl_fn):
    """The tuning keywords of an implementation (its keyword-only parameters but the two scan flags)."""
    return [p.name for p in inspect.signature(impl_fn).parameters.values()
            if p.kind is p.KEYWORD_ONLY and p.name not in ("delta_softplus", "reverse")]


# Each implementation behind one `jax.jit` (flags and knobs static). A model calls the scan many times with few
# distinct shapes (SVD-xt: 60 scans, 3 level widths): jit's trace cache traces and lowers each distinct scan once
# (its Pallas kernels, forward and backward, once) instead of once per call: the SVD-xt training step held 360
# Pallas calls, 11 s of tracing and ~50 s of lowering on CPU hosts.
_JITTED = {impl: jax.jit(fn, static_argnames=("delta_softplus", "reverse", *_knobs(fn))) for impl, fn in _IMPL_FNS.items()}


def _check_shape(name, x, expected):
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(x.shape)}")


def _check_float(name, x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be floating point, got dtype {x.dtype}")


def selective_scan(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    *,
    delta_softplus=True,
    mask=None,
    reverse=False,
    impl="auto",
    options=None,
):
    """Mamba-1 selective scan over token-major sequences.

    dt = softplus(delta + delta_bias) (if `delta_softplus`), h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t
    from h = 0, y_t = C_t·h_t + D u_t, then y *= silu(z) when z is given. State and accumulation
    are float32; y has u's dtype.

    Args:
      u, delta: (batch, L, D) inputs and raw step sizes; z: optional (batch, L, D) gate.
      A: (D, N) state matrix (negative: pass -exp(A_log)).
      B, C: (batch, L, N) input and output projections.
      D, delta_bias: optional (D,) skip weight and step-size bias.
      mask: optional (batch, L) bool. A masked-out token is transparent (dt = 0: the state passes
        through) and outputs 0: the same as scanning only the kept tokens, in order, and
        scattering the outputs back into zeros.
      reverse: scan from the end (equal to flipping inputs and output, without the copies).
      impl: "reference" (lax.scan, differentiated by JAX), "sequential" (lax.scan with a hand-written
        adjoint; stores every state: small shapes on CPU), "xla" (chunked, any backend), "pallas" (GPU
        kernel; interpret mode elsewhere), "auto" (pallas on CUDA GPUs, xla elsewhere).
      options: optional tuning knobs of the chosen implementation (xla: chunk_size; pallas:
        block_d, chunk, sub, num_warps, interpret).

    Returns:
      y: (batch, L, D) in u's dtype.
    """
    impl = resolve_impl(impl)
    if u.ndim != 3:
        raise ValueError(f"u must have shape (batch, L, D), got {tuple(u.shape)}")
    batch, length, dim = u.shape
    if length < 1:
        raise ValueError(f"u must hold at least one token, got shape {tuple(u.shape)}")
    if A.ndim != 2 or A.shape[0] != dim:
        raise ValueError(f"A must have shape (D, N) = ({dim}, N), got {tuple(A.shape)}")
    nstate = A.shape[1]
    _check_shape("delta", delta, u.shape)
    _check_shape("B", B, (batch, length, nstate))
    _check_shape("C", C, (batch, length, nstate))
    for name, x in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)):
        _check_float(name, x)
    if z is not None:
        _check_shape("z", z, u.shape)
        _check_float("z", z)
    for name, x in (("D", D), ("delta_bias", delta_bias)):
        if x is not None:
            _check_shape(name, x, (dim,))
            _check_float(name, x)
    if mask is None:
        mask = jnp.ones((batch, length), jnp.bool_)
    else:
        _check_shape("mask", mask, (batch, length))
        if mask.dtype != jnp.bool_:
            raise ValueError(f"mask must be bool, got dtype {mask.dtype}")

    A = jnp.asarray(A, jnp.float32)
    D = jnp.zeros((dim,), jnp.float32) if D is None else jnp.asarray(D, jnp.float32)
    delta_bias = jnp.zeros((dim,), jnp.float32) if delta_bias is None else jnp.asarray(delta_bias, jnp.float32)
    options = dict(options or {})
    knobs = _knobs(_IMPL_FNS[impl])
    unknown = sorted(set(options) - set(knobs))
    if unknown:
        raise ValueError(f"options {unknown} are not knobs of impl={impl!r}; its knobs are {knobs}")
    return _JITTED[impl](
        u, delta, A, B, C, D, z, delta_bias, mask,
        delta_softplus=bool(delta_softplus), reverse=bool(reverse), **options,
    )
