#!/usr/bin/env bash
# The same training command on a GKE TPU cluster through xpk (`pip install xpk`).
#
#   launch/xpk.sh [--dry-run] --cluster=CLUSTER --type=v5p-128 --workdir=gs://BUCKET/run \
#       --image=REGISTRY/lidit_jax [--num-slices=N] [--workload=NAME] [--project=P] [--zone=Z] \
#       [--max-restarts=10] -- --config=configs/lidit_1b.py [--config.a.b=v ...]
#
# Builds launch/Dockerfile (this checkout, its TPU extra and the offline models, installed once)
# as IMAGE:WORKLOAD and pushes it: a restarted JobSet pulls the same code however often IMAGE
# is pushed again. xpk starts one pod per TPU host (JobSet) on that image, and each pod only
# execs the trainer: exec, so the SIGTERM of a preemption reaches Python (xpk's wrapper passes
# it to its command's process), which saves and exits with train.preemption_exit_code (42 unless
# the arguments set it); the JobSet restarts on that code (up to --max-restarts times) and the
# run resumes from its checkpoint. Pods get 300 s from SIGTERM to that exit (xpk's default: 30).
# JAX finds its peers from the pod environment GKE sets (TPU_WORKER_HOSTNAMES, MEGASCALE_*;
# lidit_jax.parallel.mesh.initialize_distributed); the trainer compiles with the generation's
# XLA TPU flags itself (lidit_jax/parallel/tpu_flags.py). With N > 1 slices,
# --config.mesh.dcn_data=N is added unless the arguments set a dcn axis.
# --dry-run prints the docker and xpk commands instead of running them and exits 0.
set -euo pipefail

DRY_RUN=0
CLUSTER=""
TYPE=""
WORKDIR=""
IMAGE=""
NUM_SLICES=1
WORKLOAD="lidit-$(date +%m%d-%H%M%S)"
PROJECT=""
ZONE=""
# Every preemption uses one restart, and so does a crash that kills a pod (exit 128+signal).
MAX_RESTARTS=10
MAIN_ARGS=()

usage() { sed -n '2,19p' "$0" >&2; exit 2; }
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"  # run, has_prefix, config_value, PREEMPTION_EXIT_CODE.

while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --cluster=*) CLUSTER="${1#*=}" ;;
    --type=*) TYPE="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --image=*) IMAGE="${1#*=}" ;;
    --num-slices=*) NUM_SLICES="${1#*=}" ;;
    --workload=*) WORKLOAD="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --max-restarts=*) MAX_RESTARTS="${1#*=}" ;;
    --) shift; MAIN_ARGS=("$@"); break ;;
    -h|--help) usage ;;
    *) echo "error: unknown argument $1" >&2; usage ;;
  esac
  shift
done
[ -n "$CLUSTER" ] || { echo "error: --cluster=CLUSTER is required" >&2; exit 2; }
[ -n "$TYPE" ] || { echo "error: --type=TPU_TYPE is required, e.g. v5p-128" >&2; exit 2; }
[ -n "$WORKDIR" ] || { echo "error: --workdir=gs://BUCKET/run is required" >&2; exit 2; }
[ -n "$IMAGE" ] || { echo "error: --image=REGISTRY/lidit_jax is required (where the pods pull" \
  "the image from, e.g. us-docker.pkg.dev/PROJECT/REPO/lidit_jax)" >&2; exit 2; }
if [[ ${IMAGE##*/} == *:* ]]; then
  echo "error: --image=$IMAGE has a tag; give the repository alone (the tag is the workload" \
    "name)" >&2
  exit 2
fi
[ "${#MAIN_ARGS[@]}" -gt 0 ] || { echo "error: give the trainer's flags after --" >&2; exit 2; }

if [ "$NUM_SLICES" -gt 1 ] && ! has_prefix --config.mesh.dcn_ "${MAIN_ARGS[@]}"; then
  MAIN_ARGS+=("--config.mesh.dcn_data=$NUM_SLICES")
fi
if ! has_prefix --config.train.preemption_exit_code= "${MAIN_ARGS[@]}"; then
  MAIN_ARGS+=("--config.train.preemption_exit_code=$PREEMPTION_EXIT_CODE")
fi
code="$(config_value train.preemption_exit_code "${MAIN_ARGS[@]}")"
if [ "$code" = 0 ]; then
  echo "error: --config.train.preemption_exit_code=0 ends the JobSet as complete when it is" \
    "preempted; drop it (the launcher sets $PREEMPTION_EXIT_CODE) or give a non-zero code" >&2
  exit 2
fi

image="$IMAGE:$WORKLOAD"
command="exec python3 -m lidit_jax.main $(printf '%q ' "--workdir=$WORKDIR" "${MAIN_ARGS[@]}" \
  | sed 's/ $//')"
xpk=(xpk workload create --cluster="$CLUSTER" --workload="$WORKLOAD" --tpu-type="$TYPE"
     --num-slices="$NUM_SLICES" --docker-image="$image" --command="$command"
     --max-restarts="$MAX_RESTARTS" --restart-on-exit-codes="$code"
     --termination-grace-period-seconds=300)
if [ -n "$PROJECT" ]; then xpk+=(--project="$PROJECT"); fi
if [ -n "$ZONE" ]; then xpk+=(--zone="$ZONE"); fi

cd "$(dirname "$0")/.."  # The build context: the checkout's root.
# TPU hosts are x86-64, whichever machine builds the image.
run docker build --platform=linux/amd64 --file=launch/Dockerfile --tag="$image" .
run docker push "$image"
run "${xpk[@]}"
