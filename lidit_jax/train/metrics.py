"""Metrics out: metrics.jsonl, TensorBoard events, a progress bar, sample grids, throughput, MFU.

Everything lands under the workdir, local or `gs://` (lidit_jax.paths); only process 0 writes.
"""
import io
import json
import time

import jax
import numpy as np
from PIL import Image

from lidit_jax import paths

# Peak dense bf16 FLOP/s per device, by jax `device_kind`. CPU is measured once instead.
PEAK_FLOPS_PER_DEVICE = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
}

_measured_cpu_peak = None


def measure_cpu_peak_flops(size=1024, repeats=5):
    """FLOP/s of a float32 matmul on one CPU device (the best of a few), measured once."""
    global _measured_cpu_peak
    if _measured_cpu_peak is None:
        a = jax.device_put(np.ones((size, size), np.float32), jax.local_devices(backend="cpu")[0])
        matmul = jax.jit(lambda x: x @ x)
        matmul(a).block_until_ready()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            matmul(a).block_until_ready()
            best = min(best, time.perf_counter() - start)
        _measured_cpu_peak = 2 * size**3 / best
    return _measured_cpu_peak


def peak_flops_per_device(device=None):
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return measure_cpu_peak_flops()
    for kind, peak in PEAK_FLOPS_PER_DEVICE.items():
        if device.device_kind.startswith(kind):
            return peak
    return None


class JsonLines:
    """An append-only log of JSON lines at a local or remote path.

    Object stores have no append (gcsfs's mode "a" silently replaces the object), so a remote
    log keeps its text and uploads it whole on every write; a local one appends. Lines already
    there (a resumed run) are kept.
    """

    def __init__(self, path):
        self.path = paths.path(path)
        self.remote = paths.is_remote(self.path)
        self.text = self.path.read_text() if self.remote and self.path.exists() else ""

    def write(self, records):
        lines = "".join(json.dumps(record) + "\n" for record in records)
        if self.remote:
            self.text += lines
            self.path.write_text(self.text)
        else:
            with open(self.path, "a") as f:
                f.write(lines)


class MetricsWriter:
    """Writes one JSON object per logged step to metrics.jsonl and the same scalars to TensorBoard.

    Only process 0 writes. TensorBoard events go to WORKDIR/tensorboard through tensorboardX,
    which writes `gs://` itself (google-cloud-storage; the whole event file is uploaded at each
    flush, every 120 s and at close).
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


def image_grid(images, columns=None):
    """[n, H, W, C] float in [-1, 1] -> one uint8 [rows*H, columns*W, 3] grid."""
    images = np.asarray(images, np.float32)
    n, height, width, channels = images.shape
    if channels == 1:
        images = np.repeat(images, 3, axis=-1)
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / columns))
    grid = np.zeros((rows * height, columns * width, 3), np.uint8)
    pixels = np.clip((images[..., :3] + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        grid[r * height:(r + 1) * height, c * width:(c + 1) * width] = pixels[i]
    return grid


def save_png(path, image_uint8, upscale=1):
    """Writes a PNG to a local or remote path."""
    image = Image.fromarray(image_uint8)
    if upscale > 1:
        image = image.resize((image.width * upscale, image.height * upscale), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    path = paths.path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())


class StepTimer:
    """Where the wall time between two log steps goes, measured without syncing the device.

    JAX dispatches a jitted step and returns before the device has run it, so the loop only
    waits for the device where it reads values back: at log steps. The loop marks
      data_ready()         the next batch is on the host (time since the last mark: data wait);
      dispatched(output)   the step returned (host time to dispatch it); `output` is any array
                           the step produced, checked later without blocking;
      synced()             the log step's device_get returned (time the host was blocked on the
                           device: the device ran behind the host by that much);
      skip()               drop the time since the last mark (samples, checkpoints).
    host_device_overlap is the fraction of steps whose next batch was ready while the device was
    still running them (`is_ready()` polls, never blocks): 1 when data loading hides behind
    device work; 0 when the input pipeline is the bottleneck, or when something in the loop
    forces a sync every step.

    Create it outside any mesh context: on CPU it measures the peak FLOP/s (for MFU) on one
    local device right away.
    """

    def __init__(self):
        self.peak_flops = peak_flops_per_device()
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
