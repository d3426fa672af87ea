"""The Pallas selective scan lowers for CUDA at the paper shapes (forward and backward), on a CPU-only machine.

`jax.export` for platform "cuda" runs the Pallas -> Triton lowering of every kernel, so a kernel
that uses an op or shape the Triton lowering rejects fails here without a GPU.
"""
import jax
import jax.numpy as jnp
import pytest
from jax import export

from actalker_jax.kernels.selective_scan import selective_scan

TRITON_CALL = "__gpu$xla.gpu.triton"

# (batch, L, D, N): whole-video scan at the top UNet level, and per-frame scans (48x64 image
# tokens + 1 ID token + 32 audio tokens, 25 frames x 2 samples).
SHAPES = {"paper-video": (2, 72_000, 640, 16), "paper-frame": (50, 3_105, 640, 16), "small": (2, 24, 64, 8)}


def _abstract_gpu():
    """Context naming an H100 as the target (jax >= 0.11 asks the Triton lowering for one)."""
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device))


def _export(fn, *args):
    checks = [export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
    with _abstract_gpu():
        return export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(*args)


@pytest.mark.parametrize("shape,with_z,softplus,reverse", [
    ("paper-video", True, True, True), ("paper-video", False, True, True),
    ("paper-frame", True, True, True), ("paper-frame", False, True, True),
    # Raw step sizes: this path once built a bool tensor that Triton refused (seen on an H100).
    ("small", False, False, False)])
def test_pallas_exports_for_cuda(shape, with_z, softplus, reverse):
    batch, length, dim, nstate = SHAPES[shape]
    bf16, f32 = jnp.bfloat16, jnp.float32
    seq = jax.ShapeDtypeStruct((batch, length, dim), bf16)
    bc = jax.ShapeDtypeStruct((batch, length, nstate), bf16)
    vec = jax.ShapeDtypeStruct((dim,), f32)
    args = (seq, seq, jax.ShapeDtypeStruct((dim, nstate), f32), bc, bc, vec, seq if with_z else None, vec)
    mask = jax.ShapeDtypeStruct((batch, length), jnp.bool_)

    def forward(u, delta, A, B, C, D, z, delta_bias, mask):
        return selective_scan(
            u, delta, A, B, C, D, z, delta_bias, mask=mask, delta_softplus=softplus, reverse=reverse, impl="pallas",
            options={"interpret": False},
        )

    def forward_backward(u, delta, A, B, C, D, z, delta_bias, mask, g):
        y, vjp = jax.vjp(lambda *a: forward(*a, mask), u, delta, A, B, C, D, z, delta_bias)
        return y, vjp(g)

    fwd = _export(forward, *args, mask)
    assert fwd.platforms == ("cuda",)
    assert fwd.mlir_module().count(TRITON_CALL) == 2
    fwd_bwd = _export(forward_backward, *args, mask, seq)
    assert fwd_bwd.mlir_module().count(TRITON_CALL) == 4
    assert fwd_bwd.out_avals[0].shape == (batch, length, dim)
    assert fwd_bwd.out_avals[0].dtype == bf16
