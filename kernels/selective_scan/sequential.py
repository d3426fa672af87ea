"""Token-by-token selective scan over the kept tokens only, with a hand-written token-by-token adjoint (CPU).

The forward pass moves each sequence's kept tokens to its front (in order: a stable sort of the mask) and runs the
reference recurrence over the first `count` of them, `count` being the most kept tokens of any sequence: a
`fori_loop` with a dynamic trip count whose body keeps the (batch, D, N) state in cache and stores every state.
Masked tokens are transparent (dt = 0) and output 0, so skipping them is exact, and a PCM branch's region (the
mouth: 20 of the CPU demo's 261 tokens) costs what its tokens cost, not what the frame's do. The backward pass is one
loop over the same tokens in the opposite order that carries the adjoint state mu_t = dL/dh_t,

    mu_t = g_t C_t + a_{t+1} mu_{t+1},   a_t = exp(dt_t A),

and writes each token's gradients from mu_t, h_t and h_{t-1}; the gradients go back to the tokens' places.
JAX's own derivative of the reference scan does the same work with more, smaller operations per token, over every
token. It stores every state, an (L + 1, batch, D, N) float32 tensor, like the reference under `jax.grad`: use
"xla" (chunked rematerialisation) or "pallas" for long sequences.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax

from actalker_jax.kernels.selective_scan import common


def _compact(mask):
    """(order, inverse, count): each row's kept tokens first, in order ((batch, L) indices), the permutation that
    puts them back, and the most kept tokens of a row."""
    order = jnp.argsort(jnp.logical_not(mask), axis=1, stable=True)
    return order, jnp.argsort(order, axis=1), jnp.max(jnp.sum(mask, axis=1, dtype=jnp.int32))


def _take_tokens(x, index):
    """x (batch, L, ...) with its tokens taken in `index` (batch, L)."""
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def _gather_token_major(x, order):
    """(batch, L, ...) -> (L, batch, ...) float32, tokens taken in `order`."""
    return jnp.swapaxes(_take_tokens(x, order), 0, 1).astype(jnp.float32)


def _scatter_batch_major(x, inverse):
    """Inverse of `_gather_token_major` (given `_compact`'s inverse): (L, batch, ...) -> (batch, L, ...)."""
    return _take_tokens(jnp.swapaxes(x, 0, 1), inverse)


def _token(count, reverse):
    """The token the i-th loop iteration of a scan over `count` compacted tokens visits."""
    return (lambda i: count - 1 - i) if reverse else (lambda i: i)


def _state_offset(reverse):
    """states[t + offset] = h_t and states[t + 1 - offset] = the state before token t in scan order; the slot before
    the first visited token (0 forward, `count` in reverse) is never written and stays 0."""
    return 0 if reverse else 1


def _forward(delta_softplus, reverse, u, delta, A, B, C, D, z, delta_bias, mask):
    dt = common.step_size(delta, delta_bias, mask[..., None], delta_softplus)
    order, inverse, count = _compact(mask)
    dt_c, u_c, b_c, c_c = (_gather_token_major(x, order) for x in (dt, u, B, C))
    token, offset = _token(count, reverse), _state_offset(reverse)
    length, batch = u_c.shape[:2]

    def body(i, carry):
        h, ys, states = carry
        t = token(i)
        h = common.next_state(h, dt_c[t], u_c[t], b_c[t], A)
        return h, ys.at[t].set(jnp.einsum("bdn,bn->bd", h, c_c[t])), states.at[t + offset].set(h)

    init = (jnp.zeros((batch, u.shape[2], A.shape[1]), jnp.float32), jnp.zeros(u_c.shape, jnp.float32),
            jnp.zeros((length + 1, batch, u.shape[2], A.shape[1]), jnp.float32))
    _, ys, states = lax.fori_loop(0, count, body, init)
    y = jnp.where(mask[..., None], _scatter_batch_major(ys, inverse) + D * u.astype(jnp.float32), 0.0)
    residuals = (u, delta, A, B, C, D, z, delta_bias, mask, order, inverse, count, dt_c, u_c, b_c, c_c,
                 states, None if z is None else y)
    if z is not None:
        y = y * common.silu_and_grad(z)[0]
    return y.astype(u.dtype), residuals


def _backward(delta_softplus, reverse, residuals, g):
    u, delta, A, B, C, D, z, delta_bias, mask, order, inverse, count, dt_c, u_c, b_c, c_c, states, y = (
        residuals)
    valid = mask[..., None]
    gy = g.astype(jnp.float32)
    dz = None
    if z is not None:
        silu, dsilu = common.silu_and_grad(z)
        dz = (gy * y * dsilu).astype(z.dtype)
        gy = gy * silu
    gy = jnp.where(valid, gy, 0.0)
    g_c = _gather_token_major(gy, order)
    token, offset = _token(count, not reverse), _state_offset(reverse)

    def body(i, carry):
        a_mu, dA, ddt, du, dB, dC = carry  # a_{t+1} mu_{t+1}, the running dL/dA, per-token gradients
        t = token(i)
        dt_t, u_t, b_t, c_t, g_t = dt_c[t], u_c[t], b_c[t], c_c[t], g_c[t]
        h_t, h_prev = states[t + offset], states[t + 1 - offset]
        a_t = jnp.exp(dt_t[..., None] * A)
        mu = a_mu + g_t[..., None] * c_t[:, None, :]
        mu_b = jnp.einsum("bdn,bn->bd", mu, b_t)
        mu_ah = mu * a_t * h_prev
        ddt = ddt.at[t].set(jnp.einsum("bdn,dn->bd", mu_ah, A) + u_t * mu_b)
        du = du.at[t].set(dt_t * mu_b)
        dB = dB.at[t].set(jnp.einsum("bdn,bd->bn", mu, dt_t * u_t))
        dC = dC.at[t].set(jnp.einsum("bdn,bd->bn", h_t, g_t))
        return a_t * mu, dA + jnp.einsum("bdn,bd->dn", mu_ah, dt_t), ddt, du, dB, dC

    init = (jnp.zeros(states.shape[1:], jnp.float32), jnp.zeros(A.shape, jnp.float32),
            jnp.zeros(u_c.shape, jnp.float32), jnp.zeros(u_c.shape, jnp.float32),
            jnp.zeros(b_c.shape, jnp.float32), jnp.zeros(c_c.shape, jnp.float32))
    _, dA, ddt, du, dB, dC = lax.fori_loop(0, count, body, init)
    ddt, du, dB, dC = (_scatter_batch_major(x, inverse) for x in (ddt, du, dB, dC))
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
