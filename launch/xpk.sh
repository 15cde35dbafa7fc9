#!/usr/bin/env bash
# The same training command on a GKE TPU cluster through xpk (`pip install xpk`).
#
#   launch/xpk.sh [--dry-run] --cluster=CLUSTER --type=v5p-128 --workdir=gs://BUCKET/run \
#       [--num-slices=N] [--workload=NAME] [--project=P] [--zone=Z] [--image=BASE_IMAGE] \
#       -- --config=configs/lidit_1b.py [--config.a.b=v ...]
#
# xpk layers this checkout onto the pinned base image, starts one pod per TPU host (JobSet) and
# runs the command in each; JAX finds its peers from the pod environment GKE sets
# (TPU_WORKER_HOSTNAMES, MEGASCALE_*; lidit_jax.parallel.mesh.initialize_distributed).
# The trainer compiles with the generation's XLA TPU flags itself (lidit_jax/parallel/tpu_flags.py),
# whichever launcher starts it. With N > 1 slices, --config.mesh.dcn_data=N is added unless the
# arguments set a dcn axis.
# --dry-run prints the xpk command instead of running it and exits 0.
set -euo pipefail

# Pinned: a moving tag would change Python and pip's resolver under a running project.
IMAGE="python:3.11.9-slim-bookworm"
DRY_RUN=0
CLUSTER=""
TYPE=""
WORKDIR=""
NUM_SLICES=1
WORKLOAD="lidit-$(date +%m%d-%H%M%S)"
PROJECT=""
ZONE=""
MAIN_ARGS=()

usage() { sed -n '2,16p' "$0" >&2; exit 2; }
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"  # run: print the exact command, run it unless --dry-run.

while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --cluster=*) CLUSTER="${1#*=}" ;;
    --type=*) TYPE="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --num-slices=*) NUM_SLICES="${1#*=}" ;;
    --workload=*) WORKLOAD="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --image=*) IMAGE="${1#*=}" ;;
    --) shift; MAIN_ARGS=("$@"); break ;;
    -h|--help) usage ;;
    *) echo "error: unknown argument $1" >&2; usage ;;
  esac
  shift
done
[ -n "$CLUSTER" ] || { echo "error: --cluster=CLUSTER is required" >&2; exit 2; }
[ -n "$TYPE" ] || { echo "error: --type=TPU_TYPE is required, e.g. v5p-128" >&2; exit 2; }
[ -n "$WORKDIR" ] || { echo "error: --workdir=gs://BUCKET/run is required" >&2; exit 2; }
[ "${#MAIN_ARGS[@]}" -gt 0 ] || { echo "error: give the trainer's flags after --" >&2; exit 2; }

if [ "$NUM_SLICES" -gt 1 ] && ! printf '%s\n' "${MAIN_ARGS[@]}" | grep -q '^--config.mesh.dcn_'; then
  MAIN_ARGS+=("--config.mesh.dcn_data=$NUM_SLICES")
fi
main="python3 -m lidit_jax.main $(printf '%q ' "--workdir=$WORKDIR" "${MAIN_ARGS[@]}" | sed 's/ $//')"
command="pip install -q -e \".[tpu]\" && bash scripts/install_models.sh && $main"

xpk=(xpk workload create --cluster="$CLUSTER" --workload="$WORKLOAD" --tpu-type="$TYPE"
     --num-slices="$NUM_SLICES" --base-docker-image="$IMAGE" --script-dir=.
     --command="$command")
if [ -n "$PROJECT" ]; then xpk+=(--project="$PROJECT"); fi
if [ -n "$ZONE" ]; then xpk+=(--zone="$ZONE"); fi

cd "$(dirname "$0")/.."  # xpk layers the current directory (--script-dir=.) onto the image.
run "${xpk[@]}"
