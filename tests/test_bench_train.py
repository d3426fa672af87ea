"""bench.train's host-drawn random state: the train state's structure, shapes, dtypes and shardings, no init program."""

import jax
import numpy as np

from actalker_jax import sharding, train
from actalker_jax.bench.train import host_random_state
from demo_config import small_demo_config


def test_host_random_state_matches_the_abstract_state():
    config = small_demo_config()
    config.mesh.fsdp, config.mesh.data = 2, 1
    mesh = sharding.make_mesh(1, 2, 1, devices=jax.devices()[:2])
    trainer = train.build_trainer(config, mesh)
    state = host_random_state(trainer, seed=3)
    assert jax.tree.structure(state) == jax.tree.structure(trainer.abstract_state)
    for value, spec, want in zip(jax.tree.leaves(state), jax.tree.leaves(trainer.abstract_state),
                                 jax.tree.leaves(trainer.state_shardings), strict=True):
        assert value.shape == spec.shape and value.dtype == spec.dtype
        assert value.sharding.is_equivalent_to(want, value.ndim)
    params = [np.asarray(p) for p in jax.tree.leaves(state["params"])]
    assert all(np.std(p) > 0.01 for p in params if p.size > 16)
    moments = [np.asarray(m) for m in jax.tree.leaves(state["opt_state"]) if np.ndim(m) > 0]
    assert moments and all(not m.any() for m in moments)
    assert state["ema"].keys() == state["params"].keys()
    assert int(state["step"]) == 0
