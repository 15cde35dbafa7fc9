#!/usr/bin/env bash
# Runs on one TPU VM worker (started detached by launch/tpu_vm.sh run):
#   bash launch/worker_run.sh WORKDIR MAIN_ARGS...
# `python -m lidit_jax.main --workdir=WORKDIR MAIN_ARGS...` with its output in ~/lidit_run.log,
# copied to WORKDIR/logs/<hostname>.log every 60 s and at the end (gs:// or a shared folder),
# so the logs of every host sit next to the run's checkpoints. Exits with the trainer's status.
set -uo pipefail
workdir="${1:?WORKDIR}"
shift
log="$HOME/lidit_run.log"
target="$workdir/logs/$(hostname).log"

publish() {
  case "$workdir" in
    gs://*) gcloud storage cp --quiet "$log" "$target" > /dev/null 2>&1 || true ;;
    *) mkdir -p "$workdir/logs" && cp "$log" "$target" ;;
  esac
}

python3 -m lidit_jax.main --workdir="$workdir" "$@" > "$log" 2>&1 &
trainer=$!
# SIGTERM (a TPU maintenance event, `tpu_vm.sh cleanup`) goes to the trainer, which saves.
trap 'kill -TERM "$trainer" 2> /dev/null' TERM
while kill -0 "$trainer" 2> /dev/null; do
  publish
  sleep 60 &
  wait $! || true
done
wait "$trainer"
status=$?
echo "exit status $status" >> "$log"
publish
exit "$status"
