"""Masked, bidirectional Mamba-1 selective scan over (batch, L, D) sequences.

`selective_scan(u, delta, A, B, C, D, z, delta_bias, *, delta_softplus, mask, reverse, impl)`;
implementations: reference (lax.scan), sequential (lax.scan, hand-written adjoint), xla (chunked),
pallas (GPU kernel), auto.
"""
from actalker_jax.kernels.selective_scan.api import IMPLS, resolve_impl, selective_scan

__all__ = ["IMPLS", "resolve_impl", "selective_scan"]
