"""Multi-host training on one machine: two real processes on localhost (`jax.distributed.initialize`, gloo CPU
collectives), one CPU device each, train a tiny config on an fsdp=2 mesh spanning both processes (the batch
and the parameters split between the processes).

Both processes agree on the per-step losses and the final parameters, which equal a one-process run of the
same global batch on as many devices (rtol 1e-5), and they write one checkpoint together (each process its
shards and data-iterator state) that holds those parameters. The demo's synthetic records are made by
process 0 while process 1 waits for them.

This file is also the worker: `python tests/test_distributed.py --worker CONFIG.pkl WORKDIR OUT_PREFIX`
(the environment names the coordinator, the process count and the process id).
"""

import json
import os

import pytest
import pickle
import signal
import socket
import subprocess
import sys
import time

import numpy as np

PROCESSES = 2
DEVICES_PER_PROCESS = 1
STEPS = 2
BATCH_PER_PROCESS = 2
TIMEOUT_S = 600  # a guard against hangs only (the test takes ~4 min on 2 busy cores: ~300 s CPU, mostly compiling)


# ----------------------------------------------------------------------------- the worker (a child process)

def worker(config_path: str, workdir: str, out_prefix: str) -> None:
    """Trains the pickled config (distributed=True) and writes OUT_PREFIX.json (summary, topology) and
    OUT_PREFIX.npz (the final parameters, gathered from every process)."""
    import jax
    from jax.experimental import multihost_utils

    from actalker_jax import train

    with open(config_path, "rb") as f:
        config = pickle.load(f)
    result = train.train(config, workdir)
    params = multihost_utils.process_allgather(result.state["params"], tiled=True)
    np.savez(out_prefix + ".npz", **{k: np.asarray(v) for k, v in params.items()})
    info = dict(process_index=jax.process_index(), process_count=jax.process_count(),
                device_count=jax.device_count(), local_device_count=jax.local_device_count(),
                mesh_devices=[d.process_index for d in jax.devices()], summary=result.summary,
                split_params=sum(not x.is_fully_addressable for x in result.state["params"].values()))
    with open(out_prefix + ".json", "w") as f:
        json.dump(info, f)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    worker(*sys.argv[2:5])
    sys.exit(0)


# ----------------------------------------------------------------------------- the test (the pytest process)

import jax  # noqa: E402  (the worker above imports jax after its environment is set)
import orbax.checkpoint as ocp  # noqa: E402

from actalker_jax import train  # noqa: E402
from demo_config import tiny_config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(process_id: int, port: int) -> dict:
    """The environment of one worker: CPU only, its own device count, the coordinator, its rank.

    (No compilation cache: with jax_share_binary_between_hosts process 1 would wait for process 0's binary, but
    on CPU the two processes' cache keys of one program differ, so it waits until the timeout.)
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env.update(JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS} "
                         "--xla_backend_optimization_level=0",  # as tests/conftest.py: fast, IEEE-exact
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(PROCESSES),
               JAX_PROCESS_ID=str(process_id),
               PYTHONPATH=os.pathsep.join([REPO, env.get("PYTHONPATH", "")]))
    return env


def tail(path, n=3000) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-n:]


class Workers:
    """PROCESSES worker processes of one distributed run (outputs in tmp_path/process_<i>.{log,json,npz})."""

    def __init__(self, config, tmp_path):
        self.tmp_path = tmp_path
        config_path = tmp_path / "config.pkl"
        with open(config_path, "wb") as f:
            pickle.dump(config, f)
        port = free_port()
        self.logs = [tmp_path / f"process_{i}.log" for i in range(PROCESSES)]
        self.procs = []
        try:
            for i, log_path in enumerate(self.logs):
                with open(log_path, "w") as log:
                    self.procs.append(subprocess.Popen(
                        [sys.executable, os.path.abspath(__file__), "--worker", str(config_path),
                         str(tmp_path / "run"), str(tmp_path / f"process_{i}")], env=child_env(i, port), cwd=REPO,
                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        except BaseException:
            self.kill()
            raise

    def outputs(self) -> str:
        return "\n".join(f"--- process {i} (exit {p.returncode}), last lines:\n{tail(log)}"
                         for i, (p, log) in enumerate(zip(self.procs, self.logs)))

    def wait(self, deadline: float) -> list[dict]:
        """Waits for every worker (failing as soon as one fails) -> each one's JSON record, parameters, output."""
        while any(p.poll() is None for p in self.procs):
            failed = [i for i, p in enumerate(self.procs) if p.returncode not in (None, 0)]
            assert not failed, f"process {failed[0]} failed:\n{self.outputs()}"
            assert time.time() < deadline, f"timed out after {TIMEOUT_S} s:\n{self.outputs()}"
            time.sleep(0.5)
        assert all(p.returncode == 0 for p in self.procs), f"a process failed:\n{self.outputs()}"
        records = []
        for i, log in enumerate(self.logs):
            with open(self.tmp_path / f"process_{i}.json") as f:
                record = json.load(f)
            with np.load(self.tmp_path / f"process_{i}.npz") as params:
                record["params"] = dict(params)
            record["output"] = tail(log, 100_000)
            records.append(record)
        return records

    def kill(self) -> None:
        """Kills the workers still running (after a failure the others would wait for their peer until timeout)."""
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def distributed_config(**overrides):
    """The tiny trainer config, one UNet level, with the demo's synthetic data (made in the workdir by process 0;
    the synthetic clips are a function of the seed, so the one-process reference makes the same ones)."""
    config = tiny_config("", total_steps=STEPS, synthetic_clips=6, synthetic_frames=10, synthetic_size=32,
                         **{"mesh.devices": -1, "checkpoint.every_steps": STEPS, **overrides})
    config.data.records = ""
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, PROCESSES * DEVICES_PER_PROCESS, 1
    return config


