#!/usr/bin/env bash
# Continued pretraining on a Cloud TPU VM slice: every worker runs the same `pretrain train`
# (`--coordinator=auto`: JAX finds its peers in the TPU VM metadata).
#
#   launch/tpu_vm.sh COMMAND --name=NAME --zone=ZONE [flags] [--config.a.b=V ...]
#
# Commands:
#   up        create, install, run
#   watch     up, then keep the run going until the trainer finishes: a preempted, suspended or
#             deleted slice is deleted, recreated, reinstalled and the same command started again,
#             which resumes from --workdir
#   create    the slice: `tpu-vm create`, or with --queued a queued resource, waited on until ACTIVE
#   install   copy this checkout to every worker (~/pretrain), install it there with jax[tpu]
#   run       start `pretrain train` on every worker, detached; log in ~/pretrain-run/train.log
#   logs      follow the log of worker --worker
#   stop      SIGTERM the trainers: they save a checkpoint and exit
#   delete    delete the slice (with --queued, its queued resource and the slice)
#   status    the slice's state and the trainer's on worker 0
#
# Flags (`--flag=VALUE` or `--flag VALUE`):
#   --name=NAME                the TPU VM, and queued resource, name (required)
#   --zone=ZONE                e.g. us-east5-a (required)
#   --project=PROJECT          default: gcloud's configured project
#   --accelerator-type=TYPE    e.g. v5p-128, v5litepod-64, v6e-256 (create, up, watch)
#   --runtime-version=VERSION  default by type: v4 tpu-ubuntu2204-base, v5p v2-alpha-tpuv5,
#                              v5litepod v2-alpha-tpuv5-lite, v6e v2-alpha-tpuv6e
#   --spot                     Spot capacity: cheaper, preempted at any time
#   --preemptible              legacy preemptible capacity (tpu-vm create only)
#   --queued                   a queued resource: waits for capacity instead of failing
#   --config=FILE[:ARG]        the experiment, as for `pretrain train`
#   --workdir=DIR              config.train.workdir, the same for every worker and kept when the
#                              slice is lost, so a rerun resumes: a gs:// bucket the VMs' service
#                              account may write, or a path every worker mounts (Filestore) (run, up, watch)
#   --config.a.b=V             any other config override, passed on to `pretrain train`
#   --worker=N|all             logs: which worker (default 0)
#   --poll=SECONDS             watch, and waiting for a queued resource: poll interval (default 60)
#   --dry-run                  print every command instead of running it
#
# Example:
#   launch/tpu_vm.sh watch --name=lite --zone=us-east5-a --accelerator-type=v5p-128 --spot --queued \
#     --config=configs/deepseek_coder_v2_lite.py --workdir=gs://my-bucket/runs/lite

set -euo pipefail
LAUNCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/common.sh
source "$LAUNCH/common.sh"
ROOT=$(dirname "$LAUNCH")

NAME='' ZONE='' PROJECT='' ACCELERATOR='' RUNTIME='' CONFIG='' WORKDIR='' WORKER=0 POLL=60
SPOT=0 PREEMPTIBLE=0 QUEUED=0
OVERRIDES=()
WHERE=()  # --zone and --project, for every gcloud command

# ---- the slice

default_runtime() {
  case $1 in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
  esac
}

cmd_create() {
  local capacity=()
  if (( SPOT )); then capacity=(--spot); fi
  if (( PREEMPTIBLE )); then capacity=(--preemptible); fi
  if (( QUEUED )); then
    run gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME" "${WHERE[@]}" \
      --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME" "${capacity[@]}"
    wait_until_active
  else
    run gcloud compute tpus tpu-vm create "$NAME" "${WHERE[@]}" \
      --accelerator-type="$ACCELERATOR" --version="$RUNTIME" "${capacity[@]}"
  fi
}

