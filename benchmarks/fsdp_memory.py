"""FSDP memory: per-device bytes of parameters + AdamW state + EMA on 1, 2, 4, 8 CPU devices.

    python -m benchmarks.fsdp_memory [--smoke]

The train state of the PixArt-shape LI-DiT (benchmarks/train_step.py) is created directly in its
shards on a mesh of N fake CPU devices with every device on the `fsdp` axis, and each device's
bytes are summed from the arrays' addressable shards (`sharding.bytes_per_device`), not from a
formula. The ideal is the single-device total / N; the figure is the largest device's bytes
over that ideal (1.00 = perfect). Small vectors (norm scales, biases on replicated axes, the step
and RNG) are replicated by design and are what keeps it above 1.
"""
import argparse
import json
import os
import sys

DEVICE_COUNTS = (1, 2, 4, 8)
if "jax" not in sys.modules:
    # Fake CPU devices: must be set before JAX starts (this module runs in its own process).
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={max(DEVICE_COUNTS)}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from benchmarks import train_step  # noqa: E402
from lidit_jax.parallel import mesh as mesh_lib  # noqa: E402
from lidit_jax.parallel import sharding  # noqa: E402
from lidit_jax.train.program import abstract_model  # noqa: E402


def state_bytes(shape, num_devices):
    """Per-device bytes of the whole train state on an fsdp mesh of `num_devices`."""
    config = train_step.model_config(shape)
    config.mesh.update(data=1, fsdp=num_devices, tensor=1)
    mesh = mesh_lib.build_mesh(config.mesh, jax.devices()[:num_devices])
    state = abstract_model(config, mesh, [shape["llm"]], 3).init_state()
    per_device = sharding.bytes_per_device(state)
    del state
    return max(per_device.values())


def run(smoke=False):
    if jax.device_count() < max(DEVICE_COUNTS):
        raise RuntimeError(f"fsdp_memory needs {max(DEVICE_COUNTS)} CPU devices; run it as its "
                           "own process (python -m benchmarks.fsdp_memory) so it can set "
                           "--xla_force_host_platform_device_count before JAX starts")
    name = "smoke" if smoke else "pixart"
    shape = dict(train_step.SHAPES[name])
    if smoke:
        shape["width"] = 64  # Divisible by every device count, as a real model's width is.
    total = state_bytes(shape, 1)
    records = []
    for n in DEVICE_COUNTS:
        largest = state_bytes(shape, n)
        records.append({"shape": name, "devices": n, "bytes_per_device": largest,
                        "ideal_bytes": total / n, "ratio_to_ideal": largest / (total / n)})
    return records


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model")
    args = parser.parse_args()
    for record in run(args.smoke):
        print(json.dumps(record))


if __name__ == "__main__":
    main()
