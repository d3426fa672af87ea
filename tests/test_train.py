"""Trainer: resume equals an uninterrupted run, sharded step equals single device, NaN stop, bad configs."""

import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from actalker_jax import sharding, train
from actalker_jax.data import synthetic
from demo_config import tiny_config


@pytest.fixture(scope="module")
def records_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    synthetic.main(["--out", str(out), "--num-clips", "6", "--frames", "10", "--size", "32", "--seed", "3"])
    return str(out / "records")


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
    config = tiny_config(records_dir, **{"data.batch_size": 8, "log.every_steps": 1, "log.sample_every_steps": 2,
                                         "log.sample_steps": 1})
    return train.train(config, str(tmp_path_factory.mktemp("straight")))


def read_events(logdir):
    """(tag, step, value or image bytes) of every summary in the TensorBoard event files under `logdir`."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    out = []
    for name in sorted(os.listdir(logdir)):
        data = open(os.path.join(logdir, name), "rb").read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                out.append((value.tag, event.step, value.image.encoded_image_string if value.HasField("image")
                            else value.simple_value))
    return out


def test_tensorboard_scalars_and_sample_videos(straight_run):
    """Every step logs loss / grad norm / lr / timing / tokens per second; step 2 logs a GIF per control mode."""
    events = read_events(os.path.join(straight_run.workdir, "tensorboard"))
    by_tag = {}
    for tag, step, value in events:
        by_tag.setdefault(tag, {})[step] = value
    for tag in ("train/loss", "train/grad_norm", "train/lr", "perf/step_seconds", "perf/data_wait_seconds",
                "perf/tokens_per_second", "perf/tflop_per_step"):
        assert sorted(by_tag[tag]) == [1, 2], tag
    assert by_tag["train/loss"][2] == pytest.approx(straight_run.summary["loss_last"] * 2 - by_tag["train/loss"][1])
    assert by_tag["perf/tflop_per_step"][1] > 0
    assert "perf/mfu" not in by_tag  # no known peak FLOP/s for CPUs
    for control in ("audio", "motion", "both"):
        gif = by_tag[f"sample/{control}"][2]
        assert gif[:6] == b"GIF89a"


def sigterm_during_first_step(monkeypatch):
    """Sends this process a SIGTERM while the trainer builds its first global batch (a preemption mid-run)."""
    global_batch, sent = train.global_batch, []

    def signalling(local, mesh):
        if not sent:
            sent.append(signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return global_batch(local, mesh)

    monkeypatch.setattr(train, "global_batch", signalling)


def test_sigterm_then_resume_equals_uninterrupted_run(records_dir, straight_run, tmp_path, monkeypatch):
    """SIGTERM mid-run: the trainer finishes step 1, checkpoints it and returns. Re-running resumes, and the params,
    optimizer state, RNG and the next batches are bitwise equal to the uninterrupted run's."""
    config = tiny_config(records_dir, **{"data.batch_size": 8, "checkpoint.every_steps": 100})
    with monkeypatch.context() as patch:
        sigterm_during_first_step(patch)
        stopped = train.train(config, str(tmp_path))
    assert int(stopped.state["step"]) == 1
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]
    resumed = train.train(config, str(tmp_path))
    assert int(resumed.state["step"]) == 2
    for name in ("params", "opt_state", "key"):
        for x, y in zip(leaves(straight_run.state[name]), leaves(resumed.state[name]), strict=True):
            np.testing.assert_array_equal(x, y)
    a, b = next(straight_run.data_iter), next(resumed.data_iter)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


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


def run_steps(config, mesh, steps: int) -> dict:
    """`steps` train steps of `config` on `mesh` through the trainer's sharded init and step, without the loop's
    checkpoints: the state after them."""
    trainer = train.build_trainer(config, mesh)
    state = trainer.init()
    batches = iter(train.pipeline.make_dataset(config, split="train", process_index=0, process_count=1))
    for _ in range(steps):
        local = next(batches)
        local.pop("clip_index", None)
        state, _ = trainer.step(state, train.global_batch(local, mesh))
    return state


