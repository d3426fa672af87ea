"""Chunked selective scan in plain XLA (CPU, TPU, GPU).

A `lax.scan` over chunk indices walks the sequence in chunks of `chunk_size` tokens (scan
order) and carries the (batch, D, N) float32 state between chunks; chunks are read from and
written to the (batch, L, D) arrays with dynamic slices, so there are no transposes and no
flips (`reverse` only changes which slice a chunk reads and the direction of the inner scan).

Inside a chunk every per-token quantity is a (batch, T, D, N) tensor and the affine recurrence
h_t = a_t h_{t-1} + b_t runs as a two-level scan: an unrolled sequential loop over blocks of
`block` tokens, vectorised over all blocks of the chunk, then a log-depth doubling scan over the
block totals. block = T is a plain unrolled loop, block = 1 a pure doubling scan; the defaults
(chunk_size 128, block 16) were the fastest of the settings tried on CPU (untimed on TPU/GPU).

Gradients use `jax.custom_vjp` (chunk-level rematerialisation, like `jax.checkpoint` per chunk,
with a hand-written adjoint): the forward pass saves only the chunk-start states
(n_chunks, batch, D, N); the backward pass walks the chunks in reverse scan order, recomputes a
chunk's states from its saved start and runs the adjoint recurrence with the same two-level scan
in the opposite direction. Memory is O(batch·L·D + n_chunks·batch·D·N + batch·T·D·N) in forward
and backward.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from actalker_jax.kernels.selective_scan import common

DEFAULT_CHUNK_SIZE = 128
DEFAULT_BLOCK = 16


@dataclasses.dataclass(frozen=True)
class _Config:
    delta_softplus: bool
    reverse: bool
    chunk_size: int
    block: int


# ----------------------------------------------------------------------------- scans along axis 1


def _shift(x, edge, reverse):
    """x at the previous scan position along axis 1 (the next index if reverse); `edge` at the first one.

    edge: scalar or x[:, 0]-shaped array.
    """
    edge = jnp.broadcast_to(jnp.asarray(edge, x.dtype), x[:, :1].shape) if jnp.ndim(edge) == 0 else edge[:, None]
    if reverse:
        return jnp.concatenate([x[:, 1:], edge], axis=1)
    return jnp.concatenate([edge, x[:, :-1]], axis=1)


def _doubling_scan(a, b, reverse):
    """Inclusive scan of h_t = a_t h_{t-1} + b_t along axis 1 from h = 0, in log2(T) doubling steps.

    Returns (running product of a, h).
    """
    length = a.shape[1]
    shift = 1
    while shift < length:
        if reverse:
            a_prev = jnp.concatenate([a[:, shift:], jnp.ones_like(a[:, :shift])], axis=1)
            b_prev = jnp.concatenate([b[:, shift:], jnp.zeros_like(b[:, :shift])], axis=1)
        else:
            a_prev = jnp.concatenate([jnp.ones_like(a[:, :shift]), a[:, :-shift]], axis=1)
            b_prev = jnp.concatenate([jnp.zeros_like(b[:, :shift]), b[:, :-shift]], axis=1)
        b = a * b_prev + b
        a = a * a_prev
        shift *= 2
    return a, b


def _linear_scan(a, b, reverse, block):
    """Inclusive scan of h_t = a_t h_{t-1} + b_t from h = 0, in scan order along axis 1 of (batch, T, ...) arrays.

    Sequential inside blocks of `block` tokens (all blocks at once), doubling across blocks.
    Returns h, shaped like b.
    """
    length = a.shape[1]
    block = min(block, length)
    pad = -length % block
    if pad:  # identity steps (a = 1, b = 0) after the last scan position
        widths = [(0, 0)] * a.ndim
        widths[1] = (pad, 0) if reverse else (0, pad)
        a = jnp.pad(a, widths, constant_values=1.0)
        b = jnp.pad(b, widths)
    shape = a.shape
    a = a.reshape(shape[0], shape[1] // block, block, *shape[2:])
    b = b.reshape(a.shape)
    prods, states = [None] * block, [None] * block
    prod, state = jnp.ones_like(a[:, :, 0]), jnp.zeros_like(b[:, :, 0])
    for i in range(block - 1, -1, -1) if reverse else range(block):
        prod = prod * a[:, :, i]
        state = a[:, :, i] * state + b[:, :, i]
        prods[i], states[i] = prod, state
    _, entering = _doubling_scan(prod, state, reverse)  # prod, state: block totals (batch, blocks, ...)
    h = jnp.stack(states, axis=2) + jnp.stack(prods, axis=2) * _shift(entering, 0.0, reverse)[:, :, None]
    h = h.reshape(shape)
    if pad:
        h = h[:, pad:] if reverse else h[:, :length]
    return h


# ----------------------------------------------------------------------------- one chunk


def _dot_state(h, c):
    """sum_n h[b, t, d, n] c[b, t, n] as a fusible multiply-reduce (a batched dot is slow on CPU)."""
    return jnp.sum(h * c[:, :, None, :], axis=-1)


def _states(cfg, h0, u, delta, B, A, delta_bias, mask):
    """dt (batch, T, D), decays a and states h (batch, T, D, N) of a chunk entered with state h0."""
    dt = common.step_size(delta, delta_bias, mask[..., None], cfg.delta_softplus)
    a = jnp.exp(dt[..., None] * A)
    bx = (dt * u.astype(jnp.float32))[..., None] * B.astype(jnp.float32)[:, :, None, :]
    first = -1 if cfg.reverse else 0
    bx = bx.at[:, first].add(a[:, first] * h0)  # h_first = a_first h0 + b_first
    return dt, a, _linear_scan(a, bx, cfg.reverse, cfg.block)


def _chunk_forward(cfg, h0, u, delta, B, C, z, A, D, delta_bias, mask):
    """One chunk from state h0 (batch, D, N): (y (batch, T, D) float32, state after the chunk)."""
    _, _, h = _states(cfg, h0, u, delta, B, A, delta_bias, mask)
    y = _dot_state(h, C.astype(jnp.float32)) + D * u.astype(jnp.float32)
    y = jnp.where(mask[..., None], y, 0.0)
    if z is not None:
        y = y * common.silu_and_grad(z)[0]
    return y, h[:, 0] if cfg.reverse else h[:, -1]


def _chunk_backward(cfg, h0, dh, g, u, delta, B, C, z, A, D, delta_bias, mask):
    """Adjoint of one chunk.

    dh: (batch, D, N) gradient w.r.t. the state after the chunk; g: (batch, T, D) gradient w.r.t. y.
    Returns the gradient w.r.t. h0, the per-token gradients (du, ddelta, dB, dC, dz) and the
    chunk's contributions to (dA, dD, d delta_bias).
    """
    valid = mask[..., None]
    u32, b32, c32 = (x.astype(jnp.float32) for x in (u, B, C))
    dt, a, h = _states(cfg, h0, u, delta, B, A, delta_bias, mask)
    gy = g.astype(jnp.float32)
    dz = None
    if z is not None:
        silu, dsilu = common.silu_and_grad(z)
        y = jnp.where(valid, _dot_state(h, c32) + D * u32, 0.0)
        dz = gy * y * dsilu
        gy = gy * silu
    gy = jnp.where(valid, gy, 0.0)
    # Adjoint state mu_t = dL/dh_t: mu_t = gy_t C_t + a_{t+1} mu_{t+1}, entered with dh after the chunk.
    last = 0 if cfg.reverse else -1
    c = (gy[..., None] * c32[:, :, None, :]).at[:, last].add(dh)
    mu = _linear_scan(_shift(a, 1.0, not cfg.reverse), c, not cfg.reverse, cfg.block)
    mu_b = _dot_state(mu, b32)
    mu_ah = mu * a * _shift(h, h0, cfg.reverse)
    ddt = jnp.sum(mu_ah * A, axis=-1) + u32 * mu_b
    ddelta = common.step_size_vjp(ddt, delta, delta_bias, valid, cfg.delta_softplus)
    first = -1 if cfg.reverse else 0
    per_token = (
        gy * D + dt * mu_b,
        ddelta,
        jnp.sum(mu * (dt * u32)[..., None], axis=2),
        jnp.sum(h * gy[..., None], axis=2),
        dz,
    )
    params = (jnp.sum(mu_ah * dt[..., None], axis=(0, 1)), jnp.sum(gy * u32, axis=(0, 1)), jnp.sum(ddelta, axis=(0, 1)))
    return a[:, first] * mu[:, first], per_token, params


# ----------------------------------------------------------------------------- whole sequence


def _chunk_start(cfg, length, k):
    """Token index where the k-th full chunk in scan order starts."""
    return length - (k + 1) * cfg.chunk_size if cfg.reverse else k * cfg.chunk_size


def _tail_start(cfg, length):
    """Token index of the last (partial) chunk in scan order."""
    return 0 if cfg.reverse else (length // cfg.chunk_size) * cfg.chunk_size


def _slices(xs, start, size):
    return [None if x is None else lax.dynamic_slice_in_dim(x, start, size, axis=1) for x in xs]


def _forward(cfg, u, delta, A, B, C, D, z, delta_bias, mask):
    batch, length, dim = u.shape
    n_full, tail = divmod(length, cfg.chunk_size)
    seqs = (u, delta, B, C, z, mask)

    def run(h, y, start, size):
        uc, dc, bc, cc, zc, mc = _slices(seqs, start, size)
        yc, h = _chunk_forward(cfg, h, uc, dc, bc, cc, zc, A, D, delta_bias, mc)
        return h, lax.dynamic_update_slice_in_dim(y, yc.astype(y.dtype), start, axis=1)

    def body(carry, k):
        h, y = carry
        h_next, y = run(h, y, _chunk_start(cfg, length, k), cfg.chunk_size)
        return (h_next, y), h

    h = jnp.zeros((batch, dim, A.shape[1]), jnp.float32)
    (h, y), starts = lax.scan(body, (h, jnp.zeros(u.shape, u.dtype)), jnp.arange(n_full))
    if tail:
        _, y = run(h, y, _tail_start(cfg, length), tail)
    return y, (starts, h)


def _backward(cfg, res, g):
    u, delta, A, B, C, D, z, delta_bias, mask, starts, tail_state = res
    length = u.shape[1]
    n_full, tail = divmod(length, cfg.chunk_size)
    seqs = (u, delta, B, C, z, mask, g)
    grads_seq = [None if x is None else jnp.zeros(x.shape, x.dtype) for x in (u, delta, B, C, z)]
    grads_par = [jnp.zeros(p.shape, jnp.float32) for p in (A, D, delta_bias)]

    def run(carry, h0, start, size):
        dh, grads_seq, grads_par = carry
        uc, dc, bc, cc, zc, mc, gc = _slices(seqs, start, size)
        dh, d_seq, d_par = _chunk_backward(cfg, h0, dh, gc, uc, dc, bc, cc, zc, A, D, delta_bias, mc)
        grads_seq = [
            None if buf is None else lax.dynamic_update_slice_in_dim(buf, d.astype(buf.dtype), start, axis=1)
            for buf, d in zip(grads_seq, d_seq)
        ]
        return dh, grads_seq, [acc + d for acc, d in zip(grads_par, d_par)]

    carry = (jnp.zeros(tail_state.shape, jnp.float32), grads_seq, grads_par)
    if tail:
        carry = run(carry, tail_state, _tail_start(cfg, length), tail)

    def body(carry, xs):
        k, h0 = xs
        return run(carry, h0, _chunk_start(cfg, length, k), cfg.chunk_size), None

    (_, grads_seq, grads_par), _ = lax.scan(body, carry, (jnp.arange(n_full), starts), reverse=True)
    du, ddelta, dB, dC, dz = grads_seq
    dA, dD, dbias = grads_par
    return du, ddelta, dA, dB, dC, dD, dz, dbias, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(cfg, u, delta, A, B, C, D, z, delta_bias, mask):
    return _forward(cfg, u, delta, A, B, C, D, z, delta_bias, mask)[0]


def _scan_fwd(cfg, u, delta, A, B, C, D, z, delta_bias, mask):
    y, (starts, tail_state) = _forward(cfg, u, delta, A, B, C, D, z, delta_bias, mask)
    return y, (u, delta, A, B, C, D, z, delta_bias, mask, starts, tail_state)


_scan.defvjp(_scan_fwd, _backward)


def selective_scan_xla(
    u, delta, A, B, C, D, z, delta_bias, mask, *, delta_softplus, reverse,
    chunk_size=DEFAULT_CHUNK_SIZE, block=DEFAULT_BLOCK,
):
    """Chunked selective scan of (batch, L, D) sequences; arguments as in `selective_scan` (D, delta_bias, mask given).

    chunk_size: tokens per chunk (the unit of rematerialisation). block: tokens per sequential
    block inside a chunk.
    """
    for name, value in (("chunk_size", chunk_size), ("block", block)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    chunk_size = min(int(chunk_size), u.shape[1])
    cfg = _Config(
        delta_softplus=bool(delta_softplus), reverse=bool(reverse), chunk_size=chunk_size, block=int(block)
    )
    return _scan(cfg, u, delta, A, B, C, D, z, delta_bias, mask)
