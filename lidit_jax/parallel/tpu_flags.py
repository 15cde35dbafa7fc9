"""XLA TPU compiler flags per TPU generation, passed as the train step's compiler options.

One table serves every path that compiles the step: the trainer on a pod (whichever launcher
started it) and `--mode=compile` on a CPU host, so the ahead-of-time check compiles exactly what
a pod runs and libtpu validates the flags for the generation before any pod is rented. The
flags let the FSDP all-gathers and reduce-scatters run under the matmuls (async collective
fusion, as MaxText sets them). Continuation fusion of all-gathers is v5e-only: libtpu 0.0.52
refuses it for v5p and v6e ("not supported/recommended on platforms other than TPU v5e"), found
through `--mode=compile`; tests/test_tpu_flags.py compiles each generation's set. The
data-parallel all-reduce optimisation left the v5p estimate unchanged (the cost model does not
simulate run-time overlap), so it stays v5e-only until measured on a pod (docs/pods.md, "TPU
compiler flags").
"""
_OVERLAP_COLLECTIVES = {
    "xla_tpu_enable_async_collective_fusion": True,
    "xla_tpu_enable_async_collective_fusion_multiple_steps": True,
    "xla_tpu_overlap_compute_collective_tc": True,
    "xla_enable_async_all_gather": True,
}

# Keyed by jax device_kind prefix (as lidit_jax/hardware.py), longest prefix first.
COMPILER_OPTIONS = {
    "TPU v5 lite": dict(_OVERLAP_COLLECTIVES,
                        xla_tpu_enable_async_collective_fusion_fuse_all_gather=True,
                        xla_tpu_enable_data_parallel_all_reduce_opt=True,
                        xla_tpu_data_parallel_opt_different_sized_ops=True),
    # v6e's larger MXUs want more scoped VMEM for their matmul tiles.
    "TPU v6 lite": dict(_OVERLAP_COLLECTIVES, xla_tpu_scoped_vmem_limit_kib=98304),
    "TPU v5": dict(_OVERLAP_COLLECTIVES),  # v5p
    "TPU v4": dict(_OVERLAP_COLLECTIVES),
}


def compiler_options(device):
    """The compiler options for a step on `device`'s kind: the generation's flags on TPU, else
    None (CPU, GPU, or a TPU generation without a preset)."""
    if device.platform != "tpu":
        return None
    return next((dict(flags) for prefix, flags in COMPILER_OPTIONS.items()
                 if device.device_kind.startswith(prefix)), None)
