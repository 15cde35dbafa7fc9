#!/usr/bin/env bash
# TPU VM launcher: create a TPU VM (single- or multi-host), install lidit_jax on every worker,
# and run the same command on all workers (JAX finds its peers through the TPU metadata server,
# so lidit_jax.parallel.mesh.initialize_distributed needs no addresses).
#
#   launch/tpu_vm.sh create  NAME ZONE ACCELERATOR [VERSION]   e.g. lidit v5p-128 us-east5-a
#   launch/tpu_vm.sh setup   NAME ZONE                          copy this checkout, pip install
#   launch/tpu_vm.sh run     NAME ZONE -- ARGS...               python -m lidit_jax.main ARGS
#   launch/tpu_vm.sh delete  NAME ZONE
#
# Example (LI-DiT-1B on a v5p-128 slice):
#   launch/tpu_vm.sh run lidit us-east5-a -- --config=configs/lidit_1b.py \
#       --workdir=gs://BUCKET/lidit_1b --config.text.llms.llama3.path=/models/llama3 ...
# Multi-slice: create the slices as a queued resource with --node-count and pass
# --config.mesh.dcn_data=<slices>.
set -euo pipefail
action="${1:?create|setup|run|delete}"; name="${2:?TPU name}"; zone="${3:?zone}"
shift 3
ssh_all() { gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="$1"; }
case "$action" in
  create)
    accelerator="${1:?accelerator type, e.g. v5p-128}"; version="${2:-v2-alpha-tpuv5}"
    gcloud compute tpus tpu-vm create "$name" --zone="$zone" --accelerator-type="$accelerator" \
      --version="$version" ;;
  setup)
    tar czf /tmp/lidit_jax.tgz --exclude=.git --exclude='workdir*' .
    gcloud compute tpus tpu-vm scp /tmp/lidit_jax.tgz "$name":~/ --zone="$zone" --worker=all
    ssh_all "mkdir -p lidit_jax && tar xzf lidit_jax.tgz -C lidit_jax && cd lidit_jax && \
      python3 -m pip install -e '.[tpu]' && bash scripts/install_models.sh" ;;
  run)
    [ "${1:-}" = "--" ] && shift
    ssh_all "cd lidit_jax && python3 -m lidit_jax.main $(printf '%q ' "$@") 2>&1 | tee -a run.log" ;;
  delete)
    gcloud compute tpus tpu-vm delete "$name" --zone="$zone" --quiet ;;
  *) echo "unknown action $action: create|setup|run|delete" >&2; exit 2 ;;
esac
