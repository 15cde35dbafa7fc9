"""Metrics out: metrics.jsonl, TensorBoard events, a progress bar, sample grids, throughput, MFU.

Everything lands under the workdir, local or `gs://` (lidit_jax.paths); only process 0 writes.
"""
import json
import os
import threading
import time

import fsspec
import jax
import numpy as np

from lidit_jax import hardware, paths

class JsonLines:
    """An append-only log of JSON lines at a local or remote path, written off the caller's thread.

    `write` only queues the lines; a background thread appends them, so a slow object store never
    holds up the train loop. `flush()` waits until everything queued is written, `close()` flushes
    and stops the thread; a failed write raises in the caller at its next write, flush or close.

    Object stores have no append (gcsfs's mode "a" silently replaces the object), so a remote log
    uploads only the new lines, as a part object, and composes it onto the log server side (GCS
    compose, gcsfs `merge`): O(new bytes) per write. Rewriting the whole object at every write,
    as this class used to, uploaded O(steps^2) bytes over a run. GCS accepts about one write per
    second to an object, so the thread gathers what arrives within REMOTE_MIN_INTERVAL seconds
    into one append. Lines already there (a resumed run) are kept.
    """

    REMOTE_MIN_INTERVAL = 2.0

    def __init__(self, path):
        self.path = paths.path(path)
        self.remote = paths.is_remote(self.path)
        self._min_interval = self.REMOTE_MIN_INTERVAL if self.remote else 0.0
        self._remote_exists = None  # Whether the remote log exists: looked up at the first write.
        self._changed = threading.Condition()
        self._pending = []  # Text queued and not yet taken by the thread.
        self._queued = self._written = 0  # Writes queued, and written, so far.
        self._urgent = self._closing = False
        self._error = None
        self._thread = threading.Thread(target=self._run, name=f"JsonLines {self.path.name}",
                                        daemon=True)
        self._thread.start()

    def write(self, records):
        text = "".join(json.dumps(record) + "\n" for record in records)
        with self._changed:
            self._raise_error()
            self._pending.append(text)
            self._queued += 1
            self._changed.notify_all()

    def flush(self):
        """Returns once every line queued so far is in the log."""
        with self._changed:
            self._urgent = True
            self._changed.notify_all()
            self._changed.wait_for(lambda: self._written == self._queued or self._error)
            self._raise_error()

    def close(self):
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        self._thread.join()
        self._raise_error()

    def _raise_error(self):
        if self._error is not None:
            raise RuntimeError(f"writing {self.path} failed") from self._error

    def _run(self):
        last_append = -float("inf")
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._pending or self._closing)
                if not self._pending:
                    return  # Closing, and everything is written.
                wait = last_append + self._min_interval - time.monotonic()
                if wait > 0 and not (self._urgent or self._closing):
                    self._changed.wait(wait)  # Gathers more lines; a flush or close cuts it short.
                    continue
                text, count = "".join(self._pending), len(self._pending)
                self._pending, self._urgent = [], False
            try:
                self._append(text)
            except Exception as error:  # noqa: BLE001 -- raised in the caller's thread.
                with self._changed:
                    self._error = error
                    self._changed.notify_all()
                return
            last_append = time.monotonic()
            with self._changed:
                self._written += count
                self._changed.notify_all()

    def _append(self, text):
        if not self.remote:
            with open(self.path, "a") as f:
                f.write(text)
            return
        fs, log = fsspec.core.url_to_fs(os.fspath(self.path))
        if self._remote_exists is None:
            self._remote_exists = fs.exists(log)
        if not self._remote_exists:
            fs.pipe_file(log, text.encode())
            self._remote_exists = True
            return
        part = f"{log}.part"
        fs.pipe_file(part, text.encode())
        fs.merge(log, [log, part])  # Server side: the log's old bytes are not sent again.
        fs.rm_file(part)