@pytest.mark.parametrize("data,fsdp,tensor", [(2, 4, 1), (2, 2, 2)])
def test_sharded_steps_equal_single_device(records_dir, straight_run, data, fsdp, tensor):
    """The same two steps on meshes of 8 CPU devices: (data=2, fsdp=4) and (data=2, fsdp=2, tensor=2)."""
    assert jax.device_count() >= 8
    config = tiny_config(records_dir, **{"data.batch_size": 8})
    sharded = run_steps(config, sharding.make_mesh(data, fsdp, tensor, devices=jax.devices()[:8]), steps=2)
    assert {tuple(s.spec) for s in jax.tree.leaves(jax.tree.map(lambda x: x.sharding, sharded["params"]))} != {()}
    for x, y in zip(leaves(straight_run.state["params"]), leaves(sharded["params"]), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_bad_configs_name_the_key(records_dir, tmp_path):
    with pytest.raises(train.TrainError, match="config.mesh"):
        train.train(tiny_config(records_dir, **{"mesh.data": 3, "mesh.devices": -1}), str(tmp_path / "m"))
    with pytest.raises(train.TrainError, match="config.data.batch_size"):
        train.train(tiny_config(records_dir, **{"data.batch_size": 3, "mesh.devices": 2}), str(tmp_path / "b"))
    with pytest.raises(train.TrainError, match="config.diffusion: center must be one of .*, got 'middle'"):
        train.train(tiny_config(records_dir, **{"diffusion.center": "middle"}), str(tmp_path / "c"))


def test_missing_weights_path_names_the_key(records_dir, tmp_path):
    with pytest.raises(train.TrainError, match="config.init.unet: no converted checkpoint at '/no/such/unet'"):
        train.train(tiny_config(records_dir, **{"init.unet": "/no/such/unet"}), str(tmp_path))


@pytest.mark.parametrize("override,message", [
    ("--config.optim.lrr=1", "error: --config.optim.lrr: the config has no key 'lrr'"),
    ("--config.total_steps=abc", "error: flag --config.total_steps=abc: invalid literal for int()"),
])
def test_bad_command_line_config_is_one_line(tmp_path, override, message):
    config_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.py")
    result = subprocess.run([sys.executable, "-m", "actalker_jax.train", "--config", config_path, "--workdir",
                             str(tmp_path), override], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_frozen_groups_accumulation_and_ema(records_dir, tmp_path, monkeypatch):
    """trainable="mamba_blocks" + grad_accum 2 + EMA 0.5: frozen weights never move and hold no optimizer
    state; trainable ones move only on the second micro-step; EMA follows decay * ema + (1 - decay) * params."""
    config = tiny_config(records_dir, **{"optim.trainable": "mamba_blocks", "optim.grad_accum": 2,
                                         "optim.ema_decay": 0.5, "data.batch_size": 2})
    init = train.cached_trainer(config, sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])).init()
    with monkeypatch.context() as patch:  # step 1 of 2, then resume: one compiled step program for both
        sigterm_during_first_step(patch)
        one = train.train(config, str(tmp_path)).state
    assert int(one["step"]) == 1
    params_one = {k: np.asarray(v) for k, v in one["params"].items()}
    two = train.train(config, str(tmp_path)).state
    trainable = [k for k in init["params"] if "mamba_blocks" in k]
    assert trainable and len(trainable) < len(init["params"])
    for key, value in init["params"].items():
        value = np.asarray(value)
        np.testing.assert_array_equal(params_one[key], value)  # first micro-step: no update at all
        if key in trainable:
            np.testing.assert_allclose(np.asarray(two["ema"][key]), 0.5 * value + 0.5 * np.asarray(two["params"][key]),
                                       rtol=1e-6, atol=1e-7)
        else:
            np.testing.assert_array_equal(np.asarray(two["params"][key]), value)
    assert any(not np.array_equal(np.asarray(two["params"][k]), np.asarray(init["params"][k])) for k in trainable)
    state_keys = {getattr(entry, "key", None) for path, _ in jax.tree_util.tree_flatten_with_path(two["opt_state"])[0]
                  for entry in path}
    assert {k for k in state_keys if isinstance(k, str)} == set(trainable)


def test_init_from_a_converted_unet(records_dir, tmp_path):
    """config.init.unet loads every SVD UNet weight; the IP-adapter K/V start from the loaded attn2 K/V."""
    from flax import nnx

    from actalker_jax import convert
    from actalker_jax.models.unet import UNetSpatioTemporalConditionModel

    config = tiny_config(records_dir, total_steps=0)
    unet = UNetSpatioTemporalConditionModel(train.model_config(config).unet, rngs=nnx.Rngs(7))
    convert.save_converted(str(tmp_path / "converted"), "unet", unet, unet.config)
    saved = train.flatten(nnx.state(unet, nnx.Param))
    config.init.unet = str(tmp_path / "converted" / "unet")
    params = train.train(config, str(tmp_path / "run")).state["params"]
    for key, value in saved.items():
        np.testing.assert_array_equal(np.asarray(params["unet." + key]), np.asarray(value))
    ip_keys = [k for k in params if ".processor.to_k_ip." in k]
    assert ip_keys
    for key in ip_keys:
        layer = key.split(".processor.")[0]
        np.testing.assert_array_equal(np.asarray(params[key]), np.asarray(saved[layer[len("unet."):] + ".to_k.kernel"]))


def test_cached_trainer_reused_only_for_the_same_program(records_dir):
    """Log and checkpoint settings reuse a built trainer; anything else (here the learning rate, the mesh) builds anew."""
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    first = train.cached_trainer(tiny_config(records_dir), mesh)
    assert train.cached_trainer(tiny_config(records_dir, **{"log.every_steps": 3, "checkpoint.keep": 5}), mesh) is first
    assert train.cached_trainer(tiny_config(records_dir, **{"optim.lr": 0.01}), mesh) is not first
    other_mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[1:2])
    assert train.cached_trainer(tiny_config(records_dir), other_mesh) is not first
