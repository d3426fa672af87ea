"""Analytic FLOP count of a JAX function from its jaxpr (for MFU).

    flops = matmul_flops(fn, *args)      # args may be jax.ShapeDtypeStruct: nothing is computed

Counts the multiply-adds of every dot_general and conv_general_dilated at 2 FLOPs each, walking into
jit, custom_vjp / custom_jvp, remat, scan (times its length), while (body once: its trip count is not
static) and cond (the largest branch). Elementwise ops, reductions and the selective scan's recurrence
are not counted (they are memory-bound, < 1% of the UNet's FLOPs: ANCHORS.md §6). Attention counts
through its two matmuls: `models.layers.dot_product_attention` is traced with XLA's attention while
counting, so a fused cuDNN kernel cannot hide its FLOPs.
"""

import contextlib
import math

import jax
from jax.extend import core as jax_core


def _dot_flops(eqn) -> int:
    lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
    (lhs_contract, _), (lhs_batch, _) = eqn.params["dimension_numbers"]
    contract = math.prod(lhs[d] for d in lhs_contract)
    out = math.prod(eqn.outvars[0].aval.shape)
    return 2 * out * contract


def _conv_flops(eqn) -> int:
    rhs = eqn.invars[1].aval.shape
    spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature dim, in feature dim, *spatial dims)
    kernel_in = rhs[spec[1]] * math.prod(rhs[d] for d in spec[2:])
    out = math.prod(eqn.outvars[0].aval.shape)
    return 2 * out * kernel_in


def _sub_jaxprs(eqn):
    """(jaxpr, multiplier) pairs of the sub-computations of `eqn` that run."""
    name, params = eqn.primitive.name, eqn.params
    if name == "scan":
        return [(params["jaxpr"].jaxpr, params["length"])]
    if name == "cond":
        branches = [b.jaxpr for b in params["branches"]]
        return [(max(branches, key=jaxpr_flops), 1)]
    subs = []
    for value in params.values():
        for item in (value if isinstance(value, (tuple, list)) else (value,)):
            if isinstance(item, jax_core.ClosedJaxpr):
                subs.append((item.jaxpr, 1))
            elif isinstance(item, jax_core.Jaxpr):
                subs.append((item, 1))
    if name == "while":  # cond_jaxpr and body_jaxpr: count the body once
        subs = [(params["body_jaxpr"].jaxpr, 1)]
    if name in ("custom_vjp_call", "custom_vjp_call_jaxpr", "custom_jvp_call"):
        subs = subs[:1]  # the primal computation only, not its derivative rules
    return subs


def jaxpr_flops(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        else:
            total += sum(multiplier * jaxpr_flops(sub) for sub, multiplier in _sub_jaxprs(eqn))
    return total


@contextlib.contextmanager
def _xla_attention():
    from actalker_jax.models import layers

    layers.FORCE_XLA_ATTENTION = True
    try:
        yield
    finally:
        layers.FORCE_XLA_ATTENTION = False


def matmul_flops(fn, *args, **kwargs) -> int:
    """FLOPs of the matmuls and convolutions of one call of `fn(*args, **kwargs)` (see the module docstring)."""
    with _xla_attention():
        closed = jax.make_jaxpr(lambda *a: fn(*a, **kwargs))(*args)
    return int(jaxpr_flops(closed.jaxpr))


def peak_flops_per_s(device=None) -> float | None:
    """Dense bf16 peak of the device from its spec sheet (None where unknown, e.g. CPUs)."""
    kind = (device or jax.devices()[0]).device_kind.lower()
    for name, peak in PEAK_BF16_FLOPS.items():
        if name in kind:
            return peak
    return None


# Dense (no sparsity) bf16 tensor-core peaks from the vendors' spec sheets.
PEAK_BF16_FLOPS = {
    "h200": 989e12,
    "h100": 989e12,  # SXM; an H100 PCIe is 756e12 (its device_kind says "PCIe")
    "a100": 312e12,
    "tpu v5p": 459e12,
    "tpu v5 lite": 197e12,
    "tpu v4": 275e12,
    "tpu v6": 918e12,
}


def mfu(flops_per_step: float, step_seconds: float, device=None, num_devices: int | None = None) -> float | None:
    """Model FLOP utilisation: achieved FLOP/s over the devices' summed peak (None where the peak is unknown)."""
    peak = peak_flops_per_s(device)
    if peak is None or step_seconds <= 0:
        return None
    return flops_per_step / step_seconds / (peak * (num_devices or jax.device_count()))
