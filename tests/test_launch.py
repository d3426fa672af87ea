"""launch/: the SLURM script, the TPU-VM pod script and the Kubernetes JobSet parse and run the trainer."""

import os
import re
import subprocess

import yaml

LAUNCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch")


def read(name):
    with open(os.path.join(LAUNCH, name)) as f:
        return f.read()


def test_shell_scripts_parse():
    for name in ("slurm_gpu.sbatch", "tpu_vm_pod.sh"):
        subprocess.run(["bash", "-n", os.path.join(LAUNCH, name)], check=True)


def test_slurm_script_runs_one_distributed_trainer_per_node():
    text = read("slurm_gpu.sbatch")
    directives = dict(re.findall(r"^#SBATCH --([a-z-]+)=(\S+)", text, re.M))
    assert directives["ntasks-per-node"] == "1" and int(directives["gpus-per-node"]) >= 1
    (command,) = [line for line in text.splitlines() if line.startswith("srun")]
    assert "-m actalker_jax.train" in command and "--config.distributed=True" in text


def test_tpu_script_runs_the_trainer_on_every_worker():
    text = read("tpu_vm_pod.sh")
    assert "--worker=all" in text and "-m actalker_jax.train" in text and "--config.distributed=True" in text


def test_jobset_sets_what_train_reads():
    manifest = yaml.safe_load(read("jobset.yaml"))
    assert manifest["kind"] == "JobSet"
    job = manifest["spec"]["replicatedJobs"][0]["template"]["spec"]
    container = job["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert set(env) >= {"JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"}
    assert int(env["JAX_NUM_PROCESSES"]["value"]) == job["parallelism"] == job["completions"]
    assert "job-completion-index" in env["JAX_PROCESS_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert container["command"][-1] == "actalker_jax.train" and "--config.distributed=True" in container["args"]
    with open(os.path.join(os.path.dirname(LAUNCH), "actalker_jax", "train.py")) as f:
        train_source = f.read()
    for name in env:
        assert name in train_source, f"train.py does not read {name}"
