"""Elementwise pieces shared by every selective-scan implementation.

All functions here are plain `jax.numpy` and lower inside Pallas kernels too.
"""
import jax
import jax.numpy as jnp

# Above this argument softplus(x) == x in float32 (the threshold mamba-ssm uses).
SOFTPLUS_THRESHOLD = 20.0


def softplus(x):
    """log(1 + exp(x)), exact to float32 rounding for every x."""
    return jnp.where(x > SOFTPLUS_THRESHOLD, x, jnp.log1p(jnp.exp(jnp.minimum(x, SOFTPLUS_THRESHOLD))))


def step_size(delta, delta_bias, valid, delta_softplus):
    """dt = softplus(delta + delta_bias), 0 where not `valid`; float32.

    delta: (..., D); delta_bias: (D,); valid: bool broadcastable to delta[..., :1].
    """
    x = delta.astype(jnp.float32) + delta_bias
    dt = softplus(x) if delta_softplus else x
    return jnp.where(valid, dt, 0.0)


def step_size_vjp(ddt, delta, delta_bias, valid, delta_softplus):
    """dL/d delta from dL/d dt (`ddt`, float32) through `step_size`; 0 where not `valid`.

    Written as one select on `ddt` (no bool -> float factor): the Triton lowering of Pallas turns
    `where(valid, 1.0, 0.0)` into a bool tensor that it then refuses to multiply.
    """
    if delta_softplus:
        ddt = ddt * jax.nn.sigmoid(delta.astype(jnp.float32) + delta_bias)
    return jnp.where(valid, ddt, 0.0)


def next_state(h, dt_t, u_t, b_t, A):
    """One token of the recurrence, exp(dt_t A) h + dt_t u_t B_t.

    h: (batch, D, N); dt_t, u_t: (batch, D); b_t: (batch, N); A: (D, N).
    """
    return jnp.exp(dt_t[..., None] * A) * h + (dt_t * u_t)[..., None] * b_t[:, None, :]


def silu_and_grad(z):
    """(silu(z), silu'(z)) in float32."""
    z = z.astype(jnp.float32)
    sig = jax.nn.sigmoid(z)
    return z * sig, sig * (1.0 + z * (1.0 - sig))
