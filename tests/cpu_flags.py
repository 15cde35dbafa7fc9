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

libtpu, which the TPU-topology compiles load, reads XLA_FLAGS too, when it starts, and exits on
a flag it does not know: the XLA:CPU-only flag must be gone from the environment by then
(`libtpu=True`; conftest removes it once XLA:CPU has read its flags).
No JAX import here: conftest sets XLA_FLAGS from this before JAX starts.
"""

_CPU_ONLY = "--xla_cpu_use_fusion_emitters=false"


def xla_flags(devices, libtpu=False):
    """XLA_FLAGS for a JAX process of the tests with `devices` fake CPU devices; `libtpu`: for a
    process that compiles for a TPU topology, without the flags libtpu refuses."""
    flags = f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
    return flags if libtpu else f"{flags} {_CPU_ONLY}"
