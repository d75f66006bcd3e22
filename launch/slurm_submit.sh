#!/usr/bin/env bash
# Submits launch/slurm.sbatch from flags: the sbatch resources, one process per node or per GPU,
# and the `pretrain train` arguments.
#
#   launch/slurm_submit.sh --workdir=/shared/runs/NAME [--config=FILE[:ARG]] [--config.a.b=V ...]
#     [--nodes=N] [--gpus-per-node=G] [--per-gpu] [--time=HH:MM:SS] [--partition=P]
#     [--account=A] [--qos=Q] [--job-name=NAME] [--dry-run]
#
#   --workdir=DIR      config.train.workdir, on a filesystem every node sees (required)
#   --nodes=N          default 2
#   --gpus-per-node=G  default 8
#   --per-gpu          one process per GPU instead of one per node
#   --time, --partition, --account, --qos, --job-name: passed to sbatch
#   --dry-run          print the sbatch command, then what the job would run
#
# Example:
#   launch/slurm_submit.sh --nodes=4 --partition=h100 --config=configs/deepseek_coder_v2_lite.py \
#     --workdir=/shared/runs/lite

set -euo pipefail
LAUNCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/common.sh
source "$LAUNCH/common.sh"

NODES=2 GPUS=8 PER_GPU=0 WORKDIR='' CONFIG=''
SBATCH_FLAGS=()
OVERRIDES=()

join_values "--workdir --nodes --gpus-per-node --time --partition --account --qos --job-name" "$@"
for arg in "${ARGS[@]}"; do
  case $arg in
    --workdir=*) WORKDIR=${arg#*=} ;;
    --nodes=*) NODES=${arg#*=} ;;
    --gpus-per-node=*) GPUS=${arg#*=} ;;
    --per-gpu) PER_GPU=1 ;;
    --time=* | --partition=* | --account=* | --qos=* | --job-name=*) SBATCH_FLAGS+=("$arg") ;;
    --config=*) CONFIG=${arg#*=} ;;
    --config.*=*) OVERRIDES+=("$arg") ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    *) usage_error "unknown flag: $arg" ;;
  esac
done
[[ -n $WORKDIR ]] || usage_error "missing --workdir=DIR (on a shared filesystem, for resuming)"
[[ $NODES =~ ^[1-9][0-9]*$ ]] || usage_error "--nodes=$NODES: a positive integer, please"
[[ $GPUS =~ ^[1-9][0-9]*$ ]] || usage_error "--gpus-per-node=$GPUS: a positive integer, please"

if (( PER_GPU )); then tasks=$GPUS mode=per-gpu; else tasks=1 mode=per-node; fi
train=()
if [[ -n $CONFIG ]]; then train+=(--config="$CONFIG"); fi
train+=(--config.train.workdir="$WORKDIR" "${OVERRIDES[@]}")

run env PRETRAIN_TASKS="$mode" sbatch --nodes="$NODES" --gpus-per-node="$GPUS" \
  --ntasks-per-node="$tasks" "${SBATCH_FLAGS[@]}" "$LAUNCH/slurm.sbatch" "${train[@]}"
if (( DRY_RUN )); then
  echo "# the job runs:"
  PRETRAIN_TASKS=$mode SLURM_NNODES=$NODES SLURM_GPUS_ON_NODE=$GPUS \
    bash "$LAUNCH/slurm.sbatch" --dry-run "${train[@]}"
fi
