"""Logical axis names -> mesh PartitionSpecs, activation constraints, sharded state creation,
and the checks that parameters and batch rows land on the devices as the config intends.

Parameters are annotated with logical names by the layers (`nnx.with_partitioning`); the config's
rules table (`config.mesh.rules`) says which mesh axes each logical name is sharded over. State is
created already sharded: `nnx.eval_shape` gives shapes and logical specs without allocating,
the rules turn them into `NamedSharding`s, and `jit(init, out_shardings=...)` materialises each
shard on its own device. No host ever holds a full copy.
"""
import contextlib
import math

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import NamedSharding, PartitionSpec


def _as_axes(mesh_axes):
    if mesh_axes is None:
        return ()
    if isinstance(mesh_axes, str):
        return (mesh_axes,)
    return tuple(mesh_axes)


def validate_rules(rules, mesh_axis_names):
    """Checks that every mesh axis named by the rules table exists; returns the table as a dict."""
    table = {}
    for entry in rules:
        if len(entry) != 2:
            raise ValueError(f"mesh.rules: entry {entry!r} is not a (logical_name, mesh_axes) pair")
        logical, mesh_axes = entry
        unknown = [a for a in _as_axes(mesh_axes) if a not in mesh_axis_names]
        if unknown:
            raise ValueError(
                f"mesh.rules: logical axis {logical!r} maps to mesh axes {unknown} that do not "
                f"exist; the mesh has {tuple(mesh_axis_names)}")
        table[logical] = _as_axes(mesh_axes)
    return table


def logical_to_mesh_spec(logical_axes, rules, mesh=None, shape=None):
    """PartitionSpec for one array whose dimensions carry `logical_axes` (names or None).

    A mesh axis is used at most once per array (later dimensions drop it). With `mesh` and
    `shape`, a dimension that its mesh axes do not divide is replicated instead of failing: the
    lenient rule for activations (`constrain`), whose shapes the model fixes. Parameters must
    not rely on it; `check_parameter_shardings` fails on such a dimension.
    """
    return _resolve(logical_axes, rules, mesh, shape)[0]


def _resolve(logical_axes, rules, mesh, shape):
    """(PartitionSpec, [(dimension, logical name, mesh axes, their size)] of the dimensions
    those mesh axes do not divide, which the spec replicates)."""
    table = rules if isinstance(rules, dict) else dict((k, _as_axes(v)) for k, v in rules)
    used = set()
    spec, undivided = [], []
    for dim, name in enumerate(logical_axes):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no entry in mesh.rules; add "
                           f"('{name}', <mesh axes or None>) to config.mesh.rules")
        axes = tuple(a for a in table[name] if a not in used)
        if mesh is not None and shape is not None and axes:
            size = math.prod(mesh.shape[a] for a in axes)
            if shape[dim] % size:
                undivided.append((dim, name, axes, size))
                axes = ()
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*spec), undivided


_current_rules = flax_spmd.get_logical_axis_rules


@contextlib.contextmanager
def axis_rules(rules):
    """Makes `rules` the table used by `constrain` (and Flax) inside the block."""
    with flax_spmd.logical_axis_rules(tuple((k, v) for k, v in rules)):
        yield