@pytest.mark.slow
def test_two_processes_train_and_agree_on_the_loss(tmp_path):
    deadline = time.time() + TIMEOUT_S
    workers = Workers(distributed_config(distributed=True, **{"data.batch_size": BATCH_PER_PROCESS}), tmp_path)
    try:
        # Meanwhile, the reference: the same global batch (BATCH_PER_PROCESS x PROCESSES) in this process on as
        # many devices, on the same data.
        assert jax.device_count() >= PROCESSES * DEVICES_PER_PROCESS
        single = train.train(distributed_config(**{"data.batch_size": BATCH_PER_PROCESS * PROCESSES,
                                                   "mesh.devices": PROCESSES * DEVICES_PER_PROCESS}),
                             str(tmp_path / "single"))
        procs = workers.wait(deadline)
    finally:
        workers.kill()

    for i, record in enumerate(procs):
        assert (record["process_index"], record["process_count"]) == (i, PROCESSES)
        assert (record["local_device_count"], record["device_count"]) == (DEVICES_PER_PROCESS,
                                                                         PROCESSES * DEVICES_PER_PROCESS)
        # jax.devices() (the mesh order) lists process 0's devices first: its rows lead the global batch.
        assert record["mesh_devices"] == sorted(record["mesh_devices"]), record["mesh_devices"]
        assert record["summary"]["step"] == STEPS and len(record["summary"]["losses"]) == STEPS, record["summary"]
        assert record["split_params"] > 0, "no parameter is sharded across the processes"
    # Both processes agree on every step's loss and on the parameters; only process 0 prints the summary line.
    assert procs[0]["summary"]["losses"] == procs[1]["summary"]["losses"]
    for key, value in procs[0]["params"].items():
        np.testing.assert_array_equal(procs[1]["params"][key], value, err_msg=key)
    assert f"done: step {STEPS}," in procs[0]["output"], procs[0]["output"][-3000:]
    assert "done: step" not in procs[1]["output"], procs[1]["output"][-3000:]

    # One checkpoint of the step, written together: state, both processes' data iterators, the config.
    checkpoint = tmp_path / "run" / "checkpoints" / str(STEPS)
    assert checkpoint.is_dir(), sorted(os.listdir(tmp_path / "run" / "checkpoints"))
    assert {"state", "data", "config"} <= set(os.listdir(checkpoint)), os.listdir(checkpoint)
    for item in ("state", "data"):  # orbax's per-process shards (ocdbt.process_<i>), grain's process_<i>-of-<n>.json
        files = os.listdir(checkpoint / item)
        assert all(any(f"process_{i}" in name for name in files) for i in range(PROCESSES)), (item, files)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), single.state)
    restored = ocp.StandardCheckpointer().restore(checkpoint / "state", target)  # here: 1 process, 2 devices
    assert int(restored["step"]) == STEPS
    for key, value in procs[0]["params"].items():
        np.testing.assert_array_equal(np.asarray(restored["params"][key]), value, err_msg=key)

    # ... and equal the one-process run of the same global batch.
    np.testing.assert_allclose(procs[0]["summary"]["losses"], single.summary["losses"], rtol=1e-5)
    for key, value in single.state["params"].items():
        np.testing.assert_allclose(procs[0]["params"][key], np.asarray(value), rtol=1e-5, atol=1e-6, err_msg=key)
