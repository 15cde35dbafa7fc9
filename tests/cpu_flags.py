"""XLA flags for every JAX process the tests run: fake CPU devices, and quick code generation.

The tests compile far more than they compute (tiny shapes, hundreds of programs), and code
generation is most of XLA:CPU's compile time. Two flags make it quick:
- LLVM at -O0 (`--xla_backend_optimization_level=0`);
- fusions emitted by XLA's elemental IR emitter rather than its MLIR fusion emitters
  (`--xla_cpu_use_fusion_emitters=false`), whose lowering costs more than -O0 saves.
docs/performance.md, "The test suite", has the times. HLO-level optimisation (fusion, layouts,
SPMD partitioning) still runs, so the programs the tests check are the ones a run compiles; only
the machine code differs. A benchmark's figures need the optimised code: only its smoke run
(tests/test_benchmarks.py), whose figures nothing reads, compiles this way too.
No JAX import here: conftest sets XLA_FLAGS from this before JAX starts.
"""

QUICK_CODEGEN = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def xla_flags(devices):
    """XLA_FLAGS for a JAX process of the tests with `devices` fake CPU devices."""
    return f"--xla_force_host_platform_device_count={devices} {QUICK_CODEGEN}"
