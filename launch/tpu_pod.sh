#!/usr/bin/env bash
# Runs the same command on every worker of a Cloud TPU VM pod slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE configs/sft.py --config.mesh.shape='(1,-1,1)' ...
#
# Prerequisites: the repository is checked out at the same path on every worker ($REPO,
# default ~/deepintuit_jax) with `pip install -r requirements.txt` and jax[tpu] installed,
# and the data files are at the same path on every worker. The workdir (and an Orbax
# `init_from`) may be a gs:// URL, e.g. WORKDIR=gs://bucket/runs/sft, or a filesystem every
# worker sees (NFS / Filestore / GCS FUSE). `deepintuit_jax.main` detects the pod
# (TPU_WORKER_HOSTNAMES) and calls jax.distributed.initialize() on each worker.
set -euo pipefail
tpu=${1:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG [--config.x=y ...]}
zone=${2:?zone}
config=${3:?config}
shift 3
repo=${REPO:-'~/deepintuit_jax'}
workdir=${WORKDIR:-runs/$(basename "${config%%:*}" .py)}
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command \
  "cd $repo && HF_HUB_OFFLINE=1 python3 -m deepintuit_jax.main --config=$config --workdir=$workdir$args"
