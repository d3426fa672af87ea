"""Pallas GPU selective scan (Triton lowering), forward and backward under `jax.custom_vjp`.

Layout and work split. Every kernel reads the (batch, L, D) rows directly (no transposes, no
flips: `reverse` maps scan position p to token L-1-p). One program is one warp; it owns a tile of
`block_d` channels and one chunk of `chunk` consecutive scan positions, and keeps the
(N, block_d) float32 state of the tile in the warp's registers (32 states per thread with the
defaults), so B_t and C_t are loaded once per token for the whole tile. Programs form a 1-D grid
over (batch, channel tile, chunk); the chunk axis is what fills the GPU (B=2, D=640, L=72k:
2·10·71 programs forward). A program walks its chunk in a `fori_loop` over sub-chunks of `sub`
tokens, unrolled so that the loads of a sub-chunk are in flight together. exp is evaluated as
exp2 with A pre-scaled by log2(e). The defaults come from ptxas (sm_90a) reports of the
Triton-compiled kernels (no register spills; forward kernels free of shared-memory layout
conversions); they are untimed: tune them with the flags of `actalker_jax.bench.scan` on a GPU.

Forward (2 kernels):
  1. chunk_state: scan each chunk from zero; write its end state (batch, n_chunks, N, D) and its
     summed step size (batch, n_chunks, D) (the chunk's decay is exp(A·Σdt)).
  2. forward: combine the end states of the earlier chunks into the chunk's start state
     (a short loop over chunk summaries), re-scan the chunk from it and write y.
  Residuals: the inputs plus the two chunk summaries (no per-token state is saved).
Backward (2 kernels, tiles of `block_d_bwd` channels, sub-chunks of `sub_bwd` tokens):
  3. backward_prep: from the chunk's start state, walk the chunk forward; store the state at each
     sub-chunk start to a scratch buffer (batch, L/sub_bwd, N, D), and accumulate the chunk's own
     adjoint contribution to the state entering it, sum_t (prod_{s<=t} a_s) gy_t C_t, with a
     running product of the decays (no exp of sums, so nothing overflows).
  4. backward: combine the adjoint summaries of the later chunks into the adjoint leaving the
     chunk; walk the sub-chunks in reverse: recompute the sub-chunk's states from its stored start
     (kept in registers; the recurrence is never inverted), then step the adjoint back token by
     token (re-reading the rows, recomputing the decays) and write du, d(delta), dz rows. dB_t,
     dC_t are reduced over the channel tile in the program (warp shuffles) and added with fp32
     atomics; dA, dD, d(delta_bias) are per-program partial sums reduced by XLA.

Why the Triton lowering and not Mosaic GPU: the kernel is a per-token recurrence on a one-warp
register tile with row loads, reductions along both tile axes, masked row stores and fp32
atomics, which the Triton lowering of `pl.pallas_call` expresses directly; Mosaic GPU is
warpgroup-centric (arrays carry WGMMA/tiled register layouts, data moves through SMEM/TMA) and
its `pl.pallas_call` entry point is deprecated in favour of `plgpu.kernel`. The Triton lowering
exists in jax 0.10 and 0.11 (0.11 warns that it is deprecated); the compiler-params class is
feature-detected. On CPU the same kernels run in Pallas interpret mode.
"""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from actalker_jax.kernels.selective_scan import common

_LOG2E = math.log2(math.e)
_F32 = jnp.float32

DEFAULTS = dict(block_d=64, sub=8, block_d_bwd=32, sub_bwd=8, chunk=1024, num_warps=1)

_TritonParams = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")


@dataclasses.dataclass(frozen=True)
class _Tile:
    """Channels per program and tokens per unrolled step of one kernel."""

    block_d: int
    sub: int


