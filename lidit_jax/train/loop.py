"""`--mode=train`: the training loop, one section per concern (big_vision style).

A run is fully described by its config (saved as WORKDIR/config.json) and resumes from the
newest checkpoint in WORKDIR/checkpoints: same parameters, optimizer, EMA, RNG and data position
as if it had never stopped. SIGTERM (preemption) saves a checkpoint and exits 0.
"""
import json
import os
import signal

import jax
import numpy as np
import tqdm
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from lidit_jax.diffusion.dit import LIDiT
from lidit_jax.diffusion.flops import train_step_flops
from lidit_jax.diffusion.objectives import make_objective
from lidit_jax.evaluate import during_training
from lidit_jax.parallel import mesh as mesh_lib
from lidit_jax.parallel import sharding
from lidit_jax import configuration
from lidit_jax.train import checkpoint as checkpoint_lib
from lidit_jax.train import init_from
from lidit_jax.train import inputs as inputs_lib
from lidit_jax.train import metrics as metrics_lib
from lidit_jax.train import sampling
from lidit_jax.train.state import create_train_state, shardings_of
from lidit_jax.train.step import jit_train_step, make_train_step

NEEDS_WORKDIR = True


class NonFiniteLoss(RuntimeError):
    """train.nan_policy='stop' and a step produced a non-finite loss or gradient."""


class _Preemption:
    """Turns SIGTERM into a flag the loop checks between steps.

    With several processes the signal reaches each at a different step, so `requested()` asks
    all of them (a tiny all-gather per step): every process stops, and saves, at the same step.
    """

    def __init__(self):
        self._signalled = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        self._signalled = True

    def requested(self):
        if jax.process_count() == 1:
            return self._signalled
        return bool(multihost_utils.process_allgather(np.array(self._signalled)).any())


