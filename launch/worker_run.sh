#!/usr/bin/env bash
# Runs on one TPU VM worker (started detached by launch/tpu_vm.sh run):
#   bash launch/worker_run.sh WORKDIR MAIN_ARGS...
# `python -m lidit_jax.main --workdir=WORKDIR MAIN_ARGS...` with its output in ~/lidit_run.log,
# copied to WORKDIR/logs/<hostname>.log every 60 s and at the end (gs:// or a shared folder),
# so the logs of every host sit next to the run's checkpoints. Exits with the trainer's status;
# the log's last line says whether that status is MAIN_ARGS' train.preemption_exit_code (the
# run saved and stopped for a maintenance event or a preemption: nothing restarts it here).
set -uo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"  # config_value.
workdir="${1:?WORKDIR}"
shift
log="$HOME/lidit_run.log"
target="$workdir/logs/$(hostname).log"
preempted="$(config_value train.preemption_exit_code "$@")"

publish() {
  case "$workdir" in
    gs://*) gcloud storage cp --quiet "$log" "$target" > /dev/null 2>&1 || true ;;
    *) mkdir -p "$workdir/logs" && cp "$log" "$target" ;;
  esac
}

python3 -m lidit_jax.main --workdir="$workdir" "$@" > "$log" 2>&1 &
trainer=$!
# SIGTERM (the VM shutting down, a `kill` of this script) goes to the trainer, which saves.
trap 'kill -TERM "$trainer" 2> /dev/null' TERM
while sleep 60; do publish; done &
publisher=$!
# A trapped signal cuts `wait` short: wait again until the trainer has exited (not a 60 s
# sleep, which once held the last log line back past a VM's shutdown), then take its status.
while kill -0 "$trainer" 2> /dev/null; do wait "$trainer"; done
wait "$trainer"
status=$?
kill "$publisher"
if [ -n "$preempted" ] && [ "$preempted" != 0 ] && [ "$status" = "$preempted" ]; then
  echo "exit status $status: preempted, checkpoint saved; resume with launch/tpu_vm.sh run and" \
    "the same arguments" >> "$log"
else
  echo "exit status $status" >> "$log"
fi
publish
exit "$status"
