#!/usr/bin/env bash
# Cloud TPU VMs through queued resources: one slice or several (multislice), one process per host.
#
#   launch/tpu_vm.sh [--dry-run] ACTION --name=NAME --zone=ZONE [options] [-- MAIN_ARGS...]
#
#   create   --type=v5p-32 [--node-count=N] [--runtime=VERSION] [--spot]
#            a queued resource of N slices (N > 1: multislice, nodes NAME-0 .. NAME-<N-1>);
#            the runtime version follows the generation (v4, v5e, v5p, v6e) unless --runtime.
#   setup    copy this checkout to every worker of every node and `pip install -e .[tpu]`.
#   run      --workdir=gs://BUCKET/run -- --config=configs/lidit_1b.py [--config.a.b=v ...]
#            detached (nohup) on every worker (--node=all --worker=all): launch/worker_run.sh
#            runs `python -m lidit_jax.main` and copies its log to WORKDIR/logs/ every 60 s.
#            With N > 1 slices, --config.mesh.dcn_data=N is added unless MAIN_ARGS set it;
#            --config.train.preemption_exit_code=42 too: a run stopped by a maintenance event
#            or a preemption saves, exits 42 and says so in its log; nothing restarts it. `run`
#            with the same arguments resumes it (a preempted spot queued resource stays
#            SUSPENDED: delete, create and setup first).
#   status   the queued resource's state and the lidit_jax processes on every worker.
#   logs     [--worker=0] the tail of that worker's run log.
#   cleanup  kill whatever holds the TPU chips on every worker (a stale run keeps them busy
#            and the next one fails with "TPU in use"), remove the libtpu lock file.
#   delete   delete the queued resource and its TPU VMs.
#
# --dry-run prints every command instead of running it and exits 0. JAX finds the peers
# itself (the TPU VM metadata server; lidit_jax.parallel.mesh.initialize_distributed).
set -euo pipefail

DRY_RUN=0
ACTION=""
NAME=""
ZONE=""
TYPE=""
NODE_COUNT=1
RUNTIME=""
SPOT=0
WORKDIR=""
WORKER=0
MAIN_ARGS=()

usage() { sed -n '2,25p' "$0" >&2; exit 2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --name=*) NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --type=*) TYPE="${1#*=}" ;;
    --node-count=*) NODE_COUNT="${1#*=}" ;;
    --runtime=*) RUNTIME="${1#*=}" ;;
    --spot) SPOT=1 ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --worker=*) WORKER="${1#*=}" ;;
    --) shift; MAIN_ARGS=("$@"); break ;;
    -h|--help) usage ;;
    -*) echo "error: unknown option $1" >&2; usage ;;
    *) [ -z "$ACTION" ] || { echo "error: two actions: $ACTION, $1" >&2; usage; }
       ACTION="$1" ;;
  esac
  shift
done
[ -n "$ACTION" ] || usage
[ -n "$NAME" ] || { echo "error: --name=NAME is required" >&2; exit 2; }
[ -n "$ZONE" ] || { echo "error: --zone=ZONE is required" >&2; exit 2; }

# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"  # run, has_prefix, PREEMPTION_EXIT_CODE.

# The TPU VM software version per generation (cloud.google.com/tpu/docs/runtimes).
runtime_for() {
  case "$1" in
    v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-*|v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) echo "error: no runtime version known for --type=$1; pass --runtime=VERSION" >&2
       return 2 ;;
  esac
}

# One command on every worker of every node of the queued resource.
ssh_all() {
  run gcloud alpha compute tpus queued-resources ssh "$NAME" --zone="$ZONE" --node=all \
    --worker=all --command="$1"
}

case "$ACTION" in
  create)
    [ -n "$TYPE" ] || { echo "error: create needs --type, e.g. --type=v5p-32" >&2; exit 2; }
    version="${RUNTIME:-$(runtime_for "$TYPE")}"
    nodes=(--node-id="$NAME")
    if [ "$NODE_COUNT" -gt 1 ]; then nodes=(--node-count="$NODE_COUNT" --node-prefix="$NAME"); fi
    spot=()
    if [ "$SPOT" = 1 ]; then spot=(--spot); fi
    run gcloud compute tpus queued-resources create "$NAME" --zone="$ZONE" \
      --accelerator-type="$TYPE" --runtime-version="$version" "${nodes[@]}" "${spot[@]}" ;;
  setup)
    run tar czf /tmp/lidit_jax.tgz -C "$(cd "$(dirname "$0")/.." && pwd)" --exclude=.git \
      --exclude='workdir*' .
    run gcloud alpha compute tpus queued-resources scp /tmp/lidit_jax.tgz "$NAME:~/" \
      --zone="$ZONE" --node=all --worker=all
    ssh_all "mkdir -p ~/lidit_jax && tar xzf ~/lidit_jax.tgz -C ~/lidit_jax && cd ~/lidit_jax && python3 -m pip install -q -e \".[tpu]\" && bash scripts/install_models.sh" ;;
  run)
    [ -n "$WORKDIR" ] || { echo "error: run needs --workdir=gs://BUCKET/run" >&2; exit 2; }
    [ "${#MAIN_ARGS[@]}" -gt 0 ] || { echo "error: run needs -- --config=CONFIG [...]" >&2; exit 2; }
    if [ "$NODE_COUNT" -gt 1 ] && ! has_prefix --config.mesh.dcn_ "${MAIN_ARGS[@]}"; then
      MAIN_ARGS+=("--config.mesh.dcn_data=$NODE_COUNT")
    fi
    # Nothing restarts a queued resource's run: the code only marks a preempted run in the
    # worker's log (worker_run.sh), as one to start again with the same arguments.
    if ! has_prefix --config.train.preemption_exit_code= "${MAIN_ARGS[@]}"; then
      MAIN_ARGS+=("--config.train.preemption_exit_code=$PREEMPTION_EXIT_CODE")
    fi
    remote="cd ~/lidit_jax && nohup bash launch/worker_run.sh $(printf '%q ' "$WORKDIR" "${MAIN_ARGS[@]}")> /dev/null 2>&1 < /dev/null &"
    ssh_all "$remote" ;;
  status)
    run gcloud compute tpus queued-resources describe "$NAME" --zone="$ZONE" \
      --format='value(state.state)'
    ssh_all "hostname; pgrep -af lidit_jax.main || echo \"no lidit_jax process\"" ;;
  logs)
    run gcloud alpha compute tpus queued-resources ssh "$NAME" --zone="$ZONE" --node=0 \
      --worker="$WORKER" --command="tail -n 100 ~/lidit_run.log" ;;
  cleanup)
    ssh_all "pids=\$(sudo lsof -t /dev/accel* /dev/vfio/* 2>/dev/null | sort -u); if [ -n \"\$pids\" ]; then sudo kill -9 \$pids; fi; sudo rm -f /tmp/libtpu_lockfile" ;;
  delete)
    run gcloud compute tpus queued-resources delete "$NAME" --zone="$ZONE" --force --quiet ;;
  *) echo "error: unknown action $ACTION" >&2; usage ;;
esac