class MetricsWriter:
    """Writes one JSON object per logged step to metrics.jsonl and the same scalars to TensorBoard.

    Only process 0 writes, and never in the caller's thread: the JSON lines through `JsonLines`'
    background threads, TensorBoard events through tensorboardX's own, into WORKDIR/tensorboard
    (it writes `gs://` itself, with google-cloud-storage, uploading the whole event file at each
    of its flushes: every 120 s and at close). `close()` writes everything still queued.
    """

    def __init__(self, workdir, use_tensorboard=True):
        self.active = jax.process_index() == 0
        workdir = paths.path(workdir)
        self.tensorboard = None
        if self.active:
            workdir.mkdir(parents=True, exist_ok=True)
            self.metrics = JsonLines(workdir / "metrics.jsonl")
            self.record_ids = JsonLines(workdir / "record_ids.jsonl")
            if use_tensorboard:
                from tensorboardX import SummaryWriter
                self.tensorboard = SummaryWriter(str(workdir / "tensorboard"))

    def write_scalars(self, step, scalars):
        if not self.active:
            return
        record = {"step": int(step)}
        for key, value in scalars.items():
            value = float(np.asarray(value))
            record[key] = value if np.isfinite(value) else None
            if self.tensorboard is not None and np.isfinite(value):
                self.tensorboard.add_scalar(key, value, int(step))
        self.metrics.write([record])

    def write_record_ids(self, step, record_ids):
        if self.active:
            self.record_ids.write([{"step": int(step),
                                    "record_ids": [int(i) for i in record_ids]}])

    def write_image(self, step, tag, image_uint8):
        if self.active and self.tensorboard is not None:
            self.tensorboard.add_image(tag, image_uint8, int(step), dataformats="HWC")

    def close(self):
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.active:
            self.active = False
            try:
                self.metrics.close()
            finally:
                self.record_ids.close()


class StepTimer:
    """Where the wall time between two log steps goes, measured without syncing the device.

    JAX dispatches a jitted step and returns before the device has run it. The loop reads values
    back at a log step only for an earlier log step (or once the device has them ready), so it
    waits for the device only when the device runs a whole log interval behind. The loop marks
      data_ready()         the next batch is on the devices (time since the last mark: the wait
                           for the input pipeline, or for the prefetch queue);
      dispatched(output)   the step returned (host time to dispatch it); `output` is any array
                           the step produced, checked later without blocking;
      synced()             an earlier log step's values were read back (time the host was
                           blocked on the device: the device ran behind the host by that much);
      skip()               drop the time since the last mark (samples, checkpoints).
    host_device_overlap is the fraction of steps whose next batch was ready while the device was
    still running them (`is_ready()` polls, never blocks): 1 when data loading hides behind
    device work; 0 when the input pipeline is the bottleneck, or when something in the loop
    forces a sync every step.

    Create it outside any mesh context: on CPU it measures the peak FLOP/s (for MFU) on one
    local device right away.
    """

    def __init__(self):
        self.peak_flops = hardware.peak_flops()
        self._reset()
        self._mark = time.perf_counter()

    def _reset(self):
        self.data_seconds = self.dispatch_seconds = self.device_wait_seconds = 0.0
        self.steps = self.overlapped = self.observed = 0
        self._in_flight = None

    def _lap(self):
        now = time.perf_counter()
        elapsed, self._mark = now - self._mark, now
        return elapsed

    def data_ready(self):
        self.data_seconds += self._lap()
        if self._in_flight is not None:
            self.observed += 1
            self.overlapped += not self._in_flight.is_ready()
            self._in_flight = None

    def dispatched(self, output):
        self.dispatch_seconds += self._lap()
        self.steps += 1
        self._in_flight = output

    def synced(self):
        self.device_wait_seconds += self._lap()
        self._in_flight = None

    def skip(self):
        self._lap()

    def summary(self, examples_per_step, flops_per_step):
        """Throughput and time split since the last summary; resets the counters."""
        total = max(self.data_seconds + self.dispatch_seconds + self.device_wait_seconds, 1e-9)
        steps = max(self.steps, 1)
        out = {
            "images_per_sec": examples_per_step * self.steps / total,
            "step_time_sec": total / steps,
            "data_wait_fraction": self.data_seconds / total,
            "device_wait_fraction": self.device_wait_seconds / total,
            "host_device_overlap": self.overlapped / max(self.observed, 1),
        }
        if flops_per_step:
            per_device = flops_per_step * self.steps / total / jax.device_count()
            out["tflops_per_device"] = per_device / 1e12
            if self.peak_flops:
                out["mfu"] = per_device / self.peak_flops
        self._reset()
        return out
