"""Sweep `--mode=compile` estimates over settings: memory, loop-counted FLOPs, step time, MFU.

    python benchmarks/tpu_estimates.py --out=benchmarks/tpu_estimates.md \\
        --only=lidit_1b@v5p:4x4x4

Each row compiles the train step for a TPU topology through libtpu on this host (no TPU) and
reads `lidit_jax.aot.step_report`: per-chip HBM, the compiler's FLOPs with scanned layers
counted (two unrolled twins), libtpu's step-time estimate and the MFU it implies against the
chip's bf16 peak. Rows are appended to `--out` as they finish, so a partial sweep keeps what it
measured. A LI-DiT-1B row costs ~3 compiles (minutes each on 2 shared cores); a LI-DiT-10B row
several times that. `--list` prints the settings without compiling.

Settings (see SWEEP): remat policy, FSDP vs tensor split, per-chip batch, attention kernel and
splash tiles, context parallelism for the 1024 px LI-DiT-10B stage, and the text path. Rows
compile the cached text path (the DiT step alone, states as inputs) unless they set
`text.cache_dir: ""` ("LLMs in the step"): then the frozen LLMs of the config's `architecture`
run inside the step and the row's numbers include them (lidit_jax/aot.py). Topologies are named
as libtpu names them (chips): v5p:4x4x4 = 64 chips (a v5p-128), v6e:8x8 = 64 chips.
"""
import argparse
import datetime
import importlib
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lidit_jax import aot, aot_compile, aot_cost, config_files  # noqa: E402

# (config module, topology) -> list of (setting name, {dotted key: value}).
_1024 = {"data.image_size": 1024, "data.buckets": "1024x1024", "model.remat": "full"}
_ONLINE = {"text.cache_dir": ""}  # The frozen LLMs inside the step.
SWEEP = {
    ("lidit_1b", "v5p:4x4x4"): [
        ("fsdp32 x data2, remat none, bf16 residual, xla (config)", {}),
        ("fsdp32 x data2, remat none, xla, LLMs in the step (config's text path)", _ONLINE),
        ("fsdp32 x data2, remat none, float32 residual, xla",
         {"model.residual_dtype": "float32"}),
        ("fsdp32 x data2, remat none, splash (self- and cross-attention)",
         {"model.attention": "splash"}),
        ("fsdp16 x data4, remat none, xla", {"mesh.fsdp": 16}),
        ("fsdp8 x data8, remat none, xla", {"mesh.fsdp": 8}),
        ("fsdp8 x data8, dots_saveable, xla", {"mesh.fsdp": 8, "model.remat": "dots_saveable"}),
        ("fsdp32 x data2, remat full, xla", {"model.remat": "full"}),
        ("fsdp64, remat none, xla", {"mesh.fsdp": 64}),
        ("fsdp4 x data16, remat none, xla", {"mesh.fsdp": 4}),
        ("fsdp2 x data32, remat none, xla", {"mesh.fsdp": 2}),
        ("data64 (no FSDP), remat none, xla", {"mesh.fsdp": 1, "mesh.check_replicated": False}),
        ("fsdp16 x data2 x tensor2, remat none", {"mesh.fsdp": 16, "mesh.tensor": 2}),
        ("batch 4096 (64/chip), fsdp8 x data8, remat none",
         {"mesh.fsdp": 8, "train.batch_size": 4096}),
        ("batch 4096 (64/chip), fsdp8 x data8, dots_saveable",
         {"mesh.fsdp": 8, "train.batch_size": 4096, "model.remat": "dots_saveable"}),
    ],
    ("lidit_1b", "v6e:8x8"): [
        ("fsdp32 x data2, remat none, xla (config)", {}),
        ("fsdp32 x data2, dots_saveable, xla", {"model.remat": "dots_saveable"}),
    ],
    ("lidit_10b", "v5p:8x8x8"): [
        ("512px fsdp64 x data8, dots_saveable, auto = splash (config)", {}),
        ("512px fsdp64 x data8, dots_saveable, auto = splash, LLMs in the step (config's text "
         "path)", _ONLINE),
        ("512px fsdp64 x data8, dots_saveable, xla", {"model.attention": "xla"}),
        ("512px fsdp64 x data8, full remat, auto = splash", {"model.remat": "full"}),
        ("512px fsdp64 x data8, full remat, xla", {"model.remat": "full", "model.attention": "xla"}),
        ("1024px fsdp64 x data8, full remat, splash (config :1024)",
         {**_1024, "model.attention": "splash"}),
        ("1024px fsdp64 x data8, full remat, xla", {**_1024, "model.attention": "xla"}),
        ("1024px fsdp64 x data4 x context2 ulysses, full remat, splash",
         {**_1024, "model.attention": "splash", "mesh.context": 2,
          "model.context_parallel": "ulysses"}),
        ("1024px fsdp64 x data4 x context2 all_gather, full remat, splash",
         {**_1024, "model.attention": "splash", "mesh.context": 2,
          "model.context_parallel": "all_gather"}),
    ],
    ("lidit_10b", "v6e:16x16"): [
        ("512px fsdp64 x data4, dots_saveable, auto = splash (config)", {}),
        ("512px fsdp64 x data4, dots_saveable, xla", {"model.attention": "xla"}),
        ("1024px fsdp64 x data4, full remat, xla", {**_1024, "model.attention": "xla"}),
        ("512px fsdp64 x data4, full remat, auto = splash", {"model.remat": "full"}),
    ],
}

