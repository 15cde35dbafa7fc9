"""XLA flags for every JAX process the tests run: fake CPU devices, and LLVM at -O0.

The tests compile far more than they compute (tiny shapes, hundreds of programs), and LLVM's
optimisation passes are most of XLA:CPU's compile time: at -O0 the fast tier took 415 CPU-s
instead of 591, 222 s instead of 310 (docs/performance.md, "The test suite"). HLO-level
optimisation (fusion, layouts, SPMD partitioning) still runs, so the programs the tests check
are the ones a run compiles; only the machine code is slower.
A benchmark's figures need the optimised code: only its smoke run (tests/test_benchmarks.py),
whose figures nothing reads, compiles at -O0 too.
No JAX import here: conftest sets XLA_FLAGS from this before JAX starts.
"""


def xla_flags(devices):
    """XLA_FLAGS for a JAX process of the tests with `devices` fake CPU devices."""
    return f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
