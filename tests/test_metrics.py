"""train/metrics.py: the step timer's host-device overlap, and logs written off the caller's thread.

Remote logs (appended by GCS compose) are tested against the emulator in test_gcs.py.
"""
import json
import os
import threading
import time

import jax
import jax.numpy as jnp
import pytest

from lidit_jax.train import metrics

DATA_SECONDS = 0.005  # The slow fake data source; one device step takes several times longer.


@jax.jit
def _device_step(x):
    for _ in range(6):
        x = jnp.tanh(x @ x)
    return x


def _loop(force_sync, steps=8, log_every=4):
    """The train loop's shape: fetch, dispatch, and read back only at log steps."""
    timer = metrics.StepTimer()
    x = jax.device_put(jnp.full((768, 768), 1e-3), jax.devices()[0])
    _device_step(x).block_until_ready()  # Compiled before timing.
    summaries = []
    for step in range(1, steps + 1):
        time.sleep(DATA_SECONDS)
        timer.data_ready()
        x = _device_step(x)
        timer.dispatched(x)
        if force_sync:
            x.block_until_ready()  # What reading a flag or loss every step costs.
        if step % log_every == 0:
            jax.device_get(x)
            timer.synced()
            summaries.append(timer.summary(1, None))
    return summaries


def test_step_timer_shows_no_forced_sync_between_log_steps():
    free = _loop(force_sync=False)
    # The batches were ready while the device still ran the previous step: the host ran ahead,
    # and the wait for the device lands at the log steps. (At least 3 of 4 per interval: on a
    # loaded CI machine a 5 ms sleep can oversleep one device step.)
    assert all(s["host_device_overlap"] >= 0.75 for s in free), free
    assert all(s["device_wait_fraction"] > 0 for s in free), free
    # The measure sees a per-step sync: then no batch is ever prepared under device work.
    forced = _loop(force_sync=True)
    assert [s["host_device_overlap"] for s in forced] == [0.0, 0.0]


def test_log_writes_return_before_the_file_is_written_and_close_writes_them(tmp_path):
    # A named pipe as the log: opening it to append blocks until a reader opens it. A write in
    # the caller's thread would block until the reader below starts, after 5 s.
    path = tmp_path / "metrics.jsonl"
    os.mkfifo(path)
    lines = []
    reader = threading.Timer(5.0, lambda: lines.extend(path.read_text().splitlines()))
    reader.start()
    log = metrics.JsonLines(path)
    start = time.perf_counter()
    log.write([{"step": 1}, {"step": 2}])
    log.write([{"step": 3}])
    assert time.perf_counter() - start < 1.0
    log.close()  # Waits for the writer thread, which waits for the reader.
    reader.join()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]


def test_local_log_keeps_a_resumed_runs_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1}) + "\n")
    log = metrics.JsonLines(path)
    log.write([{"step": 2}])
    log.flush()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    log.write([{"step": 3}])
    log.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]


def test_a_failed_log_write_raises_in_the_callers_thread(tmp_path):
    log = metrics.JsonLines(tmp_path / "missing_folder" / "metrics.jsonl")
    log.write([{"step": 1}])
    with pytest.raises(RuntimeError, match="missing_folder/metrics.jsonl") as error:
        log.flush()
    assert isinstance(error.value.__cause__, FileNotFoundError)
    with pytest.raises(RuntimeError):
        log.close()