wait_until_active() {
  local state
  while true; do
    state=$(query ACTIVE gcloud compute tpus queued-resources describe "$NAME" "${WHERE[@]}" \
      --format='value(state.state)')
    case $state in
      ACTIVE) return 0 ;;
      FAILED | SUSPENDED) note "queued resource $NAME is $state"; return 1 ;;
    esac
    note "queued resource $NAME is $state, waiting for capacity"
    sleep "$POLL"
  done
}

# READY when the slice can run; CREATING while it comes up; anything else (PREEMPTED, TERMINATED,
# SUSPENDED, FAILED, NOT_FOUND, ...) means it is gone. A dry run answers as after a preemption.
slice_state() {
  local state
  if (( QUEUED )); then
    state=$(query SUSPENDED gcloud compute tpus queued-resources describe "$NAME" "${WHERE[@]}" \
      --format='value(state.state)') || state=NOT_FOUND
    case $state in
      ACTIVE) ;;  # then the slice's own state, below
      ACCEPTED | WAITING_FOR_RESOURCES | PROVISIONING | CREATING) echo CREATING; return ;;
      *) echo "${state:-NOT_FOUND}"; return ;;
    esac
  fi
  state=$(query PREEMPTED gcloud compute tpus tpu-vm describe "$NAME" "${WHERE[@]}" \
    --format='value(state)') || state=NOT_FOUND
  echo "${state:-NOT_FOUND}"
}

cmd_delete() {
  if (( QUEUED )); then
    run gcloud compute tpus queued-resources delete "$NAME" "${WHERE[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$NAME" "${WHERE[@]}" --quiet
  fi
}

# ---- the project and the trainer, on every worker

ssh_workers() {  # ssh_workers WORKER COMMAND
  run gcloud compute tpus tpu-vm ssh "$NAME" "${WHERE[@]}" --worker="$1" --command="$2"
}

cmd_install() {
  local tarball="${TMPDIR:-/tmp}/pretrain-$NAME.tar.gz"
  run tar -czf "$tarball" --exclude=.git --exclude=.venv --exclude=runs --exclude=__pycache__ \
    --exclude='*.egg-info' --exclude=.pytest_cache -C "$ROOT" .
  run gcloud compute tpus tpu-vm scp "$tarball" "$NAME:pretrain.tar.gz" "${WHERE[@]}" --worker=all
  ssh_workers all "mkdir -p ~/pretrain && tar -xzf ~/pretrain.tar.gz -C ~/pretrain \
&& bash ~/pretrain/launch/tpu_worker.sh install"
}

cmd_run() {
  # The slice's workers are in the VM metadata, not the environment: ask JAX to look there.
  local train=(pretrain train --coordinator=auto)
  if [[ -n $CONFIG ]]; then train+=(--config="$CONFIG"); fi
  train+=(--config.train.workdir="$WORKDIR" "${OVERRIDES[@]}")
  ssh_workers all "bash ~/pretrain/launch/tpu_worker.sh start $(quoted "${train[@]}")"
}

trainer_status() {  # worker 0's: running, exited N or not running (or nothing: no project there)
  local out
  out=$(query running gcloud compute tpus tpu-vm ssh "$NAME" "${WHERE[@]}" --worker=0 \
    --command="bash ~/pretrain/launch/tpu_worker.sh status") || true
  echo "${out##*$'\n'}"
}

cmd_logs() { ssh_workers "$WORKER" "tail -n 100 -F ~/pretrain-run/train.log"; }
cmd_stop() { ssh_workers all "bash ~/pretrain/launch/tpu_worker.sh stop"; }
cmd_up() { cmd_create; cmd_install; cmd_run; }

cmd_status() {
  local state
  state=$(slice_state)
  echo "slice $NAME: $state"
  if [[ $state == READY ]]; then echo "trainer on worker 0: $(trainer_status)"; fi
}

