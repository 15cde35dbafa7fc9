"""glibc malloc settings under which XLA:CPU reuses its memory from one step to the next.

XLA:CPU allocates all of an execution's temporaries at once (5.6 GB for the benchmarks' PixArt-
shape train step) with posix_memalign on a worker thread, and frees them when the step ends.
glibc serves a request that large from a thread's arena by mmap and hands it back by munmap, so
every step faults its whole working set in again, 4 KiB at a time: 1.37 million minor faults and
2.6 s of kernel time per 7.5 s step on 2 cores (2026-11-30), and an elementwise fusion writing
fresh pages ran at 7 GB/s instead of 20-50. With one arena, no mmap and no trimming, freed memory
stays in the heap and the next step reuses it: no faults, the step 15 % faster, PyTorch's step
unchanged. The cost is the one an accelerator's caching allocator has: the process keeps its
peak heap until it exits.

One arena has a price too: every thread takes the same lock. Sampling the demo model (many
small executions) ran 12 % slower with it (12.3 against 14.0 images/s), the demo's own train
step the same either way (104 images/s). So only training gets the settings: glibc reads them
when a process starts, and `python -m lidit_jax.main --mode=train` re-executes itself with them
(`reexec_with_settings`) when it runs on CPU; the train-step benchmark starts both frameworks'
workers with them. Other C libraries ignore them; on TPU and GPU hosts nothing changes.
"""
import importlib.util
import os
import sys

SETTINGS = {
    "MALLOC_ARENA_MAX": "1",  # Every thread allocates from the main (brk) heap ...
    "MALLOC_MMAP_MAX_": "0",  # ... never by mmap, however large the request ...
    "MALLOC_TRIM_THRESHOLD_": str(1 << 50),  # ... and free() never returns it to the kernel.
}
# Set to 0 to keep glibc's defaults (e.g. to compare, or where peak memory must be released).
SWITCH = "LIDIT_HOST_ALLOCATOR"
_ACCELERATOR_PLUGINS = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin")


def runs_on_cpu(environ=os.environ):
    """True when JAX will compute on the CPU: JAX_PLATFORMS=cpu, or no accelerator plugin is
    installed. Decided without importing jax's backends (a TPU must not be opened before exec)."""
    platforms = environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms == "cpu"
    return not any(importlib.util.find_spec(name) for name in _ACCELERATOR_PLUGINS)


def with_settings(environ=os.environ):
    """A copy of `environ` with SETTINGS added, unless SWITCH=0 there."""
    if environ.get(SWITCH) == "0":
        return dict(environ)
    return {**environ, **SETTINGS}


def reexec_with_settings():
    """On CPU, replaces this process by the same command line with SETTINGS in its environment,
    once (the new process finds them set); a no-op on accelerators, with SWITCH=0, or when they
    are set already. Call before jax computes anything."""
    environ = with_settings()
    if not runs_on_cpu() or all(os.environ.get(k) == v for k, v in environ.items()):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
