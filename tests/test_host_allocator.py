"""lidit_jax.host_allocator: which processes re-execute, and that the settings stop XLA:CPU's
page faults from one execution to the next."""
import os
import subprocess
import sys

import pytest

from lidit_jax import host_allocator

# Runs a jitted function with ~128 MB of temporaries five times and prints the fewest minor page
# faults of the last three calls, after re-executing itself when host_allocator decides to.
PROGRAM = """
import os, resource
from lidit_jax import host_allocator
host_allocator.reexec_with_settings()
import jax, jax.numpy as jnp
x = jnp.ones((4096, 4096), jnp.float32)
step = jax.jit(lambda x: jnp.sum((x * 2) @ x) + jnp.sum(x * 3))
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(os.environ.get("MALLOC_ARENA_MAX"), min(faults[2:]))
"""


def _run(**environment):
    env = {k: v for k, v in os.environ.items()
           if k not in host_allocator.SETTINGS and k != host_allocator.SWITCH}
    result = subprocess.run([sys.executable, "-c", PROGRAM], env={**env, **environment},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    arena, faults = result.stdout.split()
    return arena, int(faults)


@pytest.mark.slow
def test_cpu_process_reexecutes_and_stops_faulting_in_its_temporaries():
    arena, faults = _run(JAX_PLATFORMS="cpu")
    assert arena == host_allocator.SETTINGS["MALLOC_ARENA_MAX"]
    # 128 MB of fresh pages would be ~32k faults; with the settings the heap's pages are reused.
    assert faults < 2000
    arena, faults_default = _run(JAX_PLATFORMS="cpu", **{host_allocator.SWITCH: "0"})
    assert arena == "None" and faults_default > 10 * max(faults, 100)


@pytest.mark.parametrize("environ,expected", [
    ({"JAX_PLATFORMS": "cpu"}, True),
    ({"JAX_PLATFORMS": "tpu"}, False),
    ({"JAX_PLATFORMS": "cuda,cpu"}, False),
])
def test_runs_on_cpu_follows_jax_platforms(environ, expected):
    assert host_allocator.runs_on_cpu(environ) is expected


def test_switch_keeps_glibc_defaults():
    assert host_allocator.with_settings({"A": "1"}) == {"A": "1", **host_allocator.SETTINGS}
    off = {"A": "1", host_allocator.SWITCH: "0"}
    assert host_allocator.with_settings(off) == off
