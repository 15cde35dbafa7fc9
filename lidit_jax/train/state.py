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
    """Decay matrices and conv kernels only; spare norms, biases and other vectors."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(train_config):
    """Global-norm clipping then AdamW with the warmup schedule and the decay mask."""
    return optax.chain(
        optax.clip_by_global_norm(train_config.grad_clip),
        optax.adamw(learning_rate_schedule(train_config), b1=train_config.b1, b2=train_config.b2,
                     weight_decay=train_config.weight_decay, mask=weight_decay_mask),
    )


def create_train_state(model_constructor, config, mesh):
    """Builds the model sharded on `mesh`, then the optimizer and EMA with matching shardings.

    Returns (graphdef, state): `nnx.merge(graphdef, state.params)` gives the model back.
    """
    model = sharding.create_sharded(
        model_constructor, mesh, config.mesh.rules, check_replicated=config.mesh.check_replicated,
        replicated_min_size=config.mesh.replicated_min_size)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError(f"the denoiser has non-parameter state, which training does not carry: {rest}")
    tx = make_optimizer(config.train)

    def init(params):
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            ema_params=jax.tree.map(jnp.copy, params),
            rng=jax.random.key_data(jax.random.key(config.seed)),
            skipped_steps=jnp.zeros((), jnp.int32),
        )

    # Every parameter-shaped part of the state (moments, EMA) takes its parameter's sharding;
    # counters and the RNG are replicated.
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    abstract = jax.eval_shape(init, params)
    shardings = TrainState(
        step=replicated,
        params=param_shardings,
        opt_state=optax.tree_map_params(tx, lambda _, s: s, abstract.opt_state, param_shardings,
                                        transform_non_params=lambda _: replicated),
        ema_params=param_shardings,
        rng=replicated,
        skipped_steps=replicated,
    )
    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)(params)
    return graphdef, state


def state_shardings(state):
    """The sharding of every leaf of a concrete state (used as jit in/out shardings)."""
    return jax.tree.map(lambda x: x.sharding, state)
