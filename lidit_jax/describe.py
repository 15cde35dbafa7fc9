"""`--mode=describe`: the LI-DiT parameter table, from shapes only (nothing is allocated).

    python -m lidit_jax.main --config=configs/lidit_1b.py --mode=describe

The table has one row per submodule (the DiT backbone's parts, the timestep embedder, each part of
the text conditioner), and ends with two machine-readable lines:
    dit_params=<int>       everything in LIDiT except the text conditioner
    refiner_params=<int>   the text conditioner (token refiners, collaborative refiner, pooling)
"""
import math
from collections import defaultdict

from flax import nnx

from lidit_jax import configuration
from lidit_jax.diffusion.dit import LIDiT

NEEDS_WORKDIR = False


def _group(path):
    """Row name of a parameter path: two levels for the backbone and text side, else one."""
    parts = [str(p) for p in path]
    depth = 2 if parts[0] in ("backbone", "text") and len(parts) > 2 else 1
    return ".".join(parts[:depth])


def parameter_groups(config, llm_widths, in_channels):
    """{row name: [(path, shape), ...]} for every parameter of LIDiT, from nnx.eval_shape."""
    abstract = nnx.eval_shape(lambda: LIDiT(config, llm_widths, in_channels, rngs=nnx.Rngs(0)))
    groups = defaultdict(list)
    for path, variable in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        groups[_group(path)].append((path, tuple(variable.shape)))
    return groups


def describe(config, llm_widths, in_channels=None):
    """The parameter table as a string, ending with `dit_params=` and `refiner_params=` lines.

    llm_widths: hidden size of each configured LLM; in_channels: default vae.latent_channels.
    """
    in_channels = config.vae.latent_channels if in_channels is None else in_channels
    groups = parameter_groups(config, llm_widths, in_channels)
    m = config.model
    lines = [f"LI-DiT: depth {m.depth}, width {m.width}, heads {m.heads}, patch {m.patch_size}, "
             f"in_channels {in_channels}, LLM widths {list(llm_widths)}, "
             f"scan_layers {m.scan_layers}",
             f"{'submodule':<36} {'params':>15} {'tensors':>8}  largest tensor"]
    totals = defaultdict(int)
    for name in sorted(groups):
        counts = [(math.prod(shape), shape) for _, shape in groups[name]]
        count = sum(n for n, _ in counts)
        totals["refiner" if name.split(".")[0] == "text" else "dit"] += count
        largest = max(counts)[1]
        lines.append(f"{name:<36} {count:>15,} {len(counts):>8}  {largest}")
    lines.append(f"{'total':<36} {totals['dit'] + totals['refiner']:>15,}")
    lines.append(f"dit_params={totals['dit']}")
    lines.append(f"refiner_params={totals['refiner']}")
    return "\n".join(lines)


def run(config, workdir):
    del workdir
    print(describe(config, configuration.llm_widths_from_config(config)))
