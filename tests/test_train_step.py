"""The train step: 1 vs 8 devices, gradient accumulation, the NaN guard."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from lidit_jax.diffusion.dit import LIDiT
from lidit_jax.parallel import sharding
from lidit_jax.train.state import make_optimizer
from lidit_jax.train.step import NUM_TIMESTEP_BUCKETS, merge_microbatches, split_microbatches
from train_helpers import (LLM_WIDTH, batch_shardings, jitted_step_and_state, make_mesh,
                           random_batch, tiny_config, train)


def assert_trees_close(a, b, rtol, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.slow
def test_one_and_eight_devices_agree_for_three_steps():
    config = tiny_config()
    batches = [random_batch(seed) for seed in range(3)]
    single, single_losses, _ = train(config, make_mesh(1, 1, 1), batches)
    multi, multi_losses, _ = train(config, make_mesh(2, 2, 2), batches)
    np.testing.assert_allclose(multi_losses, single_losses, rtol=2e-5)
    assert_trees_close(multi.params, single.params, rtol=1e-4, atol=1e-6)
    assert_trees_close(multi.ema_params, single.ema_params, rtol=1e-4, atol=1e-6)
    # The 8-device run really shards: the DiT's FFN kernel is split over fsdp x tensor.
    kernels = [x for x in jax.tree.leaves(multi.params) if x.ndim == 3 and x.shape[-1] == 128]
    assert kernels and not any(k.sharding.is_fully_replicated for k in kernels)


@pytest.mark.slow
def test_gradient_accumulation_equals_the_large_batch_and_adds_no_collective():
    """Two micro-batches on data 2 x fsdp 4 give the large batch's step: losses, per-timestep-
    bucket losses and parameters. The accumulating step gathers only what the single-batch step
    gathers (the FSDP parameters): a contiguous split all-gathered the inputs over `data`. One
    compile per step, its HLO counted and the same executable run."""
    mesh = make_mesh(2, 4, 1)
    batch = random_batch(3, batch=64)
    steps = {}
    for microbatches in (1, 2):
        config = tiny_config(microbatches=microbatches, batch_size=64)
        step, state = jitted_step_and_state(config, mesh, batch)
        with jax.set_mesh(mesh), sharding.axis_rules(config.mesh.rules):
            placed = jax.device_put(batch, batch_shardings(batch, mesh, config.mesh.rules))
            compiled = step.lower(state, placed).compile()
            state, metrics = compiled(state, placed)
        steps[microbatches] = compiled.as_text().count(" all-gather("), state, metrics
    (whole_gathers, whole, whole_metrics), (gathers, accumulated, metrics) = steps[1], steps[2]
    assert gathers == whole_gathers
    np.testing.assert_allclose(metrics["loss"], whole_metrics["loss"], rtol=1e-5)
    assert_trees_close(accumulated.params, whole.params, rtol=1e-4, atol=1e-6)
    # Per-timestep-bucket losses pair each example's loss with its own timestep: the
    # micro-batches' losses come back in batch order.
    for bucket in range(NUM_TIMESTEP_BUCKETS):
        name = f"loss_t{bucket}"
        np.testing.assert_allclose(metrics[name], whole_metrics[name], rtol=1e-5)


def test_micro_batches_stay_sharded_over_every_batch_axis():
    """Each micro-batch is split over data x fsdp like the whole batch (no gather, no duplicate
    work on the `data` axis), and merging gives back the batch order."""
    mesh, rules = make_mesh(2, 4, 1), tiny_config().mesh.rules
    batch = jnp.arange(64 * 3, dtype=jnp.float32).reshape(64, 3)
    with jax.set_mesh(mesh), sharding.axis_rules(rules):
        batch = jax.device_put(batch, batch_shardings(batch, mesh, rules))
        micro = jax.jit(lambda x: split_microbatches(x, 4))(batch)
        merged = jax.jit(merge_microbatches)(micro)
    batch_spec = sharding.logical_to_mesh_spec(("batch",), rules)
    assert micro.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec(None, *batch_spec)), 3)
    assert micro.addressable_shards[0].data.shape == (4, 2, 3)  # 64 / 4 micro / 8 devices
    np.testing.assert_array_equal(micro[1], batch[1::4])
    np.testing.assert_array_equal(merged, batch)


def test_non_finite_step_leaves_the_state_untouched():
    config, mesh = tiny_config(), make_mesh(1, 1, 1)
    good = random_batch(1)
    poisoned = dict(good, x0=good["x0"].at[0, 0, 0, 0].set(jnp.nan))
    step, state = jitted_step_and_state(config, mesh, good)  # One compile serves both steps.
    with jax.set_mesh(mesh), sharding.axis_rules(config.mesh.rules):
        state, _ = step(state, jax.device_put(good, batch_shardings(good, mesh,
                                                                    config.mesh.rules)))
        # Host copies: the step donates the state it is given.
        before = jax.tree.map(np.asarray, (state.params, state.ema_params))
        after, metrics = step(state, jax.device_put(poisoned, batch_shardings(
            poisoned, mesh, config.mesh.rules)))
    assert not np.isfinite(float(metrics["loss"])) and not bool(metrics["finite"])
    assert int(after.skipped_steps) == 1 and int(after.step) == 2
    assert_trees_close(after.params, before[0], rtol=0, atol=0)
    assert_trees_close(after.ema_params, before[1], rtol=0, atol=0)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(after.opt_state))


@pytest.mark.slow
def test_weight_decay_spares_norms_and_biases_also_when_stacked_by_scan():
    config = tiny_config(weight_decay=0.1)
    assert config.model.scan_layers
    model = LIDiT(config, (LLM_WIDTH,), 3, rngs=nnx.Rngs(0))
    _, params = nnx.split(model, nnx.Param)
    # Zero gradients: AdamW's only change is the decay, -lr * weight_decay * p where it applies.
    optimizer = make_optimizer(config.train)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = optimizer.update(zeros, optimizer.init(params), params)
    stacked_vectors = 0
    for (path, param), (_, update) in zip(params.flat_state(), updates.flat_state()):
        name, value, change = str(path[-1]), np.asarray(param[...]), np.asarray(update[...])
        if name == "kernel":
            np.testing.assert_allclose(change, -1e-3 * 0.1 * value, rtol=1e-5, atol=1e-12)
        else:
            assert not change.any(), path
            stacked_vectors += value.ndim >= 2
    assert stacked_vectors > 0  # Scanned blocks' biases and norm scales are [depth, width].
