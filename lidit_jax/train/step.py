"""The jitted train step: diffusion loss, gradient accumulation, AdamW, EMA, NaN guard.

One XLA program per step. Its inputs are the train state (donated) and a global batch
`{"x0": [batch, H, W, C], "text": [{"states", "mask", "prompt_mask"} per encoder]}`
(train/inputs.py) sharded along `batch`; noise and timesteps are drawn from the state's RNG for
the whole global batch before it is cut into micro-batches, so accumulating k micro-batches of
b/k examples gives the same update as one batch of b.

Without the text cache the frozen LLMs run in the same program (`text.in_step`): "text" carries
token ids instead of "states" (train/inputs.py) and the LLMs' weights are a third argument,
`step(state, batch, encoder_params)`, neither donated nor differentiated; the whole global batch
is encoded once, before the micro-batch split.
"""
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lidit_jax.parallel import tpu_flags
from lidit_jax.parallel.sharding import constrain
from lidit_jax.train.state import TrainState, learning_rate_schedule, make_optimizer

NUM_TIMESTEP_BUCKETS = 4


def split_microbatches(tree, num_micro):
    """Leaves [batch, ...] -> [num_micro, batch / num_micro, ...]; micro-batch j holds examples
    j, j + num_micro, j + 2 num_micro, ...

    Strided, not contiguous: each device's shard of the batch splits into num_micro local pieces,
    so every micro-batch stays sharded over all the batch's mesh axes with no communication. A
    contiguous split ([num_micro, batch / num_micro] by reshape) lets sharding propagation put the
    first batch mesh axis (`data`) on the micro-batch dimension: the scan then all-gathers the
    batch over `data`, whose devices compute the same micro-batch, each as many examples as with
    no accumulation (docs/pods.md: LI-DiT-1B at depth 2 on v5p 2x2x1, data 2 x fsdp 2, 3.05 GiB
    of temporaries per chip with 2 contiguous micro-batches, 2.80 with 2 strided ones, 3.77 with
    one batch).
    """
    def split(x):
        micro = x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:]).swapaxes(0, 1)
        return constrain(micro, (None, "batch") + (None,) * (x.ndim - 1))
    return jax.tree.map(split, tree)


def merge_microbatches(x):
    """[num_micro, batch / num_micro, ...] from `split_microbatches` -> [batch, ...] in batch order."""
    return x.swapaxes(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def make_train_step(graphdef, config, objective, text_encoders=None):
    """Returns `step(state, batch[, encoder_params]) -> (state, metrics)`, not yet jitted (see
    `jit_train_step`); with `text_encoders` (an `in_step.TextEncoders`), batch["text"] holds token
    ids and `encoder_params` their weights."""
    tx = make_optimizer(config.train)
    schedule = learning_rate_schedule(config.train)
    num_micro = config.train.microbatches
    ema_decay = config.train.ema_decay

    def per_example_loss(params, x_t, model_t, target, text):
        model = nnx.merge(graphdef, params)
        return objective.loss(model(x_t, model_t, text), target)

    def micro_loss(params, micro):
        losses = per_example_loss(params, micro["x_t"], micro["model_t"], micro["target"],
                                  micro["text"])
        return jnp.sum(losses), losses

    grad_fn = jax.grad(micro_loss, has_aux=True)

    def step(state: TrainState, batch, encoder_params=()):
        text = batch["text"]
        if text_encoders is not None:
            text = text_encoders(encoder_params, text)
        rng = jax.random.wrap_key_data(state.rng)
        rng, t_key, noise_key = jax.random.split(rng, 3)
        x0 = constrain(batch["x0"].astype(jnp.float32), ("batch", None, None, None))
        global_batch = x0.shape[0]
        t = objective.sample_t(t_key, global_batch, hw=x0.shape[1:3])
        noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
        inputs = {
            "x_t": objective.noisy(x0, noise, t),
            "model_t": objective.model_time(t),
            "target": objective.target(x0, noise, t),
            "text": text,
        }

        def accumulate(grads_sum, micro):
            grads, losses = grad_fn(state.params, micro)
            return jax.tree.map(jnp.add, grads_sum, grads), losses

        if num_micro == 1:
            # No length-1 scan: XLA:CPU runs loop bodies without its usual threading (3.4x
            # slower on the demo); on TPU and GPU the two compile to the same program.
            grads, losses = grad_fn(state.params, inputs)
        else:
            zeros = jax.tree.map(jnp.zeros_like, state.params)
            grads, micro_losses = jax.lax.scan(accumulate, zeros,
                                               split_microbatches(inputs, num_micro))
            losses = merge_microbatches(micro_losses)
        grads = jax.tree.map(lambda g: g / global_batch, grads)
        loss = jnp.mean(losses)

        updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        new_ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p,
                               state.ema_params, new_params)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # A non-finite step leaves parameters, moments and EMA untouched: never a poisoned state.
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = TrainState(
            step=state.step + 1,
            params=keep(new_params, state.params),
            opt_state=keep(new_opt_state, state.opt_state),
            ema_params=keep(new_ema, state.ema_params),
            rng=jax.random.key_data(rng),
            skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32),
        )
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "update_norm": optax.global_norm(updates),
            "learning_rate": schedule(state.step),
            "finite": finite,
            "skipped_steps": new_state.skipped_steps,
            **timestep_bucket_losses(losses, objective.model_time(t)),
        }
        return new_state, metrics

    return step


def timestep_bucket_losses(losses, model_t, max_time=1000.0):
    """Mean loss per quarter of the timestep range: {'loss_t0': ..., 'loss_t3': ...} (NaN if empty)."""
    bucket = jnp.clip((model_t / max_time * NUM_TIMESTEP_BUCKETS).astype(jnp.int32), 0,
                      NUM_TIMESTEP_BUCKETS - 1)
    out = {}
    for b in range(NUM_TIMESTEP_BUCKETS):
        in_bucket = bucket == b
        count = jnp.sum(in_bucket)
        out[f"loss_t{b}"] = jnp.where(count > 0, jnp.sum(jnp.where(in_bucket, losses, 0.0)) /
                                      jnp.maximum(count, 1), jnp.nan)
    return out


def jit_train_step(step_fn, state_shardings, batch_shardings, mesh, encoder_shardings=None):
    """jit with explicit shardings, the state donated (updated in place on device), and on TPU
    the generation's compiler flags (`parallel.tpu_flags`): the trainer and `--mode=compile`
    compile the same program. `encoder_shardings`: of the frozen LLMs' weights, when the step
    runs them (`make_train_step`'s text_encoders)."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    in_shardings = (state_shardings, batch_shardings)
    if encoder_shardings is not None:
        in_shardings += (encoder_shardings,)
    return jax.jit(step_fn, in_shardings=in_shardings,
                   out_shardings=(state_shardings, replicated), donate_argnums=(0,),
                   compiler_options=tpu_flags.compiler_options(mesh.devices.flat[0]))
