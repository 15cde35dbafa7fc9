"""`initialize_distributed`: which environments start JAX's multi-controller runtime.

Each cluster type is faked the way JAX itself reads it: environment variables (explicit
coordinator, SLURM, GKE) or the GCE metadata server (a plain TPU VM slice, served here by a
local HTTP server at GCE_METADATA_IP). What is tested is the decision and the arguments handed to
`jax.distributed.initialize`, which is replaced by a recorder: a real start needs the other
processes; the two-process tests at the end start real ones.
"""
import http.server
import os
import re
import signal
import subprocess
import threading
import time

import jax
import orbax.checkpoint as ocp
import pytest
from jax._src.clusters import cloud_tpu_cluster

from lidit_jax.parallel import mesh as mesh_lib
from train_helpers import TIMEOUT, pair_log, read_record_ids, start_pair, wait_for_step

CLUSTER_VARIABLES = (
    "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID",
    "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID", "TPU_WORKER_HOSTNAMES",
    "TPU_PROCESS_ADDRESSES", "TPU_WORKER_ID", "MEGASCALE_NUM_SLICES", "MEGASCALE_SLICE_ID",
    "MEGASCALE_COORDINATOR_ADDRESS", "TPU_SKIP_MDS_QUERY", "GCE_METADATA_IP",
    "OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST")


@pytest.fixture
def started(monkeypatch):
    """No cluster variables; jax.distributed.initialize records its arguments instead."""
    for name in CLUSTER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", False)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    return calls


def test_single_host_without_a_cluster_does_not_initialize(started):
    assert mesh_lib.detect_cluster() == (None, 1)
    assert mesh_lib.initialize_distributed("auto") is False
    assert started == []


