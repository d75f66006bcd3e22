#!/usr/bin/env bash
# Continued pretraining on Kubernetes: a JobSet with one pod per TPU host (GKE TPU node pool)
# or per GPU node, every pod running the same `pretrain train`.
#
#   launch/k8s.sh COMMAND --accelerator=tpu|gpu [flags] [--config.a.b=V ...]
#
# Commands:
#   apply    render the manifest (launch/k8s/ACCELERATOR_jobset.yaml), write it to
#            $TMPDIR/NAME.jobset.yaml and `kubectl apply` it
#   render   print the rendered manifest
#   logs     follow pod 0's log
#   delete   delete the JobSet
#
# Flags (`--flag=VALUE` or `--flag VALUE`):
#   --accelerator=tpu|gpu      which manifest (required)
#   --name=NAME                the JobSet (default pretrain)
#   --image=IMAGE              the project with jax[tpu] or jax[cuda]: launch/k8s/Dockerfile
#   --workdir=DIR              config.train.workdir, the same for every pod and outliving them
#                              (a gs:// or s3:// bucket the pods may write, or a mounted volume): a restarted JobSet resumes from it
#   --config=FILE[:ARG]        the experiment, as for `pretrain train`
#   --config.a.b=V             any other config override, passed on
#   --hosts=N                  pods: TPU hosts in the slice, or GPU nodes (default 2)
#   --tpu-accelerator=LABEL    the node pool's cloud.google.com/gke-tpu-accelerator (default tpu-v5p-slice)
#   --tpu-topology=TOPOLOGY    the node pool's cloud.google.com/gke-tpu-topology (default 2x2x2)
#   --chips-per-host=N         google.com/tpu per pod (default 4)
#   --gpus-per-node=N          nvidia.com/gpu per pod (default 8)
#   --max-restarts=N           JobSet restarts after a preemption or failure (default 20)
#   --namespace=NAMESPACE      default: kubectl's
#   --dry-run                  print the manifest and every command instead of running them
#
# Example (a v5p-16 slice: 2 hosts of 4 chips, topology 2x2x2):
#   launch/k8s.sh apply --accelerator=tpu --image=us-docker.pkg.dev/me/repo/pretrain:tpu \
#     --config=configs/deepseek_coder_v2_lite.py --workdir=gs://my-bucket/runs/lite

set -euo pipefail
LAUNCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/common.sh
source "$LAUNCH/common.sh"

ACCELERATOR='' NAME=pretrain IMAGE='' WORKDIR='' CONFIG='' HOSTS=2 TPU_ACCELERATOR=tpu-v5p-slice
TPU_TOPOLOGY=2x2x2 CHIPS_PER_HOST=4 GPUS_PER_NODE=8 MAX_RESTARTS=20
OVERRIDES=()
KUBECTL=(kubectl)

# Each argument as a JSON string (valid YAML), in a flow sequence.
yaml_list() {
  local items=() item
  for item in "$@"; do
    item=${item//\\/\\\\}
    item=${item//\"/\\\"}
    items+=("\"${item//$'\n'/\\n}\"")
  done
  local IFS=,
  echo "[${items[*]}]"
}

render() {
  local manifest train=(--config.train.workdir="$WORKDIR")
  if [[ -n $CONFIG ]]; then train=(--config="$CONFIG" "${train[@]}"); fi
  manifest=$(<"$LAUNCH/k8s/${ACCELERATOR}_jobset.yaml")
  # Quoted replacements: taken literally (bash 5.2 would otherwise expand `&` in them).
  manifest=${manifest//__NAME__/"$NAME"}
  manifest=${manifest//__IMAGE__/"$IMAGE"}
  manifest=${manifest//__HOSTS__/"$HOSTS"}
  manifest=${manifest//__MAX_RESTARTS__/"$MAX_RESTARTS"}
  manifest=${manifest//__TPU_ACCELERATOR__/"$TPU_ACCELERATOR"}
  manifest=${manifest//__TPU_TOPOLOGY__/"$TPU_TOPOLOGY"}
  manifest=${manifest//__CHIPS_PER_HOST__/"$CHIPS_PER_HOST"}
  manifest=${manifest//__GPUS_PER_NODE__/"$GPUS_PER_NODE"}
  manifest=${manifest//__ARGS__/"$(yaml_list "${train[@]}" "${OVERRIDES[@]}")"}
  echo "$manifest"
}

cmd_apply() {
  local file="${TMPDIR:-/tmp}/$NAME.jobset.yaml" manifest
  manifest=$(render)
  if (( DRY_RUN )); then
    printf "cat > %s <<'EOF'\n%s\nEOF\n" "$(quoted "$file")" "$manifest"
  else
    echo "$manifest" >"$file"
  fi
  run "${KUBECTL[@]}" apply -f "$file"
}

cmd_render() { render; }
cmd_delete() { run "${KUBECTL[@]}" delete jobset "$NAME"; }
cmd_logs() {
  run "${KUBECTL[@]}" logs -f \
    -l "jobset.sigs.k8s.io/jobset-name=$NAME,batch.kubernetes.io/job-completion-index=0"
}

(( $# )) || usage_error "missing command"
COMMAND=$1
shift
case $COMMAND in
  apply | render | logs | delete) ;;
  -h | --help) usage; exit 0 ;;
  *) usage_error "unknown command: $COMMAND" ;;
esac

join_values "--accelerator --name --image --workdir --hosts --tpu-accelerator --tpu-topology \
--chips-per-host --gpus-per-node --max-restarts --namespace" "$@"
for arg in "${ARGS[@]}"; do
  case $arg in
    --accelerator=*) ACCELERATOR=${arg#*=} ;;
    --name=*) NAME=${arg#*=} ;;
    --image=*) IMAGE=${arg#*=} ;;
    --workdir=*) WORKDIR=${arg#*=} ;;
    --config=*) CONFIG=${arg#*=} ;;
    --config.*=*) OVERRIDES+=("$arg") ;;
    --hosts=*) HOSTS=${arg#*=} ;;
    --tpu-accelerator=*) TPU_ACCELERATOR=${arg#*=} ;;
    --tpu-topology=*) TPU_TOPOLOGY=${arg#*=} ;;
    --chips-per-host=*) CHIPS_PER_HOST=${arg#*=} ;;
    --gpus-per-node=*) GPUS_PER_NODE=${arg#*=} ;;
    --max-restarts=*) MAX_RESTARTS=${arg#*=} ;;
    --namespace=*) KUBECTL+=(--namespace="${arg#*=}") ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    *) usage_error "unknown flag: $arg" ;;
  esac
done

[[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || usage_error "--name=$NAME: lowercase letters, digits and -"
for flag in "--hosts=$HOSTS" "--chips-per-host=$CHIPS_PER_HOST" "--gpus-per-node=$GPUS_PER_NODE"; do
  [[ ${flag#*=} =~ ^[1-9][0-9]*$ ]] || usage_error "$flag: a positive integer, please"
done
[[ $MAX_RESTARTS =~ ^[0-9]+$ ]] || usage_error "--max-restarts=$MAX_RESTARTS: a number, please"
case $COMMAND in
  apply | render)
    [[ $ACCELERATOR == tpu || $ACCELERATOR == gpu ]] || usage_error "missing --accelerator=tpu|gpu"
    [[ -n $IMAGE ]] || usage_error "missing --image=IMAGE (built from launch/k8s/Dockerfile)"
    [[ -n $WORKDIR ]] || usage_error "missing --workdir=DIR (shared by the pods, for resuming)" ;;
esac

"cmd_$COMMAND"
