"""Trainer: resume equals an uninterrupted run, sharded step equals single device, NaN stop, bad configs."""

import importlib.util
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from actalker_jax import train
from actalker_jax.data import synthetic

_spec = importlib.util.spec_from_file_location(
    "configs_demo", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.py"))
configs_demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(configs_demo)


@pytest.fixture(scope="module")
def records_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    synthetic.main(["--out", str(out), "--num-clips", "6", "--frames", "10", "--size", "32", "--seed", "3"])
    return str(out / "records")


def tiny_config(records, **overrides):
    config = configs_demo.get_config()
    config.synthetic_clips = 0
    config.data.records = records
    config.data.n_frames = 4
    config.data.eval_fraction = 0.0
    config.model.unet.num_frames = 4
    config.total_steps = 2
    config.checkpoint.every_steps = 1
    config.checkpoint.every_minutes = 0.0
    config.mesh.devices = 1
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for name in parents:
            target = target[name]
        target[leaf] = value
    return config


def leaves(tree):
    """Host copies of every leaf (typed PRNG keys as their raw key data)."""
    def host(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(jax.device_get(x))
    return [host(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def straight_run(records_dir, tmp_path_factory):
    """Two uninterrupted steps on one device, global batch 8 (the reference of the tests below)."""
    return train.train(tiny_config(records_dir, **{"data.batch_size": 8}), str(tmp_path_factory.mktemp("straight")))


def test_resume_equals_uninterrupted_run(records_dir, straight_run, tmp_path):
    """Stop after one step, resume: params, optimizer state, RNG and the next batches are bitwise equal."""
    train.train(tiny_config(records_dir, total_steps=1, **{"data.batch_size": 8}), str(tmp_path))
    resumed = train.train(tiny_config(records_dir, **{"data.batch_size": 8}), str(tmp_path))
    assert int(resumed.state["step"]) == 2
    for name in ("params", "opt_state", "key"):
        for x, y in zip(leaves(straight_run.state[name]), leaves(resumed.state[name]), strict=True):
            np.testing.assert_array_equal(x, y)
    a, b = next(straight_run.data_iter), next(resumed.data_iter)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_sharded_steps_equal_single_device(records_dir, straight_run, tmp_path):
    """The same two steps on a (data=2, fsdp=4) mesh of 8 CPU devices."""
    assert jax.device_count() >= 8
    config = tiny_config(records_dir, **{"data.batch_size": 8, "mesh.devices": -1})
    config.mesh.data, config.mesh.fsdp = 2, 4
    sharded = train.train(config, str(tmp_path))
    for x, y in zip(leaves(straight_run.state["params"]), leaves(sharded.state["params"]), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_bad_configs_name_the_key(records_dir, tmp_path):
    with pytest.raises(train.TrainError, match="config.mesh"):
        train.train(tiny_config(records_dir, **{"mesh.data": 3, "mesh.devices": -1}), str(tmp_path / "m"))
    with pytest.raises(train.TrainError, match="config.data.batch_size"):
        train.train(tiny_config(records_dir, **{"data.batch_size": 3, "mesh.devices": 2}), str(tmp_path / "b"))


def test_non_finite_loss_stops_naming_the_step(records_dir, tmp_path, monkeypatch):
    """A NaN in the second batch stops training with the step and the batch's clip indices."""
    make_dataset = train.pipeline.make_dataset

    class Poisoned:
        def __init__(self, dataset):
            self.dataset = dataset

        def __iter__(self):
            for i, batch in enumerate(self.dataset):
                if i == 1:
                    batch = dict(batch, latents=np.full_like(batch["latents"], np.nan))
                yield batch

    monkeypatch.setattr(train.pipeline, "make_dataset", lambda *a, **k: Poisoned(make_dataset(*a, **k)))
    with pytest.raises(train.TrainError, match=r"non-finite loss or gradient at step 2 \(batch clip_index \["):
        train.train(tiny_config(records_dir, **{"checkpoint.every_steps": 10, "data.batch_size": 8}), str(tmp_path))


def test_sigterm_saves_a_checkpoint_and_exits(records_dir, tmp_path):
    """SIGTERM mid-run (here: during set-up): the trainer finishes the step, checkpoints it, exits with 0."""
    workdir = tmp_path / "run"
    config_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.py")
    overrides = ["--config.synthetic_clips=0", f"--config.data.records={records_dir}", "--config.data.n_frames=4",
                 "--config.data.eval_fraction=0.0", "--config.model.unet.num_frames=4", "--config.total_steps=1000",
                 "--config.checkpoint.every_steps=1000", "--config.checkpoint.every_minutes=0.0",
                 "--config.mesh.devices=1"]
    process = subprocess.Popen([sys.executable, "-m", "actalker_jax.train", "--config", config_path, "--workdir",
                                str(workdir), *overrides], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not os.path.isdir(workdir) and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    time.sleep(2.0)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=600)
    assert process.returncode == 0, out[-3000:]
    match = re.search(r"done: step (\d+)", out)
    assert match, out[-3000:]
    stopped = int(match.group(1))
    assert 0 < stopped < 1000
    assert sorted(os.listdir(workdir / "checkpoints")) == [str(stopped)]
