"""`--mode=compile`: compile the train step for a TPU topology on any host, through libtpu.

The mesh is built from the topology's devices (no TPU needed), the train state and a batch are
abstract (jax.ShapeDtypeStruct with shardings), and XLA's TPU compiler reports the real per-chip
memory and its cost estimate. This is how the big configs are shown to fit before a pod is rented.

  python -m lidit_jax.main --config=configs/lidit_1b.py --mode=compile \\
      --config.aot.topology=v5p:4x4x4

The report (`step_report`): per-chip memory split into parameters, optimizer moments, EMA,
activations and temporaries (the compiled step's own numbers); the step's FLOPs with loops
counted, checked against `diffusion.flops.train_step_flops`; the estimated step time; and the
implied MFU against the chip's bf16 peak. XLA's cost analysis counts a while loop's body once,
so with `model.scan_layers` the scanned 28 blocks of LI-DiT-1B count as one (the measured
undercount: docs/kernels.md, "Honest `--mode=compile`"). The loop-counted numbers come from
two unrolled twins of the step, with 1 and 2 blocks and one micro-batch: every block is
identical, so cost(depth D) = cost(1) + (D - 1) (cost(2) - cost(1)), times the micro-batches.
Two small compiles instead of one unrolled 28-block compile (4 minutes on 2 cores for LI-DiT-1B).

With text.cache_dir empty the frozen LLMs run inside the step (text/in_step.py) and are counted:
their weights are arguments of the compiled step (in its memory), built from each LLM's
config.json or GGUF header (no weights read), and their cost comes from two small programs per
LLM, the encoder alone with 0 and 1 layers: cost(depth) = cost(0) + depth (cost(1) - cost(0)),
the layer stack being one scan whose body the cost model counts once. They print as
`encoder_flops_per_chip=<float> encoder_hbm_gib=<float>` (weights per chip plus one layer's
temporaries) before the last line, and est. MFU is for the whole step as launched:
(DiT model FLOPs + encoder FLOPs) / ((DiT seconds + encoder seconds) x peak). Token ids are
compiled at text.max_length, the longest bucket the trainer sends; as in the trainer, the blocks
run over the tokens after the template's shared prefix only (its keys and values are computed
once at load, `text/in_step.py`), where the LLM's tokenizer is there to find that prefix.
Last line: `fits=<True|False> hbm_per_chip_gib=<float> est_mfu=<float>`.
"""
from lidit_jax.aot_compile import compile_train_step, topology_devices
from lidit_jax.aot_cost import memory_report, speed_report, state_bytes_per_chip

NEEDS_WORKDIR = False


def step_report(config, devices, compiled, state):
    """Everything `--mode=compile` prints, as a dict (bytes, FLOPs and seconds per chip)."""
    memory = memory_report(compiled, devices[0].device_kind)
    memory.update(state_bytes_per_chip(state))
    return dict(memory, **speed_report(config, devices, compiled))


def print_report(config, report):
    gib = 1 << 30
    print(f"topology={config.aot.topology} slices={config.aot.num_slices} "
          f"chips={report['chips']} kind={report['kind']}")
    hbm = report["hbm_bytes"] / gib if report["hbm_bytes"] else float("nan")
    print(f"per_chip_memory_gib={report['per_chip_bytes'] / gib:.2f} "
          f"(arguments {report['arguments_bytes'] / gib:.2f}, temporaries "
          f"{report['temp_bytes'] / gib:.2f}) hbm_gib={hbm:.1f}")
    encoders = ("0 (text states from text.cache_dir)" if config.text.cache_dir else
                f"{report['encoder_hbm_bytes'] / gib:.2f} (frozen LLMs inside the step)")
    print(f"memory_gib: params={report['params'] / gib:.2f} "
          f"optimizer={report['opt_state'] / gib:.2f} ema={report['ema_params'] / gib:.2f} "
          f"activations_and_temporaries={report['temp_bytes'] / gib:.2f} "
          f"resident_encoders={encoders}")
    print(f"step_flops_per_chip={report['compiler_flops']:.4g} (loops counted) "
          f"model_flops_per_chip={report['model_flops']:.4g} ratio={report['flops_ratio']:.3f} "
          f"check={report['flops_check']}")
    peak = report["peak_flops"] or float("nan")
    print(f"est_step_seconds={report['seconds']:.4g} bf16_peak_tflops_per_chip={peak / 1e12:.0f} "
          f"images_per_second={config.train.batch_size / report['seconds']:.4g}")
    if report["splash_flops"]:
        # The roofline is the cost model's rule for every op; a real kernel reaches a fraction.
        half = report["seconds"] + report["splash_seconds"]
        print(f"splash_seconds={report['splash_seconds']:.4g} (at the bf16 peak; at half of it: "
              f"est_step_seconds={half:.4g} est_mfu="
              f"{(report['model_flops'] + report['encoder_flops']) / (half * peak):.4f})")
    if not config.text.cache_dir:
        share = report["encoder_flops"] / (report["encoder_flops"] + report["model_flops"])
        print(f"encoder_seconds={report['encoder_seconds']:.4g} (in est_step_seconds) "
              f"encoder_share_of_step_flops={share:.3f}")
        print(f"encoder_flops_per_chip={report['encoder_flops']:.4g} "
              f"encoder_hbm_gib={report['encoder_hbm_bytes'] / gib:.4f}")
    print(f"fits={report['fits']} hbm_per_chip_gib={report['per_chip_bytes'] / gib:.2f} "
          f"est_mfu={report['est_mfu']:.4f}")


def run(config, workdir):
    del workdir
    devices = topology_devices(config.aot.topology, config.aot.num_slices)
    compiled, state = compile_train_step(config, devices)
    print_report(config, step_report(config, devices, compiled, state))
