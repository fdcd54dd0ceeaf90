#!/usr/bin/env bash
# Multi-host GPU training under SLURM: one process per node, all of the node's GPUs each.
#
#   sbatch --nodes=4 launch/slurm_gpu.sh configs/sft.py \
#       --config.model.checkpoint=/models/Qwen2.5-VL-7B-Instruct \
#       --config.data.train_file=/data/train.json --config.data.video_root=/data/videos
#
# `deepintuit_jax.main` sees SLURM_NTASKS > 1 and calls jax.distributed.initialize(), which
# reads the coordinator, process count and index from SLURM. Every process must see the same
# code, config and data files, and the same workdir (a shared filesystem or a gs:// URL):
# checkpoints are written by all processes together (Orbax), metrics and the HF export by
# process 0. Without SLURM: JAX_COORDINATOR_ADDRESS=host:port JAX_NUM_PROCESSES=N
# JAX_PROCESS_ID=i on each process.
#SBATCH --job-name=deepintuit
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --exclusive
set -euo pipefail
config=${1:?usage: sbatch launch/slurm_gpu.sh CONFIG [--config.x=y ...]}
shift
workdir=${WORKDIR:-runs/$(basename "${config%%:*}" .py)}
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
# Let XLA use most of the GPU memory; cuDNN flash attention via --config.model.attention_impl=cudnn.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export HF_HUB_OFFLINE=1
srun --kill-on-bad-exit=1 python -m deepintuit_jax.main --config="$config" --workdir="$workdir" "$@"
