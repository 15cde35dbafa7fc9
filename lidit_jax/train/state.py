"""The train state: trainable parameters (DiT + refiners), AdamW state, EMA, step, RNG.

The frozen LLMs and the VAE are not part of it: they have no optimizer state and are restored
from their own weights, checked against the fingerprints recorded in the checkpoint.
The state is a pytree of arrays, so it is jitted, donated, sharded and checkpointed as one.
"""
import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lidit_jax.parallel import sharding


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 [], optimizer steps taken.
    params: nnx.State  # float32 trainable parameters, sharded by logical axes.
    opt_state: optax.OptState
    ema_params: nnx.State
    rng: jax.Array  # uint32 [2], raw key data (checkpointable).
    skipped_steps: jax.Array  # int32 [], updates skipped for a non-finite loss or gradient.


def learning_rate_schedule(train_config):
    """Linear warmup to train.learning_rate, then constant or cosine to zero at train.steps."""
    peak = train_config.learning_rate
    warmup = max(train_config.warmup_steps, 0)
    if train_config.lr_schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, peak, warmup, max(train_config.steps, warmup + 1), end_value=0.0)
    if warmup == 0:
        return optax.constant_schedule(peak)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup])


def weight_decay_mask(params):
    """Decay weight matrices and conv kernels (parameters named `kernel`) only; spare norms,
    biases and embeddings. By name, not rank: scanned layers stack a bias or a norm scale to
    [depth, width], which is still not a weight to decay."""
    return jax.tree_util.tree_map_with_path(lambda path, _: _parameter_name(path) == "kernel",
                                            params)


def _parameter_name(path):
    """The parameter's own name: the last dict key of its pytree path (nnx.State paths end
    with the Variable's `.value` attribute after it)."""
    return next(str(entry.key) for entry in reversed(path)
                if isinstance(entry, jax.tree_util.DictKey))


def make_optimizer(train_config):
    """Global-norm clipping then AdamW with the warmup schedule and the decay mask."""
    return optax.chain(
        optax.clip_by_global_norm(train_config.grad_clip),
        optax.adamw(learning_rate_schedule(train_config), b1=train_config.b1, b2=train_config.b2,
                     weight_decay=train_config.weight_decay, mask=weight_decay_mask),
    )


def _init_state(params, tx, seed):
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        ema_params=jax.tree.map(jnp.copy, params),
        rng=jax.random.key_data(jax.random.key(seed)),
        skipped_steps=jnp.zeros((), jnp.int32),
    )


def _split_params(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError(f"the denoiser has non-parameter state, which training does not carry: {rest}")
    return graphdef, params


def abstract_train_state(model_constructor, config, mesh):
    """(graphdef, state of jax.ShapeDtypeStruct with shardings), allocating nothing.

    Parameters are sharded by their logical axes through `config.mesh.rules`; every
    parameter-shaped part of the optimizer state and the EMA takes its parameter's sharding;
    counters and the RNG are replicated. Works for meshes of devices this host does not have
    (AOT compilation for a TPU topology).
    """
    graphdef, abstract_params = _split_params(nnx.eval_shape(model_constructor))
    param_shardings = sharding.checked_shardings(
        abstract_params, mesh, config.mesh.rules, check_replicated=config.mesh.check_replicated,
        replicated_min_size=config.mesh.replicated_min_size)
    tx = make_optimizer(config.train)
    abstract = jax.eval_shape(lambda p: _init_state(p, tx, config.seed), abstract_params)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    shardings = TrainState(
        step=replicated,
        params=param_shardings,
        opt_state=optax.tree_map_params(tx, lambda _, s: s, abstract.opt_state, param_shardings,
                                        transform_non_params=lambda _: replicated),
        ema_params=param_shardings,
        rng=replicated,
        skipped_steps=replicated,
    )
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
    return graphdef, abstract


def init_train_state(model_constructor, config, mesh, abstract):
    """The state `abstract` describes, initialised directly in its shards (no host copy)."""
    tx = make_optimizer(config.train)

    def init():
        _, params = _split_params(model_constructor())
        return _init_state(params, tx, config.seed)

    return sharding.init_in_shards(init, shardings_of(abstract), mesh, config.mesh.rules)


def shardings_of(state):
    """The sharding of every leaf of a concrete or abstract state (jit in/out shardings)."""
    return jax.tree.map(lambda x: x.sharding, state)
