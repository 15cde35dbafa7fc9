"""What each accelerator can do: the one table of peak FLOP/s, HBM and MXU width.

`--mode=compile` (fits, est. MFU, splash's roofline), the trainer's logged MFU and the GPU
benchmark all read it. Rows are keyed by a prefix of jax's `device_kind` and looked up in order,
the more specific prefix first ("TPU v5 lite" before "TPU v5"). CPU has no row: its peak is
measured once (`peak_flops`).
"""
import dataclasses
import time

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class Chip:
    bf16_peak_flops: float  # Dense bf16 matmul FLOP/s per chip (vendor data sheets).
    hbm_bytes: int  # High-bandwidth memory per chip.
    mxu_width: int = 0  # TPU systolic array width: a shorter matmul axis still takes a pass.


# Google Cloud's TPU pages; NVIDIA's data sheets (dense, no sparsity).
CHIPS = {
    "TPU v4": Chip(275e12, 32 << 30, 128),
    "TPU v5 lite": Chip(197e12, 16 << 30, 128),
    "TPU v5e": Chip(197e12, 16 << 30, 128),
    "TPU v5p": Chip(459e12, 95 << 30, 128),
    "TPU v5": Chip(459e12, 95 << 30, 128),  # v5p reports "TPU v5".
    "TPU v6 lite": Chip(918e12, 32 << 30, 256),
    "TPU v6e": Chip(918e12, 32 << 30, 256),
    "NVIDIA H200": Chip(989e12, 141 * 10**9),
    "NVIDIA H100": Chip(989e12, 80 * 10**9),
    "NVIDIA A100-SXM4-80GB": Chip(312e12, 80 * 10**9),
    "NVIDIA A100-SXM4-40GB": Chip(312e12, 40 * 10**9),
    "NVIDIA L4": Chip(121e12, 24 * 10**9),
}


def chip(device_kind):
    """The Chip of a jax `device_kind` ("TPU v5 lite", "NVIDIA H100 80GB HBM3", ...), or None."""
    return next((c for prefix, c in CHIPS.items() if device_kind.startswith(prefix)), None)


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


def peak_flops(device=None):
    """Peak FLOP/s of `device` (default: the first): the table's bf16 peak, measured on CPU,
    None for an accelerator the table lacks."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return measure_cpu_peak_flops()
    found = chip(device.device_kind)
    return None if found is None else found.bf16_peak_flops


def target_device():
    """(platform, device_kind) of the devices the current computation is compiled for.

    Inside `jax.set_mesh(mesh)` that is the mesh's devices, so `--mode=compile` for a TPU
    topology on a CPU host selects kernels for the TPU; otherwise the default backend's.
    """
    device = jax.sharding.get_abstract_mesh().abstract_device or jax.devices()[0]
    return device.platform, getattr(device, "device_kind", "")