def constrain(x, logical_axes):
    """Sharding constraint on an activation by logical names; a no-op outside a mesh or rules."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = _current_rules()
    if mesh is None or mesh.empty or not rules:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_mesh_spec(logical_axes, rules, mesh, x.shape))


def _logical_axes_of(variable):
    sharding = variable.get_metadata().get("out_sharding")
    return tuple(sharding) if sharding else (None,) * variable.ndim


def state_shardings(abstract_state, mesh, rules):
    """The nnx.State of abstract variables with each value replaced by its NamedSharding.

    Variables stay in place (holding shardings), so the result has the state's exact pytree
    structure and can be matched leaf by leaf against parameters, gradients or optimizer moments.
    """

    def to_sharding(variable):
        axes = _logical_axes_of(variable)
        if len(axes) != variable.ndim:
            raise ValueError(f"logical axes {axes} do not match the shape {variable.shape}")
        return variable.replace(
            NamedSharding(mesh, logical_to_mesh_spec(axes, rules, mesh, variable.shape)))

    return jax.tree.map(to_sharding, abstract_state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def checked_shardings(abstract_state, mesh, rules, *, check_replicated=True,
                      replicated_min_size=2**22):
    """The sharding of every variable of `abstract_state` (an nnx.State, abstract or not) by its
    logical axes through `rules`, after checking the rules name only `mesh`'s axes and, with
    `check_replicated`, that every parameter is sharded as they say
    (`check_parameter_shardings`). The train state's parameters take this path
    (train/state.py); `init_in_shards` then creates them in these shardings."""
    validate_rules(rules, mesh.axis_names)
    shardings = state_shardings(abstract_state, mesh, rules)
    if check_replicated:
        check_parameter_shardings(abstract_state, shardings, mesh, rules, replicated_min_size)
    return shardings


def init_in_shards(init, shardings, mesh, rules):
    """`init()` run with its outputs created directly in `shardings`: the one sharded-init path
    (modules here, the train state in lidit_jax.train.state). No device holds more than its
    shards and no host a full copy."""
    with jax.set_mesh(mesh), axis_rules(rules):
        return jax.jit(init, out_shardings=shardings)()


def check_parameter_shardings(abstract_state, shardings, mesh, rules, replicated_min_size):
    """Raises unless every parameter is sharded as `rules` say (config key
    mesh.check_replicated=False turns this off).

    Two failures, each naming the parameters: a dimension that its mesh axes do not divide
    (`logical_to_mesh_spec` would silently replicate it over them, whatever its size), and a
    parameter of >= replicated_min_size elements that no mesh axis of size > 1 shards (a rules
    entry missing, or its axes at size 1). Either way every device holds memory the run sized
    for one shard.
    """
    if mesh.size == 1:
        return
    flat_vars = nnx.to_flat_state(abstract_state)
    undivided = []
    for path, variable in flat_vars:
        for dim, name, axes, size in _resolve(_logical_axes_of(variable), rules, mesh,
                                              variable.shape)[1]:
            undivided.append(
                f"{_dotted(path)} {tuple(variable.shape)}: dimension {dim} ({name!r}, "
                f"{variable.shape[dim]}) over mesh axes {axes} of size {size}")
    if undivided:
        raise ValueError(
            "parameter dimensions not divisible by their mesh axes would be replicated over "
            f"them: {'; '.join(undivided[:10])}. Pick mesh sizes (mesh.fsdp, mesh.tensor, ...) "
            "or model sizes that divide them, map the logical axis to other mesh axes in "
            "mesh.rules, or set mesh.check_replicated=False to replicate them")
    flat_shardings = dict(nnx.to_flat_state(shardings))
    offenders = []
    for path, variable in flat_vars:
        named = flat_shardings[path]
        # Fully replicated also when the spec names only size-1 mesh axes (`tensor` at 1).
        replicated = getattr(named, "value", named).is_fully_replicated
        if math.prod(variable.shape) >= replicated_min_size and replicated:
            offenders.append(f"{_dotted(path)} {tuple(variable.shape)}")
    if offenders:
        raise ValueError(
            "parameters replicated on every device (add or fix their logical axes in "
            "mesh.rules, or set mesh.check_replicated=False): " + "; ".join(offenders[:10]))


def _dotted(path):
    return ".".join(map(str, path))


def batch_rows_by_process(batch_sharding, global_batch):
    """{process_index: set of batch rows} that each process's devices hold of a [global_batch, ...]
    array sharded by `batch_sharding` (a NamedSharding; only its first dimension matters).
    Works for devices this host does not drive: each device carries its process_index."""
    rows_only = NamedSharding(batch_sharding.mesh, PartitionSpec(*batch_sharding.spec[:1]))
    rows = {}
    for device, index in rows_only.devices_indices_map((global_batch,)).items():
        rows.setdefault(device.process_index, set()).update(range(*index[0].indices(global_batch)))
    return rows


def check_batch_rows_per_process(batch_sharding, global_batch):
    """Raises unless each process holds its own global_batch / process_count rows of the batch.

    The input pipeline's contract: every process loads a different share of the global batch
    and `jax.make_array_from_process_local_data` places it on that process's devices. When a
    mesh axis that does not shard the batch (`tensor`, `context`) spans processes, processes
    along it hold the same rows but load different ones: the batch is built at the wrong size
    and the first step fails on a shape, or trains on the wrong rows.
    """
    rows = batch_rows_by_process(batch_sharding, global_batch)
    processes = len(rows)
    if all(len(r) * processes == global_batch for r in rows.values()):
        return  # Equal shares that together cover every row exactly once: disjoint.
    mesh = batch_sharding.mesh
    batch_axes = _as_axes(batch_sharding.spec[0] if batch_sharding.spec else None)
    process_ids = np.vectorize(lambda d: d.process_index)(mesh.devices)
    spanning = [name for i, name in enumerate(mesh.axis_names)
                if name not in batch_axes and (np.ptp(process_ids, axis=i) > 0).any()]
    shares = sorted({len(r) for r in rows.values()})
    if not spanning:
        raise ValueError(f"the {processes} processes hold unequal shares of the "
                         f"{global_batch} batch rows ({shares} rows); give every process as many "
                         "devices on the batch's mesh axes")
    raise ValueError(
        f"the batch rows do not split into {processes} equal shares of {global_batch} / "
        f"{processes}, one per process (shares of {shares} rows): mesh axes {spanning} (sizes "
        f"{[mesh.shape[a] for a in spanning]}) do not shard the batch (mesh.rules maps 'batch' "
        f"to {batch_axes}) yet span processes, so processes along them need the same rows while "
        f"each loads its own. Keep them within a host ({mesh.devices.size // processes} devices "
        "per process here; the mesh lays an axis along a physical ring, which can cross hosts "
        "even at that size): lower mesh.tensor / mesh.context and raise mesh.fsdp or mesh.data "
        "instead")


def bytes_per_device(tree):
    """Bytes each device holds for the arrays in `tree`: {device: bytes}, measured from shards."""
    totals = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
    return totals