def run(config, workdir):
    # ---- Processes, workdir, config ----------------------------------------------------------
    # Multi-host: one process per host, started the same way on every host.
    mesh_lib.initialize_distributed()
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    configuration.validate(config, num_devices=jax.device_count())
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=1))
    preemption = _Preemption()

    # ---- Device mesh ---------------------------------------------------------------------------
    mesh = mesh_lib.build_mesh(config.mesh)
    rules = config.mesh.rules
    logging.info("mesh %s over %d devices (%s)", dict(mesh.shape), mesh.size,
                 jax.devices()[0].device_kind)

    # ---- Frozen encoders and the input pipeline ------------------------------------------------
    # Text states come from the cache written by --mode=encode when text.cache_dir is set, else
    # from the frozen LLMs inside the input step; images are encoded by the VAE (or are pixels).
    inputs = inputs_lib.TrainInputs(config, workdir, mesh)

    # ---- Model, optimizer, EMA: created sharded -----------------------------------------------
    constructor = lambda: LIDiT(config, inputs.llm_widths, inputs.channels,  # noqa: E731
                                rngs=nnx.Rngs(config.seed))
    graphdef, state = create_train_state(constructor, config, mesh)
    logging.info("trainable parameters: %d",
                 sum(x.size for x in jax.tree.leaves(state.params)))

    # ---- Resume ---------------------------------------------------------------------------------
    checkpointer = checkpoint_lib.Checkpointer(workdir, config.checkpoint)
    restored = checkpointer.restore_latest(
        checkpoint_lib.abstract_like(state), inputs.fingerprints(),
        allow_mismatch=config.text.allow_fingerprint_mismatch)
    if restored is not None:
        step, state, data_state, _ = restored
        inputs.set_state(data_state)
        logging.info("resumed from step %d", step)
    elif config.train.init_from:  # A new run from another run's weights (train.init_from).
        state = init_from.initialize(state, graphdef, config, inputs.fingerprints())
    start_step = int(state.step)

    # ---- Train step -------------------------------------------------------------------------------
    objective = make_objective(config.diffusion)
    state_shardings = shardings_of(state)
    train_step = jit_train_step(make_train_step(graphdef, config, objective), state_shardings,
                                inputs.batch_shardings(), mesh)
    flops_per_step = train_step_flops(
        config, inputs.llm_widths, batch=config.train.batch_size, hw=inputs.image_hw,
        text_lengths=[config.text.max_length] * len(inputs.llm_widths),
        in_channels=inputs.channels)

    # ---- Samples for fixed prompts, from the EMA weights ---------------------------------------
    sampler = sampling.FixedPromptSampler(config, graphdef, objective, inputs, mesh)
    # Shapes scores and a fixed-noise validation loss every eval.every steps (0: off).
    evaluator = (during_training.TrainingEval(config, graphdef, objective, inputs)
                 if config.eval.every else None)

    # ---- Loop -------------------------------------------------------------------------------------
    writer = metrics_lib.MetricsWriter(workdir, config.logging.tensorboard)
    timer = metrics_lib.StepTimer()
    profile = _ProfileWindow(config, workdir)
    progress = tqdm.tqdm(total=config.train.steps, initial=start_step, dynamic_ncols=True,
                         disable=not config.logging.progress_bar or jax.process_index() != 0)
    step = start_step
    try:
        with jax.set_mesh(mesh), sharding.axis_rules(rules):
            while step < config.train.steps and not preemption.requested():
                profile.before_step(step)
                batch = inputs.next_batch()
                timer.data_ready()
                state, step_metrics = train_step(state, batch)
                step += 1
                if config.logging.record_ids:
                    writer.write_record_ids(step, inputs.global_record_ids())
                if step % config.train.log_every == 0 or step == config.train.steps:
                    step_metrics = jax.device_get(step_metrics)
                    timer.step_done()
                    scalars = {k: v for k, v in step_metrics.items() if k != "finite"}
                    scalars.update(timer.summary(config.train.batch_size, flops_per_step))
                    scalars.update(inputs.counters())
                    writer.write_scalars(step, scalars)
                    progress.set_postfix(
                        loss=f"{scalars['loss']:.4f}", img_s=f"{scalars['images_per_sec']:.1f}",
                        tflops=f"{scalars.get('tflops_per_device', 0.0):.3f}",
                        mfu=f"{scalars.get('mfu', 0.0):.1%}")
                else:
                    timer.step_done()
                if config.train.nan_policy == "stop" and not bool(step_metrics["finite"]):
                    # The step left the state untouched; stop before anything else is saved.
                    raise NonFiniteLoss(f"non-finite loss or gradient at step {step}; the last "
                                        f"checkpoint in {checkpointer.directory} is clean")
                progress.update(1)
                if step % config.train.sample_every == 0 or step == config.train.steps:
                    sampler.write(step, state.ema_params, writer,
                                  os.path.join(workdir, "samples"))
                if evaluator and (step % config.eval.every == 0 or step == config.train.steps):
                    evaluator.write(step, state.ema_params, writer)
                if step % config.checkpoint.every == 0 or step == config.train.steps:
                    checkpointer.save(step, state, inputs.get_state(), _meta(config, inputs))
        if step < config.train.steps:  # Stopped early: preemption.
            logging.warning("SIGTERM: saving step %d and exiting", step)
            checkpointer.save(step, state, inputs.get_state(), _meta(config, inputs), force=True)
    finally:
        # Also on an exception: an async save in flight completes before the process ends.
        checkpointer.close()
        profile.close()
        writer.close()
        progress.close()
        inputs.close()


def _meta(config, inputs):
    return {"config": json.loads(config.to_json_best_effort()),
            "fingerprints": inputs.fingerprints()}


class _ProfileWindow:
    """A jax.profiler trace of the steps [logging.profile_start, + logging.profile_steps) into
    WORKDIR/profile; a run that ends inside the window still writes its trace (`close`)."""

    def __init__(self, config, workdir):
        self.start, self.steps = config.logging.profile_start, config.logging.profile_steps
        self.directory = os.path.join(workdir, "profile")
        self.tracing = False

    def before_step(self, step):
        if step == self.start:
            jax.profiler.start_trace(self.directory)
            self.tracing = True
        elif self.tracing and step == self.start + self.steps:
            self.close()

    def close(self):
        if self.tracing:
            jax.profiler.stop_trace()
            self.tracing = False
