#!/usr/bin/env bash
# Runs on each worker of a Cloud TPU VM slice; launch/tpu_vm.sh calls it on all of them at once
# (`gcloud compute tpus tpu-vm ssh --worker=all`). The project lies in ~/pretrain; the trainer's
# log, pid and exit status in ~/pretrain-run.
#
#   tpu_worker.sh install [--dry-run]          Python 3.12 venv (uv) with the project and jax[tpu]
#   tpu_worker.sh start [--dry-run] COMMAND...  COMMAND (`pretrain train ...`) from ~/pretrain with
#                                              its venv first on PATH, detached from the ssh session
#   tpu_worker.sh stop [--dry-run]             SIGTERM to the trainer: it saves a checkpoint, exits 0
#   tpu_worker.sh status                       prints `running`, `exited N` or `not running`

set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SRC=~/pretrain
STATE=~/pretrain-run

trainer_pid() {  # the trainer's pid while it runs; fails otherwise
  local pid
  pid=$(cat "$STATE/train.pid" 2>/dev/null) && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

cmd_install() {
  # TPU VM images ship Python 3.10; the project needs >= 3.11, which uv fetches.
  run python3 -m pip install --user --quiet --upgrade uv
  if [[ ! -x $SRC/.venv/bin/python ]]; then run ~/.local/bin/uv venv --python=3.12 "$SRC/.venv"; fi
  run ~/.local/bin/uv pip install --python="$SRC/.venv/bin/python" -e "$SRC" 'jax[tpu]'
}

cmd_start() {
  local pid
  (( $# )) || usage_error "start needs a command: pretrain train ..."
  if pid=$(trainer_pid); then note "already running (pid $pid)"; exit 1; fi
  run mkdir -p "$STATE"
  run rm -f "$STATE/exit_status"
  # setsid + nohup: the trainer outlives the ssh session that started it.
  show setsid nohup bash "$0" _supervise "$@"
  if (( ! DRY_RUN )); then setsid nohup bash "$0" _supervise "$@" </dev/null >/dev/null 2>&1 & fi
}

# Internal: the detached process that runs the trainer and records its pid and exit status.
cmd_supervise() {
  local status=0
  cd "$SRC"
  PATH="$SRC/.venv/bin:$PATH" "$@" >>"$STATE/train.log" 2>&1 &
  echo $! >"$STATE/train.pid"
  wait $! || status=$?
  echo "$status" >"$STATE/exit_status"
}

cmd_stop() {
  local pid
  if pid=$(trainer_pid); then run kill -TERM "$pid"; else note "not running"; fi
}

cmd_status() {
  if trainer_pid >/dev/null; then
    echo running
  elif [[ -f $STATE/exit_status ]]; then
    echo "exited $(cat "$STATE/exit_status")"
  else
    echo "not running"
  fi
}

(( $# )) || usage_error "missing command: install, start, stop or status"
command=$1
shift
if [[ ${1:-} == --dry-run ]]; then DRY_RUN=1; shift; fi
case $command in
  install | stop | status) (( $# == 0 )) || usage_error "$command takes no arguments: $1" ;;
esac
case $command in
  install) cmd_install ;;
  start) cmd_start "$@" ;;
  _supervise) cmd_supervise "$@" ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  -h | --help) usage ;;
  *) usage_error "unknown command: $command" ;;
esac