def test_explicit_coordinator(started, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    assert mesh_lib.detect_cluster() == ("JAX_COORDINATOR_ADDRESS", 2)
    assert mesh_lib.initialize_distributed("auto") is True
    assert started == [{"num_processes": 2, "process_id": 1, "heartbeat_timeout_seconds": 100}]


def _slurm(monkeypatch, tasks):
    for name, value in {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[001-002]",
                        "SLURM_NTASKS": str(tasks), "SLURM_PROCID": "9",
                        "SLURM_LOCALID": "1"}.items():
        monkeypatch.setenv(name, value)


def test_slurm_multi_task_initializes(started, monkeypatch):
    _slurm(monkeypatch, tasks=16)  # 2 nodes x 8 GPUs, one task per GPU.
    assert mesh_lib.detect_cluster() == ("slurm", 16)
    assert mesh_lib.initialize_distributed("auto") is True
    # JAX detects SLURM again and pins SLURM_LOCALID's GPU.
    assert started == [{"heartbeat_timeout_seconds": 100}]


def test_slurm_single_task_stays_single_process(started, monkeypatch):
    _slurm(monkeypatch, tasks=1)
    assert mesh_lib.detect_cluster() == ("slurm", 1)
    assert mesh_lib.initialize_distributed("auto") is False
    assert mesh_lib.initialize_distributed("on") is True  # `on` starts it regardless.


class _Metadata(http.server.BaseHTTPRequestHandler):
    """The GCE metadata server of a TPU VM: worker number, worker endpoints, tpu-env."""
    attributes = {}

    def do_GET(self):  # noqa: N802 - the http.server API.
        prefix = "/computeMetadata/v1/instance/attributes/"
        key = self.path[len(prefix):] if self.path.startswith(prefix) else None
        ok = key in self.attributes and self.headers.get("Metadata-Flavor") == "Google"
        body = self.attributes[key].encode() if ok else b"not found"
        self.send_response(200 if ok else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        del args


@pytest.fixture
def tpu_vm(started, monkeypatch):
    """A Cloud TPU VM (what JAX sets when it finds TPU chips) with a local metadata server."""
    server = http.server.HTTPServer(("127.0.0.1", 0), _Metadata)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
    monkeypatch.setenv("GCE_METADATA_IP", f"127.0.0.1:{server.server_port}")
    yield _Metadata.attributes
    server.shutdown()
    _Metadata.attributes = {}


def test_tpu_vm_slice_from_the_metadata_server(tpu_vm, started):
    # `gcloud compute tpus tpu-vm` sets no TPU_WORKER_HOSTNAMES: only the metadata says 4 hosts.
    tpu_vm.update({"agent-worker-number": "3", "tpu-env": "ACCELERATOR_TYPE: 'v5p-32'\n",
                   "worker-network-endpoints": "h0:1:10.0.0.2,h1:1:10.0.0.3,h2:1:10.0.0.4,"
                                               "h3:1:10.0.0.5"})
    assert mesh_lib.detect_cluster() == ("gcetpu", 4)
    assert mesh_lib.initialize_distributed("auto") is True


def test_single_host_tpu_vm_stays_single_process(tpu_vm, started):
    tpu_vm.update({"agent-worker-number": "0", "tpu-env": "ACCELERATOR_TYPE: 'v5litepod-8'\n",
                   "worker-network-endpoints": "h0:1:10.0.0.2"})
    assert mesh_lib.detect_cluster() == ("gcetpu", 1)
    assert mesh_lib.initialize_distributed("auto") is False


def test_gke_tpu_multislice(tpu_vm, started, monkeypatch):
    # A GKE pod's metadata server knows no TPU worker attributes (404): the TPU environment
    # variables GKE's webhook sets are what JAX finds. 2 slices x 4 hosts.
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w-0,w-1,w-2,w-3")
    monkeypatch.setenv("TPU_WORKER_ID", "2")
    monkeypatch.setenv("MEGASCALE_NUM_SLICES", "2")
    assert mesh_lib.detect_cluster() == ("gketpu", 8)
    assert mesh_lib.initialize_distributed("auto") is True


def test_off_and_bad_settings(started, monkeypatch):
    _slurm(monkeypatch, tasks=16)
    assert mesh_lib.initialize_distributed("off") is False
    assert started == []
    with pytest.raises(ValueError, match="distributed='maybe'"):
        mesh_lib.initialize_distributed("maybe")
    with pytest.raises(ValueError, match="distributed_heartbeat_s=0"):
        mesh_lib.initialize_distributed("auto", heartbeat_s=0)


def test_on_without_a_cluster_names_the_fix(started):
    with pytest.raises(RuntimeError, match="JAX_COORDINATOR_ADDRESS"):
        mesh_lib.initialize_distributed("on")


# ---- Two real processes x 4 CPU devices: preemption and a dead peer ---------------------------
@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigterm_to_one_process_stops_both_at_the_same_step_after_a_checkpoint(tiny_args,
                                                                               tmp_path):
    workdir = str(tmp_path / "pair")
    processes = start_pair(workdir, tiny_args, "--config.train.steps=1000",
                            "--config.checkpoint.every=1000", "--config.train.log_every=1")
    try:
        wait_for_step(processes[0], workdir, 2)
        os.kill(processes[1].pid, signal.SIGTERM)  # Only one of them is told.
        codes = [p.wait(timeout=TIMEOUT) for p in processes]
    finally:
        for p in processes:
            p.kill()
    assert codes == [0, 0], (pair_log(workdir, 0)[-3000:], pair_log(workdir, 1)[-3000:])
    saved = [int(re.search(r"preemption: saving step (\d+)", pair_log(workdir, i)).group(1))
             for i in range(2)]
    assert saved[0] == saved[1] and 2 <= saved[0] < 1000
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    assert list(manager.all_steps()) == [saved[0]]
    manager.close()
    assert read_record_ids(workdir)[-1][0] == saved[0]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigkill_to_one_process_makes_the_other_exit_non_zero_within_120_s(tiny_args, tmp_path):
    workdir = str(tmp_path / "pair")
    # A 20 s heartbeat: the survivor exits through the broken collective or, failing that, the
    # heartbeat, well inside the 120 s either way (JAX's default 100 s made this test wait).
    processes = start_pair(workdir, tiny_args, "--config.train.steps=1000",
                            "--config.checkpoint.every=1000", "--config.distributed_heartbeat_s=20")
    try:
        wait_for_step(processes[0], workdir, 2)
        os.kill(processes[1].pid, signal.SIGKILL)
        killed_at = time.monotonic()
        try:
            code = processes[0].wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail("the surviving process still runs 120 s after its peer died:\n"
                        + pair_log(workdir, 0)[-3000:])
    finally:
        for p in processes:
            p.kill()
    assert code != 0
    print(f"survivor exited {code} after {time.monotonic() - killed_at:.1f} s")
