#!/bin/bash
# Training on a Cloud TPU VM pod slice: the same command on every worker.
#
#   launch/tpu_vm_pod.sh TPU_NAME ZONE configs/actalker_svd_xt.py gs://bucket/runs/actalker [--config.key=value ...]
#
# Assumes the repository is checked out at ~/actalker_jax on every worker and installed with
# `pip install -e .` (run the same script with --setup first). jax.distributed.initialize() finds the
# pod's workers by itself on TPU VMs.
set -euo pipefail
if [[ "${1:-}" == "--setup" ]]; then
  shift
  TPU=${1:?TPU name}; ZONE=${2:?zone}
  gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all \
    --command "cd ~/actalker_jax && pip install -e . 'jax[tpu]'"
  exit 0
fi
TPU=${1:?usage: tpu_vm_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]}
ZONE=${2:?zone}
CONFIG=${3:?config}
WORKDIR=${4:?workdir}
shift 4
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all \
  --command "cd ~/actalker_jax && python -m actalker_jax.train --config $CONFIG --workdir $WORKDIR --config.distributed=True $*"
