"""Logical axis names -> mesh PartitionSpecs, activation constraints, sharded state creation.

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
    `shape`, a dimension that the mesh axes do not divide is replicated instead of failing, so
    small test models run on any mesh; the replication check catches it where it matters.
    """
    table = rules if isinstance(rules, dict) else dict((k, _as_axes(v)) for k, v in rules)
    used = set()
    spec = []
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
                axes = ()
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*spec)


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


def create_sharded(constructor, mesh, rules, *, check_replicated=True, replicated_min_size=2**22):
    """Builds `constructor()` (an nnx.Module or any nnx graph) directly sharded over `mesh`.

    Returns the module. Raises if a parameter with >= replicated_min_size elements is fully
    replicated on a multi-device mesh and `check_replicated` is on: such a run would waste memory
    on every device, usually because a rules entry is missing or a dimension does not divide.
    """
    validate_rules(rules, mesh.axis_names)
    abstract = nnx.eval_shape(constructor)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh, rules)
    if check_replicated:
        check_not_replicated(abstract_state, shardings, mesh, replicated_min_size)

    state = init_in_shards(lambda: nnx.state(constructor()), shardings, mesh, rules)
    return nnx.merge(graphdef, state)


def init_in_shards(init, shardings, mesh, rules):
    """`init()` run with its outputs created directly in `shardings`: the one sharded-init path
    (modules here, the train state in lidit_jax.train.state). No device holds more than its
    shards and no host a full copy."""
    with jax.set_mesh(mesh), axis_rules(rules):
        return jax.jit(init, out_shardings=shardings)()


def check_not_replicated(abstract_state, shardings, mesh, min_size):
    """Raises naming the parameters of >= min_size elements that no mesh axis shards."""
    if mesh.size == 1:
        return
    flat_vars = dict(nnx.to_flat_state(abstract_state))
    flat_shardings = dict(nnx.to_flat_state(shardings))
    offenders = []
    for path, variable in flat_vars.items():
        size = int(np.prod(variable.shape))
        spec = flat_shardings[path]
        spec = getattr(spec, "value", spec).spec
        if size >= min_size and all(entry is None for entry in spec):
            offenders.append(f"{'.'.join(map(str, path))} {tuple(variable.shape)}")
    if offenders:
        raise ValueError(
            "parameters replicated on every device (add or fix their logical axes in "
            "mesh.rules, pick mesh sizes that divide them, or set mesh.check_replicated=False): "
            + "; ".join(offenders[:10]))


def bytes_per_device(tree):
    """Bytes each device holds for the arrays in `tree`: {device: bytes}, measured from shards."""
    totals = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
    return totals
