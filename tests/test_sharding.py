"""Logical-axis metadata on every parameter and a sharded UNet forward on 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from actalker_jax import sharding
from actalker_jax.models.unet import UNetConfig, UNetSpatioTemporalConditionModel


def test_logical_to_spec_uses_each_mesh_axis_once():
    rules = sharding.DEFAULT_RULES
    assert sharding.logical_to_spec(("batch", None, "embed"), rules) == PartitionSpec(("data", "fsdp"), None, None)
    assert sharding.logical_to_spec(("embed", "mlp"), rules) == PartitionSpec("fsdp", "tensor")
    with pytest.raises(ValueError, match="unknown logical axis 'width'"):
        sharding.logical_to_spec(("width",), rules)


def test_every_parameter_has_logical_axes(svd_xt_abstract):
    for path, var in nnx.to_flat_state(nnx.state(svd_xt_abstract, nnx.Param)):
        axes = var.get_metadata().get("logical_axes")
        assert axes is not None and len(axes) == len(var.get_value().shape), path


def test_sharded_forward_matches_single_device():
    assert jax.device_count() >= 8, "tests/conftest.py sets 8 host devices"
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), sharding.MESH_AXES)
    config = UNetConfig.tiny()
    unet = UNetSpatioTemporalConditionModel(config, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(unet)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 2, 8, 8, 8)), jnp.float32)
    t = jnp.asarray(rng.uniform(-1, 1, (4,)), jnp.float32)
    ehs = jnp.asarray(rng.standard_normal((4, 1, 32)), jnp.float32)
    ids = jnp.asarray(rng.uniform(0, 10, (4, 3)), jnp.float32)

    def forward(state, *args):
        return nnx.merge(graphdef, state)(*args)

    want = jax.jit(forward)(state, x, t, ehs, ids)
    specs = sharding.param_specs(nnx.state(unet), mesh=mesh)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    sharded_state = jax.device_put(state, shardings)
    batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    args = [jax.device_put(a, batch_sharding) for a in (x, t, ehs, ids)]
    with sharding.axis_rules(mesh):
        got = jax.jit(forward)(sharded_state, *args)
    kernel = sharded_state["down_blocks"][0]["attentions"][0]["proj_in"]["kernel"].get_value()
    assert kernel.sharding.spec[0] == "fsdp"
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=2e-4)
