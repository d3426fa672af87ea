"""Rematerialisation by block name: same loss and gradients as no remat, recomputation really happens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from actalker_jax.models import remat
from actalker_jax.models.unet import UNetConfig, UNetSpatioTemporalConditionModel

CONFIG = UNetConfig.tiny(num_frames=2)


def loss_and_grads(policies):
    unet = UNetSpatioTemporalConditionModel(CONFIG, rngs=nnx.Rngs(0), remat=policies)
    graphdef, params = nnx.split(unet)
    rng = np.random.default_rng(0)
    sample = jnp.asarray(rng.standard_normal((1, 2, 8, 8, CONFIG.in_channels)), jnp.float32)
    context = jnp.asarray(rng.standard_normal((1, 1, 32)), jnp.float32)
    ids = jnp.asarray([[6.0, 127.0, 0.02]], jnp.float32)

    def loss(params):
        out = nnx.merge(graphdef, params)(sample, 0.3, context, ids)
        return jnp.mean(jnp.square(out))

    grad_fn = jax.value_and_grad(loss)
    return jax.jit(grad_fn)(params), str(jax.make_jaxpr(grad_fn)(params))


def test_remat_policies_keep_loss_and_gradients():
    (loss_ref, grads_ref), text_ref = loss_and_grads(None)
    policies = {"default": "full", "down_blocks": "dots_saveable", "up_blocks.1": "dots_with_no_batch_dims_saveable"}
    (loss, grads), text = loss_and_grads(policies)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # Recomputation is in the program: the backward pass re-runs convolutions of the forward pass.
    assert text.count("conv_general_dilated") > text_ref.count("conv_general_dilated")


def test_most_specific_name_wins():
    pairs = remat.normalize({"default": "full", "up_blocks": "dots_saveable", "up_blocks.1": "none"},
                            ("down_blocks.0", "mid_block", "up_blocks.0", "up_blocks.1"))
    assert remat.policy_name(pairs, "up_blocks.1") == "none"
    assert remat.policy_name(pairs, "up_blocks.0") == "dots_saveable"
    assert remat.policy_name(pairs, "mid_block") == "full"
    assert remat.policy_name((), "mid_block") == "none"


@pytest.mark.parametrize("policies,message", [({"down_blocks.7": "full"}, "unknown block 'down_blocks.7'"),
                                              ({"mid_block": "sometimes"}, "unknown policy 'sometimes'")])
def test_bad_remat_config_names_the_key(policies, message):
    with pytest.raises(ValueError, match=message):
        UNetSpatioTemporalConditionModel(CONFIG, rngs=nnx.Rngs(0), remat=policies)
