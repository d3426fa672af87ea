"""Analytic FLOP counter: exact on hand-countable programs, through jit/scan/remat/custom_vjp and attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from actalker_jax import flops
from actalker_jax.models import layers


def spec(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def test_matmul_and_conv_counts():
    assert flops.matmul_flops(lambda a, b: a @ b, spec(8, 16), spec(16, 4)) == 2 * 8 * 16 * 4
    conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert flops.matmul_flops(conv, spec(2, 5, 6, 3), spec(3, 3, 3, 7)) == 2 * (2 * 5 * 6 * 7) * (3 * 3 * 3)


def test_walks_into_jit_scan_remat_and_custom_vjp():
    @jax.custom_vjp
    def f(a):
        return a @ a

    f.defvjp(lambda a: (a @ a, a), lambda a, g: (g @ a.T @ a,))
    one = 2 * 4 * 4 * 4

    def body(carry, _):
        return jax.checkpoint(jax.jit(f))(carry), None

    scanned = lambda a: jax.lax.scan(body, a, None, length=5)[0]
    assert flops.matmul_flops(scanned, spec(4, 4)) == 5 * one


def test_attention_counts_both_matmuls_whatever_the_kernel():
    q = spec(2, 10, 3, 8)
    kv = spec(2, 7, 3, 8)
    count = flops.matmul_flops(lambda q, k, v: layers.dot_product_attention(q, k, v, scale=0.5), q, kv, kv)
    assert count == 2 * (2 * 2 * 3 * 10 * 7 * 8)  # q k^T and p v, 2 FLOPs per multiply-add
    assert not layers.FORCE_XLA_ATTENTION  # restored after counting


def test_mfu_uses_the_spec_sheet_peak():
    class Device:
        device_kind = "NVIDIA H100 80GB HBM3"

    assert flops.mfu(989e12 * 0.5, 1.0, Device(), num_devices=1) == pytest.approx(0.5)
    Device.device_kind = "cpu"
    assert flops.mfu(1e12, 1.0, Device(), num_devices=1) is None
    np.testing.assert_equal(flops.peak_flops_per_s(Device()), None)
