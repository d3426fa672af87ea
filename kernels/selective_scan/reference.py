"""Reference selective scan: a plain `lax.scan` over tokens, differentiated by JAX.

The readable definition of the operation. It keeps a (batch, D, N) float32 state and, under
`jax.grad`, stores one per token, so it is meant for tests and small shapes only.
"""
import jax
import jax.numpy as jnp
from jax import lax

from actalker_jax.kernels.selective_scan import common


def selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, mask, *, delta_softplus, reverse):
    """Selective scan of (batch, L, D) sequences; arguments as in `selective_scan` (D, delta_bias, mask given)."""
    dt = common.step_size(delta, delta_bias, mask[..., None], delta_softplus)
    xs = (
        jnp.swapaxes(dt, 0, 1),
        jnp.swapaxes(u.astype(jnp.float32), 0, 1),
        jnp.swapaxes(B.astype(jnp.float32), 0, 1),
        jnp.swapaxes(C.astype(jnp.float32), 0, 1),
    )

    def step(h, x):
        dt_t, u_t, b_t, c_t = x
        h = common.next_state(h, dt_t, u_t, b_t, A)
        return h, jnp.einsum("bdn,bn->bd", h, c_t)

    h0 = jnp.zeros((u.shape[0], u.shape[2], A.shape[1]), jnp.float32)
    _, y = lax.scan(step, h0, xs, reverse=reverse)
    y = jnp.swapaxes(y, 0, 1) + D * u.astype(jnp.float32)
    y = jnp.where(mask[..., None], y, 0.0)
    if z is not None:
        y = y * jax.nn.silu(z.astype(jnp.float32))
    return y.astype(u.dtype)
