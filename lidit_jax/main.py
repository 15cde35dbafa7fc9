"""The lidit_jax entry point.

  python -m lidit_jax.main --config=configs/lidit_1b.py[:arg] --workdir=DIR --mode=MODE \\
      [--config.a.b=value ...]

Each mode is one function `run(config, workdir)` in its own module, named in MODES and imported
only when chosen, so `--mode=describe` never loads data or training code.
"""
import contextlib
import importlib
import logging as std_logging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from lidit_jax import compilation_cache, config_files, configuration, host_allocator, paths
from lidit_jax.parallel import mesh as mesh_lib

MODES = {
    "train": "lidit_jax.train.loop",
    "sample": "lidit_jax.sample",
    "encode": "lidit_jax.encode",
    "describe": "lidit_jax.describe",
    "compile": "lidit_jax.aot",
    "export": "lidit_jax.export",
    "eval": "lidit_jax.evaluate.mode",
}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/lidit_1b.py.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and samples go.")
_MODE = flags.DEFINE_string("mode", "train", f"One of {sorted(MODES)}.")
# --mode=sample options; unset ones take the config's values.
flags.DEFINE_multi_string("prompts", None, "sample: a prompt (repeat the flag for more).")
flags.DEFINE_string("prompt_file", None, "sample: a file with one prompt per line.")
flags.DEFINE_string("output", None, "sample: output folder (default WORKDIR/samples/cli); "
                    "export: output file (default WORKDIR/export/lidit_ema_step<N>.safetensors); "
                    "eval: output folder (default WORKDIR/eval/<benchmark>).")
flags.DEFINE_string("sampler", None, "sample: ddim | dpm++2m | euler | heun.")
flags.DEFINE_integer("sample_steps", None, "sample: number of sampler steps.")
flags.DEFINE_float("guidance_scale", None, "sample: classifier-free guidance scale.")
flags.DEFINE_integer("seed", 0, "sample: noise seed.")
flags.DEFINE_string("size", None, "sample: image size HxW in pixels (default data.image_size).")
flags.DEFINE_integer("num_per_prompt", 1, "sample: images per prompt.")
# --mode=eval options (--output, --sampler, --sample_steps, --guidance_scale, --seed apply too).
flags.DEFINE_string("benchmark", "shapes", "eval: shapes | geneval | t2i_compbench | dpg_bench.")


def parse_flags(argv):
    """absl's parser, with one-line errors for bad config overrides (naming the nearest key)."""
    try:
        return flags.FLAGS(argv)
    except (KeyError, AttributeError) as e:
        sys.exit(f"error: {_unknown_override_message(argv) or e}")
    except (flags.Error, TypeError, ValueError) as e:
        sys.exit(f"error: {e}")


def _unknown_override_message(argv):
    """Names the `--config.a.b=v` override whose key the config lacks, and the nearest key."""
    config_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if config_arg is None:
        return None
    config = config_files.load(config_arg)
    for override in argv:
        if override.startswith("--config.") and "=" in override:
            message = config_files.unknown_key_message(
                config, override[len("--config."):].split("=", 1)[0])
            if message:
                return f"{message} in {override}"
    return None


class _OrbaxInfoFilter(std_logging.Filter):
    """Orbax logs its whole options dataclass at INFO whenever a manager starts or saves; keep
    its warnings and errors, drop the rest from the console."""

    def filter(self, record):
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def _compilation_cache(config, workdir):
    """train.compilation_cache_dir (relative to the workdir) -> JAX's persistent compilation
    cache for the mode's run: a second start of a run compiles nothing its first start compiled."""
    if not (config.train.compilation_cache_dir and workdir):
        return contextlib.nullcontext()
    directory = paths.resolve(config.train.compilation_cache_dir, workdir)
    logging.info("compilation cache %s", directory)
    return compilation_cache.persistent_cache(directory)


def main(argv):
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    if _MODE.value not in MODES:
        sys.exit(f"error: unknown --mode={_MODE.value!r}; known modes: {', '.join(sorted(MODES))}")
    if _CONFIG.value is None:
        sys.exit("error: --config is required, e.g. --config=configs/demo_shapes.py")
    config = _CONFIG.value
    try:
        configuration.validate(config)
    except configuration.ConfigError as e:
        sys.exit(f"error: invalid config: {e}")
    if _MODE.value == "train":
        # Before any device is touched; a no-op off CPU (lidit_jax/host_allocator.py).
        host_allocator.reexec_with_settings()
    module = importlib.import_module(MODES[_MODE.value])
    if getattr(module, "NEEDS_WORKDIR", True) and not _WORKDIR.value:
        sys.exit(f"error: --mode={_MODE.value} needs --workdir=DIR")
    logging.get_absl_handler().addFilter(_OrbaxInfoFilter())
    # Once per process, for every mode, before any device is touched: the first log lines say
    # process i of n and the local and global devices.
    mesh_lib.initialize_distributed(config.distributed, config.distributed_heartbeat_s)
    logging.info("mode %s, workdir %s", _MODE.value, _WORKDIR.value)
    with _compilation_cache(config, _WORKDIR.value):
        preempted = module.run(config, _WORKDIR.value)  # Only `train` returns it (True/False).
    if preempted:  # The step is saved; launchers that must restart the job want non-zero.
        sys.exit(config.train.preemption_exit_code)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
