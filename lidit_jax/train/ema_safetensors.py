"""The EMA weights as one safetensors file (written by `--mode=export`, read by
`train.init_from` and by anyone outside lidit_jax).

One float32 tensor per trainable parameter (DiT and refiners; the frozen LLMs are not in it),
named by its module path (`dit.blocks.mlp.fc1.kernel`; scanned blocks stacked on axis 0 as in
training); the header metadata holds `format` (FORMAT), the step, the config as JSON and the
frozen encoders' fingerprints.
"""
import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from safetensors import safe_open
from safetensors.numpy import save_file

from lidit_jax import paths

FORMAT = "lidit_jax/ema/v1"


def _name(path):
    return ".".join(str(key) for key in path)


def export_params(params, path, metadata):
    """nnx.State of (possibly sharded, multi-process) arrays -> safetensors file at `path`.

    Every process must call it (the arrays are gathered); process 0 writes. Returns the number
    of parameters.
    """
    tensors = {}
    for key_path, variable in nnx.to_flat_state(params):
        tensors[_name(key_path)] = np.ascontiguousarray(
            multihost_utils.process_allgather(variable.get_value(), tiled=True))
    if jax.process_index() == 0:
        with paths.local_output(path) as local:  # safetensors writes local files; then uploaded.
            save_file(tensors, local, metadata={k: str(v) for k, v in metadata.items()})
    return sum(int(t.size) for t in tensors.values())


def load_exported(path, model):
    """Sets `model`'s parameters (an LIDiT of the exported config) from the file; returns the
    header metadata. Names or shapes that do not match are an error naming them."""
    _, params, _ = nnx.split(model, nnx.Param, ...)
    with safe_open(paths.local_copy(path), framework="numpy") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path} is not a lidit_jax EMA export (format "
                             f"{metadata.get('format')!r}, expected {FORMAT!r})")
        names = set(handle.keys())
        wanted = {_name(key_path): variable for key_path, variable in nnx.to_flat_state(params)}
        missing, unexpected = sorted(set(wanted) - names), sorted(names - set(wanted))
        if missing or unexpected:
            raise ValueError(f"{path} does not fit this model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]} (export and model configs differ)")
        for name, variable in wanted.items():
            tensor = handle.get_tensor(name)
            if tensor.shape != variable.shape:
                raise ValueError(f"{path}: {name} has shape {tensor.shape}, the model "
                                 f"{variable.shape}")
            variable.set_value(jax.numpy.asarray(tensor, variable.dtype))
    nnx.update(model, params)
    return metadata
