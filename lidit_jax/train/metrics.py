"""Metrics out: metrics.jsonl, TensorBoard events, a progress bar, sample grids, throughput, MFU."""
import json
import os
import time

import jax
import numpy as np
from PIL import Image

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


class MetricsWriter:
    """Writes one JSON object per logged step to metrics.jsonl and the same scalars to TensorBoard.

    Only process 0 writes.
    """

    def __init__(self, workdir, use_tensorboard=True):
        self.active = jax.process_index() == 0
        self.workdir = workdir
        self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
        self.tensorboard = None
        if self.active:
            os.makedirs(workdir, exist_ok=True)
            if use_tensorboard:
                from tensorboardX import SummaryWriter
                self.tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write_scalars(self, step, scalars):
        if not self.active:
            return
        record = {"step": int(step)}
        for key, value in scalars.items():
            value = float(np.asarray(value))
            record[key] = value if np.isfinite(value) else None
            if self.tensorboard is not None and np.isfinite(value):
                self.tensorboard.add_scalar(key, value, int(step))
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def write_record_ids(self, step, record_ids):
        if self.active:
            with open(os.path.join(self.workdir, "record_ids.jsonl"), "a") as f:
                f.write(json.dumps({"step": int(step), "record_ids": [int(i) for i in record_ids]})
                        + "\n")

    def write_image(self, step, tag, image_uint8):
        if self.active and self.tensorboard is not None:
            self.tensorboard.add_image(tag, image_uint8, int(step), dataformats="HWC")

    def close(self):
        if self.tensorboard is not None:
            self.tensorboard.close()


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
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = Image.fromarray(image_uint8)
    if upscale > 1:
        image = image.resize((image.width * upscale, image.height * upscale), Image.NEAREST)
    image.save(path)


class StepTimer:
    """Splits wall time per step into waiting for data and running the step.

    Create it outside any mesh context: on CPU it measures the peak FLOP/s (for MFU) on one
    local device right away.
    """

    def __init__(self):
        self.peak_flops = peak_flops_per_device()
        self.data_seconds = 0.0
        self.compute_seconds = 0.0
        self.steps = 0
        self._mark = time.perf_counter()

    def data_ready(self):
        now = time.perf_counter()
        self.data_seconds += now - self._mark
        self._mark = now

    def step_done(self):
        now = time.perf_counter()
        self.compute_seconds += now - self._mark
        self._mark = now
        self.steps += 1

    def summary(self, examples_per_step, flops_per_step):
        """Throughput since the last summary; resets the counters."""
        total = max(self.data_seconds + self.compute_seconds, 1e-9)
        steps = max(self.steps, 1)
        out = {
            "images_per_sec": examples_per_step * self.steps / total,
            "step_time_sec": total / steps,
            "data_wait_fraction": self.data_seconds / total,
        }
        if flops_per_step:
            per_device = flops_per_step * self.steps / total / jax.device_count()
            out["tflops_per_device"] = per_device / 1e12
            if self.peak_flops:
                out["mfu"] = per_device / self.peak_flops
        self.data_seconds = self.compute_seconds = 0.0
        self.steps = 0
        return out