@dataclasses.dataclass(frozen=True)
class _Config:
    batch: int
    length: int
    dim: int
    nstate: int
    chunk: int
    fwd: _Tile
    bwd: _Tile
    num_warps: int
    delta_softplus: bool
    reverse: bool
    has_z: bool
    interpret: bool

    @property
    def n_chunks(self):
        return -(-self.length // self.chunk)

    @property
    def padded_length(self):
        return self.n_chunks * self.chunk


def _power_of_two(name, value):
    if value < 1 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two, got {value}")


def _config(u, A, *, has_z, delta_softplus, reverse, block_d, sub, block_d_bwd, sub_bwd, chunk, num_warps, interpret):
    batch, length, dim = u.shape
    nstate = A.shape[1]
    if nstate & (nstate - 1):
        raise ValueError(f"impl='pallas' needs N (A.shape[1]) to be a power of two, got A shape {tuple(A.shape)}")
    for name, value in (("block_d", block_d), ("sub", sub), ("block_d_bwd", block_d_bwd), ("sub_bwd", sub_bwd)):
        _power_of_two(name, value)
    step = max(sub, sub_bwd)
    if chunk < step or chunk % step:
        raise ValueError(f"chunk must be a positive multiple of sub={sub} and sub_bwd={sub_bwd}, got {chunk}")
    chunk = min(chunk, -(-length // step) * step)
    fit = dim & -dim  # largest power of two dividing D
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    return _Config(
        batch=batch, length=length, dim=dim, nstate=nstate, chunk=chunk,
        fwd=_Tile(math.gcd(block_d, fit), sub), bwd=_Tile(math.gcd(block_d_bwd, fit), sub_bwd),
        num_warps=num_warps, delta_softplus=bool(delta_softplus), reverse=bool(reverse), has_z=has_z,
        interpret=bool(interpret),
    )


# ----------------------------------------------------------------------------- in-kernel helpers


def _program(cfg, tile):
    """(batch index, channel slice, chunk index) of this program."""
    n_tiles = cfg.dim // tile.block_d
    pid = pl.program_id(0)
    chunk = pid % cfg.n_chunks
    rest = pid // cfg.n_chunks
    d0 = pl.multiple_of((rest % n_tiles) * tile.block_d, tile.block_d)
    return rest // n_tiles, pl.ds(d0, tile.block_d), chunk


def _token(cfg, mask_ref, b, p):
    """Token index for scan position p (clamped in range), p < L, and p < L & mask."""
    inside = p < cfg.length
    q = jnp.minimum(p, cfg.length - 1)
    t = cfg.length - 1 - q if cfg.reverse else q
    return t, inside, jnp.logical_and(inside, mask_ref[b, t])


def _row(ref, b, t, ds):
    return ref[b, t, ds].astype(_F32)


def _state_row(ref, b, t):
    return ref[b, t, :].astype(_F32)


def _store_row(ref, b, t, ds, value, inside):
    plgpu.store(ref.at[b, t, ds], value.astype(ref.dtype), mask=inside)


def _advance(h, a2, dt, u, bt):
    """One step h <- exp(dt A) h + dt u B on an (N, block_d) tile; returns (decay, new h)."""
    decay = jnp.exp2(dt[None, :] * a2)
    return decay, decay * h + bt[:, None] * (dt * u)[None, :]


def _zeros(cfg, tile):
    return jnp.zeros((cfg.nstate, tile.block_d), _F32)


def _combine(cfg, tile, summary_ref, dtsum_ref, b, ds, a2, first, count, step):
    """Fold chunk summaries first, first+step, ... (count of them): s <- exp(A Σdt_k) s + summary_k."""

    def body(i, s):
        k = first + step * i
        return jnp.exp2(a2 * dtsum_ref[b, k, ds][None, :]) * s + summary_ref[b, k, :, ds]

    return lax.fori_loop(0, count, body, _zeros(cfg, tile))


def _state_in(cfg, tile, hend_ref, dtsum_ref, b, ds, a2, chunk):
    """State entering `chunk`: the chunk-local end states of chunks 0..chunk-1 combined."""
    return _combine(cfg, tile, hend_ref, dtsum_ref, b, ds, a2, 0, chunk, 1)


def _adjoint_in(cfg, tile, adj_ref, dtsum_ref, b, ds, a2, chunk):
    """Adjoint of the state leaving `chunk`: the summaries of chunks n_chunks-1..chunk+1 combined."""
    return _combine(cfg, tile, adj_ref, dtsum_ref, b, ds, a2, cfg.n_chunks - 1, cfg.n_chunks - 1 - chunk, -1)


def _gated_grad(cfg, g, z_ref, b, t, ds, valid):
    """dL/dy before the z gate and the mask: where(valid, g silu(z), 0)."""
    if cfg.has_z:
        g = g * common.silu_and_grad(_row(z_ref, b, t, ds))[0]
    return jnp.where(valid, g, 0.0)


# ----------------------------------------------------------------------------- kernels


def _chunk_state_kernel(cfg, u_ref, delta_ref, at_ref, b_ref, bias_ref, mask_ref, hend_ref, dtsum_ref):
    tile = cfg.fwd
    b, ds, chunk = _program(cfg, tile)
    a2 = at_ref[:, ds] * _LOG2E
    bias = bias_ref[ds]

    def body(j, carry):
        h, dtsum = carry
        for k in range(tile.sub):
            t, _, valid = _token(cfg, mask_ref, b, chunk * cfg.chunk + j * tile.sub + k)
            dt = common.step_size(delta_ref[b, t, ds], bias, valid, cfg.delta_softplus)
            _, h = _advance(h, a2, dt, _row(u_ref, b, t, ds), _state_row(b_ref, b, t))
            dtsum = dtsum + dt
        return h, dtsum

    init = (_zeros(cfg, tile), jnp.zeros((tile.block_d,), _F32))
    h, dtsum = lax.fori_loop(0, cfg.chunk // tile.sub, body, init)
    hend_ref[b, chunk, :, ds] = h
    dtsum_ref[b, chunk, ds] = dtsum


def _forward_kernel(
    cfg, u_ref, delta_ref, at_ref, b_ref, c_ref, d_ref, bias_ref, mask_ref, hend_ref, dtsum_ref, *rest
):
    z_ref, y_ref = rest if cfg.has_z else (None, *rest)
    tile = cfg.fwd
    b, ds, chunk = _program(cfg, tile)
    a2 = at_ref[:, ds] * _LOG2E
    bias = bias_ref[ds]
    dskip = d_ref[ds]

    def body(j, h):
        for k in range(tile.sub):
            t, inside, valid = _token(cfg, mask_ref, b, chunk * cfg.chunk + j * tile.sub + k)
            u = _row(u_ref, b, t, ds)
            dt = common.step_size(delta_ref[b, t, ds], bias, valid, cfg.delta_softplus)
            _, h = _advance(h, a2, dt, u, _state_row(b_ref, b, t))
            y = jnp.where(valid, jnp.sum(h * _state_row(c_ref, b, t)[:, None], axis=0) + dskip * u, 0.0)
            if cfg.has_z:
                y = y * common.silu_and_grad(_row(z_ref, b, t, ds))[0]
            _store_row(y_ref, b, t, ds, y, inside)
        return h

    lax.fori_loop(0, cfg.chunk // tile.sub, body, _state_in(cfg, tile, hend_ref, dtsum_ref, b, ds, a2, chunk))


def _backward_prep_kernel(
    cfg, u_ref, delta_ref, at_ref, b_ref, c_ref, bias_ref, mask_ref, g_ref, hend_ref, dtsum_ref, *rest
):
    z_ref, scratch_ref, adj_ref = rest if cfg.has_z else (None, *rest)
    tile = cfg.bwd
    n_sub = cfg.chunk // tile.sub
    b, ds, chunk = _program(cfg, tile)
    a2 = at_ref[:, ds] * _LOG2E
    bias = bias_ref[ds]

    def body(j, carry):
        h, decay, adj = carry
        scratch_ref[b, chunk * n_sub + j, :, ds] = h
        for k in range(tile.sub):
            t, _, valid = _token(cfg, mask_ref, b, chunk * cfg.chunk + j * tile.sub + k)
            dt = common.step_size(delta_ref[b, t, ds], bias, valid, cfg.delta_softplus)
            a, h = _advance(h, a2, dt, _row(u_ref, b, t, ds), _state_row(b_ref, b, t))
            decay = decay * a
            gy = _gated_grad(cfg, _row(g_ref, b, t, ds), z_ref, b, t, ds, valid)
            adj = adj + decay * (_state_row(c_ref, b, t)[:, None] * gy[None, :])
        return h, decay, adj

    h0 = _state_in(cfg, tile, hend_ref, dtsum_ref, b, ds, a2, chunk)
    _, _, adj = lax.fori_loop(0, n_sub, body, (h0, jnp.ones_like(h0), _zeros(cfg, tile)))
    adj_ref[b, chunk, :, ds] = adj


def _backward_kernel(
    cfg, u_ref, delta_ref, at_ref, b_ref, c_ref, d_ref, bias_ref, mask_ref, g_ref, dtsum_ref, adj_ref, scratch_ref,
    *rest,
):
    if cfg.has_z:
        z_ref, _, _, du_ref, ddelta_ref, dz_ref, db_ref, dc_ref, da_ref, dd_ref, dbias_ref = rest
    else:
        _, _, du_ref, ddelta_ref, db_ref, dc_ref, da_ref, dd_ref, dbias_ref = rest
        z_ref = dz_ref = None
    tile = cfg.bwd
    n_sub = cfg.chunk // tile.sub
    b, ds, chunk = _program(cfg, tile)
    a_nat = at_ref[:, ds]
    a2 = a_nat * _LOG2E
    bias = bias_ref[ds]
    dskip = d_ref[ds]

    def body(i, carry):
        adj, da, dd, dbias = carry
        j = n_sub - 1 - i
        h = scratch_ref[b, chunk * n_sub + j, :, ds]
        positions = [chunk * cfg.chunk + j * tile.sub + k for k in range(tile.sub)]
        # Re-walk the sub-chunk keeping only the states in registers; the rows are re-read and the
        # decays recomputed in the backward walk below.
        states = [h]
        for p in positions:
            t, _, valid = _token(cfg, mask_ref, b, p)
            dt = common.step_size(delta_ref[b, t, ds], bias, valid, cfg.delta_softplus)
            states.append(_advance(states[-1], a2, dt, _row(u_ref, b, t, ds), _state_row(b_ref, b, t))[1])
        for k in reversed(range(tile.sub)):
            p, h_prev, h = positions[k], states[k], states[k + 1]
            t, inside, valid = _token(cfg, mask_ref, b, p)
            delta = delta_ref[b, t, ds]
            dt = common.step_size(delta, bias, valid, cfg.delta_softplus)
            a = jnp.exp2(dt[None, :] * a2)
            u = _row(u_ref, b, t, ds)
            bt = _state_row(b_ref, b, t)
            ct = _state_row(c_ref, b, t)
            g = _row(g_ref, b, t, ds)
            if cfg.has_z:
                silu, dsilu = common.silu_and_grad(_row(z_ref, b, t, ds))
                y = jnp.where(valid, jnp.sum(h * ct[:, None], axis=0) + dskip * u, 0.0)
                _store_row(dz_ref, b, t, ds, g * y * dsilu, inside)
                g = g * silu
            gy = jnp.where(valid, g, 0.0)
            adj = adj + ct[:, None] * gy[None, :]
            # Row of the (batch, padded_length, N) accumulators: t, shifted by padded_length - L if reverse.
            row = cfg.padded_length - 1 - p if cfg.reverse else p
            plgpu.atomic_add(dc_ref, (b, row, slice(None)), jnp.sum(h * gy[None, :], axis=1))
            plgpu.atomic_add(db_ref, (b, row, slice(None)), jnp.sum(adj * (dt * u)[None, :], axis=1))
            adj_b = jnp.sum(adj * bt[:, None], axis=0)
            adj_ah = adj * a * h_prev
            ddt = jnp.sum(adj_ah * a_nat, axis=0) + u * adj_b
            ddelta = common.step_size_vjp(ddt, delta, bias, valid, cfg.delta_softplus)
            _store_row(du_ref, b, t, ds, gy * dskip + dt * adj_b, inside)
            _store_row(ddelta_ref, b, t, ds, ddelta, inside)
            da = da + adj_ah * dt[None, :]
            dd = dd + gy * u
            dbias = dbias + ddelta
            adj = a * adj
        return adj, da, dd, dbias

    zeros_d = jnp.zeros((tile.block_d,), _F32)
    init = (_adjoint_in(cfg, tile, adj_ref, dtsum_ref, b, ds, a2, chunk), _zeros(cfg, tile), zeros_d, zeros_d)
    _, da, dd, dbias = lax.fori_loop(0, n_sub, body, init)
    da_ref[b, chunk, :, ds] = da
    dd_ref[b, chunk, ds] = dd
    dbias_ref[b, chunk, ds] = dbias


# ----------------------------------------------------------------------------- pallas_calls


def _call(cfg, tile, kernel, out_shape, *args, input_output_aliases=None):
    return pl.pallas_call(
        functools.partial(kernel, cfg),
        out_shape=out_shape,
        grid=(cfg.batch * (cfg.dim // tile.block_d) * cfg.n_chunks,),
        input_output_aliases=input_output_aliases or {},
        interpret=cfg.interpret,
        compiler_params=_TritonParams(num_warps=cfg.num_warps),
        name=f"selective_scan{kernel.__name__.removesuffix('_kernel')}",
    )(*args)


def _f32(*shape):
    return jax.ShapeDtypeStruct(shape, _F32)


def _forward(cfg, u, delta, at, B, C, D, z, delta_bias, mask):
    nb, nc, dim, n = cfg.batch, cfg.n_chunks, cfg.dim, cfg.nstate
    hend, dtsum = _call(
        cfg, cfg.fwd, _chunk_state_kernel, (_f32(nb, nc, n, dim), _f32(nb, nc, dim)), u, delta, at, B, delta_bias, mask
    )
    zs = (z,) if cfg.has_z else ()
    y = _call(
        cfg, cfg.fwd, _forward_kernel, jax.ShapeDtypeStruct(u.shape, u.dtype),
        u, delta, at, B, C, D, delta_bias, mask, hend, dtsum, *zs,
    )
    return y, (hend, dtsum)


def _backward(cfg, res, g):
    u, delta, at, B, C, D, z, delta_bias, mask, hend, dtsum = res
    nb, nc, dim, n = cfg.batch, cfg.n_chunks, cfg.dim, cfg.nstate
    zs = (z,) if cfg.has_z else ()
    scratch, adj = _call(
        cfg, cfg.bwd, _backward_prep_kernel, (_f32(nb, cfg.padded_length // cfg.bwd.sub, n, dim), _f32(nb, nc, n, dim)),
        u, delta, at, B, C, delta_bias, mask, g, hend, dtsum, *zs,
    )
    ins = (u, delta, at, B, C, D, delta_bias, mask, g, dtsum, adj, scratch, *zs)
    acc = jnp.zeros((nb, cfg.padded_length, n), _F32)
    grads_seq = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (u, delta, *zs)]
    outs = _call(
        cfg, cfg.bwd, _backward_kernel,
        (*grads_seq, _f32(*acc.shape), _f32(*acc.shape), _f32(nb, nc, n, dim), _f32(nb, nc, dim), _f32(nb, nc, dim)),
        *ins, acc, acc,
        input_output_aliases={len(ins): len(grads_seq), len(ins) + 1: len(grads_seq) + 1},
    )
    du, ddelta, *outs = outs
    dz = outs.pop(0) if cfg.has_z else None
    db_acc, dc_acc, da, dd, dbias = outs
    start = cfg.padded_length - cfg.length if cfg.reverse else 0
    db = lax.slice_in_dim(db_acc, start, start + cfg.length, axis=1).astype(B.dtype)
    dc = lax.slice_in_dim(dc_acc, start, start + cfg.length, axis=1).astype(C.dtype)
    return du, ddelta, da.sum((0, 1)), db, dc, dd.sum((0, 1)), dz, dbias.sum((0, 1)), None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(cfg, u, delta, at, B, C, D, z, delta_bias, mask):
    return _forward(cfg, u, delta, at, B, C, D, z, delta_bias, mask)[0]


def _scan_fwd(cfg, u, delta, at, B, C, D, z, delta_bias, mask):
    y, summaries = _forward(cfg, u, delta, at, B, C, D, z, delta_bias, mask)
    return y, (u, delta, at, B, C, D, z, delta_bias, mask, *summaries)


_scan.defvjp(_scan_fwd, _backward)


def selective_scan_pallas(
    u, delta, A, B, C, D, z, delta_bias, mask, *, delta_softplus, reverse,
    block_d=DEFAULTS["block_d"], sub=DEFAULTS["sub"], block_d_bwd=DEFAULTS["block_d_bwd"],
    sub_bwd=DEFAULTS["sub_bwd"], chunk=DEFAULTS["chunk"], num_warps=DEFAULTS["num_warps"], interpret=None,
):
    """Pallas selective scan of (batch, L, D) sequences; arguments as in `selective_scan` (D, delta_bias, mask given).

    block_d, sub: channels per program and tokens per unrolled step of the forward kernels
    (block_d_bwd, sub_bwd: of the backward kernels); powers of two, block sizes reduced to divide D.
    chunk: scan positions per program (a multiple of sub and sub_bwd). num_warps: warps per
    program. interpret: None = interpret mode unless the default backend is a GPU.
    """
    cfg = _config(
        u, A, has_z=z is not None, delta_softplus=delta_softplus, reverse=reverse, block_d=block_d, sub=sub,
        block_d_bwd=block_d_bwd, sub_bwd=sub_bwd, chunk=chunk, num_warps=num_warps, interpret=interpret,
    )
    # A enters as (N, D) so that a tile is (N, block_d) with channels on the fast axis (a (D, N) parameter).
    return _scan(cfg, u, delta, A.T, B, C, D, z, delta_bias, mask)