# The trainer exits 0 when it finishes and also when SIGTERM (a preemption) stops it early, and a
# preempted slice may still read READY for a moment: so an exit is believed only when the same
# status is seen on two polls in a row with the slice READY.
cmd_watch() {
  local state status last=''
  while true; do
    state=$(slice_state)
    case $state in
      READY)
        status=$(trainer_status)
        case $status in
          running) last='' ;;
          exited*)
            if [[ $status == "$last" ]]; then
              note "trainer $status on worker 0"
              [[ $status == "exited 0" ]] && return 0
              note "not restarting a failing run; see: $0 logs --name=$NAME --zone=$ZONE"
              return 1
            fi
            last=$status ;;
          "not running") cmd_run ;;       # the workers were restarted (maintenance)
          *) cmd_install; cmd_run ;;      # the workers lost their disks
        esac ;;
      CREATING | STARTING | RESTARTING | REPAIRING) note "slice $NAME is $state" ;;
      *)
        note "slice $NAME is $state: recreating it; the run resumes from $WORKDIR"
        if [[ $state != NOT_FOUND ]]; then cmd_delete; fi
        cmd_up ;;
    esac
    if (( DRY_RUN )); then return 0; fi
    sleep "$POLL"
  done
}

# ---- flags

(( $# )) || usage_error "missing command"
COMMAND=$1
shift
case $COMMAND in
  up | watch | create | install | run | logs | stop | delete | status) ;;
  -h | --help) usage; exit 0 ;;
  *) usage_error "unknown command: $COMMAND" ;;
esac

join_values "--name --zone --project --accelerator-type --runtime-version --workdir --worker --poll" "$@"
for arg in "${ARGS[@]}"; do
  case $arg in
    --name=*) NAME=${arg#*=} ;;
    --zone=*) ZONE=${arg#*=} ;;
    --project=*) PROJECT=${arg#*=} ;;
    --accelerator-type=*) ACCELERATOR=${arg#*=} ;;
    --runtime-version=*) RUNTIME=${arg#*=} ;;
    --spot) SPOT=1 ;;
    --preemptible) PREEMPTIBLE=1 ;;
    --queued) QUEUED=1 ;;
    --config=*) CONFIG=${arg#*=} ;;
    --workdir=*) WORKDIR=${arg#*=} ;;
    --config.*=*) OVERRIDES+=("$arg") ;;
    --worker=*) WORKER=${arg#*=} ;;
    --poll=*) POLL=${arg#*=} ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    *) usage_error "unknown flag: $arg" ;;
  esac
done

[[ -n $NAME ]] || usage_error "missing --name=NAME"
[[ -n $ZONE ]] || usage_error "missing --zone=ZONE"
WHERE=(--zone="$ZONE")
if [[ -n $PROJECT ]]; then WHERE+=(--project="$PROJECT"); fi
if (( SPOT && PREEMPTIBLE )); then usage_error "--spot and --preemptible exclude each other"; fi
if (( QUEUED && PREEMPTIBLE )); then usage_error "--preemptible is not for --queued: use --spot"; fi
[[ $POLL =~ ^[0-9]+$ ]] || usage_error "--poll takes seconds: $POLL"
case $COMMAND in
  create | up | watch)
    [[ -n $ACCELERATOR ]] || usage_error "missing --accelerator-type=TYPE (e.g. v5p-128)"
    RUNTIME=${RUNTIME:-$(default_runtime "$ACCELERATOR")}
    [[ -n $RUNTIME ]] || usage_error "missing --runtime-version=VERSION for $ACCELERATOR" ;;
esac
case $COMMAND in
  run | up | watch)
    [[ -n $WORKDIR ]] || usage_error "missing --workdir=DIR (shared by the workers, for resuming)"
    if [[ $WORKDIR != /* && $WORKDIR != gs://* && $WORKDIR != s3://* ]]; then
      note "warning: --workdir=$WORKDIR is on each worker's own disk: a lost slice loses it"
    fi ;;
esac

"cmd_$COMMAND"
