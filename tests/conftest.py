"""Test set-up: 8 fake CPU devices for sharding tests (must happen before jax is imported)."""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))


import pytest  # noqa: E402  (after the environment set-up above)


@pytest.fixture(scope="session")
def svd_xt_abstract():
    """The SVD-xt UNet under nnx.eval_shape: shapes and metadata only, nothing allocated."""
    from flax import nnx

    from actalker_jax.models.unet import UNetConfig, UNetSpatioTemporalConditionModel

    return nnx.eval_shape(lambda: UNetSpatioTemporalConditionModel(UNetConfig.svd_xt(), rngs=nnx.Rngs(0)))
