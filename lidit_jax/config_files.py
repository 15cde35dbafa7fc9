"""The one way to load a config file and apply `key=value` overrides outside absl's flags.

`--config=FILE[:ARG] --config.a.b=v` on `lidit_jax.main` goes through ml_collections'
`config_flags` (absl's parser); the drivers that build several configs (the ablation and readout
arms, benchmarks/tpu_estimates.py) and `main`'s unknown-key message use the functions here, so
an override means the same thing everywhere: the key must exist (else the nearest key is named),
and a value is a Python literal or, failing that, a bare string.
"""
import ast
import difflib
import importlib.util

import ml_collections


def load(spec):
    """'configs/demo_shapes.py[:ARG]' -> the file's get_config(ARG) (ARG None when absent)."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_lidit_config", path)
    if module_spec is None:  # Not a .py path.
        raise FileNotFoundError(f"no config file {path!r}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def flatten_keys(config, prefix=""):
    """Every leaf key of `config` as a dotted path ('train.steps', 'text.llms.smollm2.layer')."""
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            yield from flatten_keys(value, path + ".")
        else:
            yield path


def nearest_key(config, dotted):
    """The existing dotted key closest to `dotted` (for 'did you mean' messages), or None."""
    match = difflib.get_close_matches(dotted, list(flatten_keys(config)), n=1, cutoff=0.5)
    return match[0] if match else None


def unknown_key_message(config, dotted):
    """None if `dotted` is a key (or a group of keys) of `config`, else a message naming the
    nearest key."""
    known = set(flatten_keys(config))
    if dotted in known or any(k.startswith(dotted + ".") for k in known):
        return None
    nearest = nearest_key(config, dotted)
    return f"unknown config key {dotted!r}" + (f"; did you mean {nearest!r}?" if nearest else "")


def parse_value(text):
    """A command-line value: a Python literal (3, 1e-4, [-1, -3], True, None), else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(config, overrides):
    """Sets each `key=value` string (or (key, value) pair, value already parsed) on `config`;
    an unknown key raises KeyError naming the nearest one. Returns `config`."""
    for override in overrides:
        if isinstance(override, str):
            key, _, text = override.partition("=")
            value = parse_value(text)
        else:
            key, value = override
        message = unknown_key_message(config, key)
        if message:
            raise KeyError(f"{override!r}: {message}")
        config.update_from_flattened_dict({key: value})
    return config
