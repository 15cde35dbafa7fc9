"""Test setup: 8 fake CPU devices, CPU only, absl flags parsed (Grain workers need them).

XLA_FLAGS must be set before JAX is imported anywhere, which is why this lives in conftest.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu is installed for AOT; never probe a TPU.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")  # fp32 parity tests on CPU.
