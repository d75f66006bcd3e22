#!/usr/bin/env bash
# A smoke run on this machine: `pretrain train` on simulated CPU devices, in one process or in
# several joined through a coordinator on 127.0.0.1, as the processes of a pod are.
#
#   launch/local.sh [--devices=N] [--processes=P] [--port=PORT] [--config=FILE[:ARG]]
#                   [--workdir=DIR] [--config.a.b=V ...] [--dry-run]
#
#   --devices=N      simulated devices per process (default 8 with one process, 2 with several)
#   --processes=P    local processes (default 1), each given --coordinator=127.0.0.1:PORT
#                    --num_processes=P --process_id=I; their output lines are prefixed [I]
#   --port=PORT      the coordinator's port (default 12321)
#   --config=...     the experiment, as for `pretrain train`
#   --workdir=DIR    config.train.workdir (run again with the same one: it resumes)
#   --config.a.b=V   any other config override, passed on
#   --dry-run        print the commands instead of running them
#
# `pretrain` is the one on PATH, else this checkout's .venv/bin/pretrain; $PRETRAIN overrides.
# Ctrl-C or SIGTERM is passed on to every process as SIGTERM: each saves a checkpoint and exits.
#
# Examples:
#   launch/local.sh --devices=8 --config.train.mesh.fsdp=4 --config.train.steps=20
#   launch/local.sh --processes=2 --workdir=runs/two-processes --config.train.steps=20

set -euo pipefail
LAUNCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/common.sh
source "$LAUNCH/common.sh"

DEVICES='' PROCESSES=1 PORT=12321 CONFIG='' WORKDIR=''
OVERRIDES=()

join_values "--devices --processes --port --workdir" "$@"
for arg in "${ARGS[@]}"; do
  case $arg in
    --devices=*) DEVICES=${arg#*=} ;;
    --processes=*) PROCESSES=${arg#*=} ;;
    --port=*) PORT=${arg#*=} ;;
    --config=*) CONFIG=${arg#*=} ;;
    --workdir=*) WORKDIR=${arg#*=} ;;
    --config.*=*) OVERRIDES+=("$arg") ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    *) usage_error "unknown flag: $arg" ;;
  esac
done
for flag in "--devices=${DEVICES:-1}" "--processes=$PROCESSES" "--port=$PORT"; do
  [[ ${flag#*=} =~ ^[1-9][0-9]*$ ]] || usage_error "$flag: a positive integer, please"
done
if (( PROCESSES > 1 )); then DEVICES=${DEVICES:-2}; else DEVICES=${DEVICES:-8}; fi

if [[ -z ${PRETRAIN:-} ]]; then
  PRETRAIN=pretrain
  if ! command -v pretrain >/dev/null && [[ -x $LAUNCH/../.venv/bin/pretrain ]]; then
    PRETRAIN=$(cd "$LAUNCH/.." && pwd)/.venv/bin/pretrain
  fi
fi

# XLA reads its flags when JAX starts: the device count must be in the environment before that.
xla_flags="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$DEVICES"
train=(env JAX_PLATFORMS=cpu XLA_FLAGS="$xla_flags" "$PRETRAIN" train)
if [[ -n $CONFIG ]]; then train+=(--config="$CONFIG"); fi
if [[ -n $WORKDIR ]]; then train+=(--config.train.workdir="$WORKDIR"); fi
train+=("${OVERRIDES[@]}")

if (( PROCESSES == 1 )); then
  show "${train[@]}"
  if (( DRY_RUN )); then exit 0; fi
  exec "${train[@]}"
fi

pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' INT TERM
for (( i = 0; i < PROCESSES; i++ )); do
  process=("${train[@]}" --coordinator="127.0.0.1:$PORT" --num_processes="$PROCESSES" --process_id="$i")
  show "${process[@]}"
  if (( ! DRY_RUN )); then
    "${process[@]}" > >(while IFS= read -r line; do echo "[$i] $line"; done) 2>&1 &
    pids+=("$!")
  fi
done

# The first failure is the run's exit status. A trapped signal interrupts `wait`: so wait while
# the process lives, then once more for its exit status, which bash keeps.
status=0
for pid in "${pids[@]}"; do
  while kill -0 "$pid" 2>/dev/null; do wait "$pid" || true; done
  code=0
  wait "$pid" || code=$?
  if (( status == 0 )); then status=$code; fi
done
exit "$status"
