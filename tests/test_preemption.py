"""Preemption at a checkpoint step and restores that every process agrees on (issue 26).

The contract: a run with `--config.checkpoint.every=1` that gets SIGTERM at any step exits 0 (or
`train.preemption_exit_code`) with that step saved, and the same command resumes it to the end
and exits 0. With every=1 each SIGTERM lands right after a checkpoint, which made the loop's final
forced save of that step raise StepAlreadyExistsError (exit 1, no requeue).

Two processes each read only their own shards (FSDP over all 8 devices of both), and Orbax
writes each process's shards into its own OCDBT folder (`state/ocdbt.process_<i>`): truncating
process 1's files damages the step for process 1 alone, a real damaged read on one host.
"""
import glob
import os
import re
import signal

import orbax.checkpoint as ocp
import pytest

from train_helpers import (TIMEOUT, pair_log, read_record_ids, run_main, start_main,
                           start_pair, wait_for_step)

pytestmark = pytest.mark.slow
STEPS = 12
EVERY_STEP = ("--config.checkpoint.every=1", f"--config.train.steps={STEPS}",
              "--config.logging.record_ids=True", "--config.train.sample_every=1000")


def saved_steps(workdir):
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    steps = list(manager.all_steps())
    manager.close()
    return steps


def terminate_after(process, workdir, step, signalled=None):
    """SIGTERM to `signalled` (default `process`) once `process` logged `step`; the last step
    logged then."""
    wait_for_step(process, workdir, step)
    os.kill((signalled or process).pid, signal.SIGTERM)
    return read_record_ids(workdir)[-1][0]


def test_sigterm_at_a_checkpoint_step_exits_0_and_the_same_command_resumes(tiny_args, tmp_path):
    workdir = str(tmp_path / "run")
    args = (*tiny_args, *EVERY_STEP)
    process = start_main(workdir, "train", *args)
    terminate_after(process, workdir, 2)
    code = process.wait(timeout=TIMEOUT)
    with open(f"{workdir}.log", errors="replace") as f:
        assert code == 0, f.read()[-3000:]
    stopped = read_record_ids(workdir)[-1][0]
    assert stopped < STEPS, "the run finished before SIGTERM; the test proves nothing"
    assert saved_steps(workdir)[-1] == stopped

    # Launchers whose orchestrator restarts only failed jobs ask for a non-zero status.
    process = start_main(workdir, "train", *args, "--config.train.preemption_exit_code=75")
    terminate_after(process, workdir, stopped + 1)
    assert process.wait(timeout=TIMEOUT) == 75
    stopped_again = read_record_ids(workdir)[-1][0]
    assert stopped < stopped_again < STEPS and saved_steps(workdir)[-1] == stopped_again

    result = run_main(workdir, "train", *args)  # Exits 0, or run_main fails the test.
    assert f"resumed from step {stopped_again}" in result.stderr
    assert saved_steps(workdir)[-1] == STEPS


def _run_pair(workdir, tiny_args, args, while_running=None):
    """Two processes of the same command to their end (`while_running(processes)` meanwhile);
    both must exit 0. Returns their logs."""
    processes = start_pair(workdir, tiny_args, *args)
    try:
        if while_running is not None:
            while_running(processes)
        codes = [p.wait(timeout=TIMEOUT) for p in processes]
    finally:
        for p in processes:
            p.kill()
    logs = [pair_log(workdir, i) for i in range(2)]
    assert codes == [0, 0], (logs[0][-3000:], logs[1][-3000:])
    return logs


@pytest.mark.multiprocess
def test_two_processes_preempted_at_a_checkpoint_resume_together_past_a_step_one_cannot_read(
        tiny_args, tmp_path):
    workdir = str(tmp_path / "pair")
    args = (*EVERY_STEP, "--config.mesh.data=1", "--config.mesh.fsdp=8")
    # ---- SIGTERM to one process at a checkpoint step: both save it and exit 0 --------------
    logs = _run_pair(workdir, tiny_args, args, lambda processes: terminate_after(
        processes[0], workdir, 2, signalled=processes[1]))
    stopped = [int(re.search(r"preemption: saving step (\d+)", log).group(1)) for log in logs]
    assert stopped[0] == stopped[1] < STEPS
    stopped = stopped[0]
    assert saved_steps(workdir)[-2:] == [stopped - 1, stopped]

    # ---- The newest step unreadable for process 1 only: both resume from the one before ----
    shards = glob.glob(os.path.join(workdir, "checkpoints", str(stopped), "state",
                                    "ocdbt.process_1", "d", "*"))
    assert shards
    for path in shards:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 3)
    logs = _run_pair(workdir, tiny_args, args)
    cannot_read = f"checkpoint step {stopped} in .* cannot be read by this process"
    assert re.search(cannot_read, logs[1]) and not re.search(cannot_read, logs[0])
    for log in logs:
        assert f"resumed from step {stopped - 1}" in log
        assert re.search(rf"step {stopped} in .* is damaged for process\(es\) \[1\]", log)
    assert saved_steps(workdir)[-1] == STEPS