HEADER = ("| config | topology | setting | HBM GiB/chip | fits | FLOPs/chip (loops counted) | "
          "vs model | est. step s | est. MFU | compile s |\n"
          "|---|---|---|---|---|---|---|---|---|---|\n")


def build_config(name, topology, overrides):
    config = importlib.import_module(f"configs.{name}").get_config()
    config.aot.topology = topology
    config.text.cache_dir = "never-read-by-compile"  # The cached path, unless a row says "".
    return config_files.apply_overrides(config, overrides.items())


def estimate(name, topology, overrides, speed_only=False, memory_only=False):
    """One row's numbers: `aot.step_report` of the compiled step (and the wall time it took);
    speed_only: `aot_cost.speed_report` from the two small twins, without the full step's compile
    (no memory figures; minutes instead of up to an hour for LI-DiT-1B on 2 cores);
    memory_only: the full step's memory without the twins (v6e, which libtpu has no cost model
    for, or a first look at whether a setting fits)."""
    config = build_config(name, topology, overrides)
    start = time.perf_counter()
    devices = aot_compile.topology_devices(topology, config.aot.num_slices)
    if speed_only:
        report = aot_cost.speed_report(config, devices)
    elif memory_only:
        compiled, _ = aot_compile.compile_train_step(config, devices)
        report = aot_cost.memory_report(compiled, devices[0].device_kind)
    else:
        compiled, state = aot_compile.compile_train_step(config, devices)
        report = aot.step_report(config, devices, compiled, state)
    return report, time.perf_counter() - start


def row(name, topology, setting, report, seconds):
    gib = 1 << 30
    memory = (f"{report['per_chip_bytes'] / gib:.1f} | {report['fits']}"
              if "per_chip_bytes" in report else "not compiled (speed only) | -")
    if "compiler_flops" not in report:
        return (f"| {name} | {topology} | {setting} (memory only; temporaries "
                f"{report['temp_bytes'] / gib:.1f}) | {memory} | - | - | - | - | {seconds:.0f} |\n")
    return (f"| {name} | {topology} | {setting} | {memory} | {report['compiler_flops']:.3g} | "
            f"{report['flops_ratio']:.3f} | {report['seconds']:.3f} | "
            f"{100 * report['est_mfu']:.1f} %{' *' if report['splash_flops'] else ''} | "
            f"{seconds:.0f} |\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/tpu_estimates.md")
    parser.add_argument("--only", default="", help="config@topology[,..] to sweep, e.g. "
                        "lidit_1b@v5p:4x4x4; empty: all")
    parser.add_argument("--settings", default="", help="comma-separated row indices (0-based) "
                        "within each selected config@topology; empty: all")
    parser.add_argument("--speed_only", action="store_true", help="FLOPs, step time and MFU "
                        "from the two unrolled twins only; no full compile, no memory columns")
    parser.add_argument("--memory_only", action="store_true", help="the full step's memory only, "
                        "without the twins (no FLOPs or time)")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args()
    only = {tuple(item.split("@")) for item in args.only.split(",") if item}
    picks = {int(i) for i in args.settings.split(",") if i}
    if not os.path.exists(args.out):
        with open(args.out, "w") as f:
            f.write(f"Measured with benchmarks/tpu_estimates.py, {datetime.date.today()}.\n\n")
            f.write(HEADER)
    for (name, topology), settings in SWEEP.items():
        if only and (name, topology) not in only:
            continue
        for index, (setting, overrides) in enumerate(settings):
            if picks and index not in picks:
                continue
            if args.list:
                print(f"{name}@{topology} [{index}] {setting}: {overrides}")
                continue
            try:
                report, seconds = estimate(name, topology, overrides, args.speed_only,
                                           args.memory_only)
                line = row(name, topology, setting, report, seconds)
            except Exception as e:  # noqa: BLE001 -- a setting that does not compile is a result.
                line = (f"| {name} | {topology} | {setting} | failed: "
                        f"{type(e).__name__}: {str(e).splitlines()[0][:120]} |||||||\n")
            print(line, end="", flush=True)
            with open(args.out, "a") as f:
                f.write(line)


if __name__ == "__main__":
    main()
