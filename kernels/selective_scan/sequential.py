"""Token-by-token selective scan with a hand-written token-by-token adjoint (small shapes, CPU).

The forward pass is the reference recurrence (a `lax.scan` over tokens whose body keeps the (batch, D, N)
state in cache) that also emits every state; the backward pass is one `lax.scan` over the tokens in the
opposite order that carries the adjoint state mu_t = dL/dh_t,

    mu_t = g_t C_t + a_{t+1} mu_{t+1},   a_t = exp(dt_t A),

and emits each token's gradients from mu_t, h_t and h_{t-1}. JAX's own derivative of the reference scan
does the same work with more, smaller operations per token: at the CPU demo's PCM shape (16 sequences
of 261 tokens, D = 64, N = 16) forward + backward takes 0.64x its time (docs/benchmarks.md). It stores
every state, a (L, batch, D, N) float32 tensor, like the reference under `jax.grad`: use "xla" (chunked
rematerialisation) or "pallas" for long sequences.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax

from actalker_jax.kernels.selective_scan import common


def _token_major(x):
    """(batch, L, ...) -> (L, batch, ...) float32."""
    return jnp.swapaxes(x, 0, 1).astype(jnp.float32)


def _forward(delta_softplus, reverse, u, delta, A, B, C, D, z, delta_bias, mask):
    dt = common.step_size(delta, delta_bias, mask[..., None], delta_softplus)

    def step(h, x):
        dt_t, u_t, b_t, c_t = x
        h = common.next_state(h, dt_t, u_t, b_t, A)
        return h, (jnp.einsum("bdn,bn->bd", h, c_t), h)

    h0 = jnp.zeros((u.shape[0], u.shape[2], A.shape[1]), jnp.float32)
    _, (y, states) = lax.scan(step, h0, tuple(map(_token_major, (dt, u, B, C))), reverse=reverse)
    y = jnp.where(mask[..., None], jnp.swapaxes(y, 0, 1) + D * u.astype(jnp.float32), 0.0)
    residuals = (u, delta, A, B, C, D, z, delta_bias, mask, dt, states, None if z is None else y)
    if z is not None:
        y = y * common.silu_and_grad(z)[0]
    return y.astype(u.dtype), residuals


def _backward(delta_softplus, reverse, residuals, g):
    u, delta, A, B, C, D, z, delta_bias, mask, dt, states, y = residuals
    valid = mask[..., None]
    gy = g.astype(jnp.float32)
    dz = None
    if z is not None:
        silu, dsilu = common.silu_and_grad(z)
        dz = (gy * y * dsilu).astype(z.dtype)
        gy = gy * silu
    gy = jnp.where(valid, gy, 0.0)
    zero = jnp.zeros_like(states[:1])
    previous = jnp.concatenate([states[1:], zero]) if reverse else jnp.concatenate([zero, states[:-1]])

    def step(carry, x):
        a_mu, dA = carry  # a_{t+1} mu_{t+1}, the running dL/dA
        dt_t, u_t, b_t, c_t, g_t, h_t, h_prev = x
        a_t = jnp.exp(dt_t[..., None] * A)
        mu = a_mu + g_t[..., None] * c_t[:, None, :]
        mu_b = jnp.einsum("bdn,bn->bd", mu, b_t)
        mu_ah = mu * a_t * h_prev
        ddt = jnp.einsum("bdn,dn->bd", mu_ah, A) + u_t * mu_b
        dB = jnp.einsum("bdn,bd->bn", mu, dt_t * u_t)
        dC = jnp.einsum("bdn,bd->bn", h_t, g_t)
        return (a_t * mu, dA + jnp.einsum("bdn,bd->dn", mu_ah, dt_t)), (ddt, dt_t * mu_b, dB, dC)

    init = (jnp.zeros(states.shape[1:], jnp.float32), jnp.zeros(A.shape, jnp.float32))
    xs = tuple(map(_token_major, (dt, u, B, C, gy))) + (states, previous)
    (_, dA), per_token = lax.scan(step, init, xs, reverse=not reverse)
    ddt, du, dB, dC = (jnp.swapaxes(x, 0, 1) for x in per_token)
    ddelta = common.step_size_vjp(ddt, delta, delta_bias, valid, delta_softplus)
    du = du + gy * D
    return (du.astype(u.dtype), ddelta.astype(delta.dtype), dA, dB.astype(B.dtype), dC.astype(C.dtype),
            jnp.sum(gy * u.astype(jnp.float32), axis=(0, 1)), dz, jnp.sum(ddelta, axis=(0, 1)), None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _scan(delta_softplus, reverse, u, delta, A, B, C, D, z, delta_bias, mask):
    return _forward(delta_softplus, reverse, u, delta, A, B, C, D, z, delta_bias, mask)[0]


_scan.defvjp(_forward, _backward)


def selective_scan_sequential(u, delta, A, B, C, D, z, delta_bias, mask, *, delta_softplus, reverse):
    """Selective scan of (batch, L, D) sequences; arguments as in `selective_scan` (D, delta_bias, mask given)."""
    return _scan(bool(delta_softplus), bool(reverse), u, delta, A, B, C, D, z, delta_bias, mask)
