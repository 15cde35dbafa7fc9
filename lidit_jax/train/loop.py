"""`--mode=train`: the training loop, one section per concern (big_vision style).

A run is fully described by its config (saved as WORKDIR/config.json) and resumes from the
newest checkpoint in WORKDIR/checkpoints: same parameters, optimizer, EMA, RNG and data position
as if it had never stopped. WORKDIR may be local or gs:// (lidit_jax.paths). SIGTERM
(preemption, also TPU maintenance events on multi-host runs) makes every process save the same
step and exit 0. The loop never waits for the device to run the step it just dispatched, except
where it needs that step's result (checkpoints, samples, evals): a background thread puts the
next batches on the devices ahead of time (train/inputs.py), and a log step's metrics are read
back once the device has computed them (`_DeferredLog`), so the device's queue never drains.
"""
import json
import signal
import tempfile

import jax
import tqdm
from absl import logging
from jax.experimental import multihost_utils

from lidit_jax import configuration, paths
from lidit_jax.parallel import mesh as mesh_lib
from lidit_jax.parallel import sharding
from lidit_jax.train import checkpoint as checkpoint_lib
from lidit_jax.train import during_training
from lidit_jax.train import init_from
from lidit_jax.train import inputs as inputs_lib
from lidit_jax.train import metrics as metrics_lib
from lidit_jax.train import program as program_lib
from lidit_jax.train import sampling

NEEDS_WORKDIR = True


class NonFiniteLoss(RuntimeError):
    """train.nan_policy='stop' and a step produced a non-finite loss or gradient."""


class _Preemption:
    """SIGTERM -> every process stops, and saves, at the same step; no per-step collective.

    Several processes: JAX's preemption sync manager (started by jax.distributed.initialize)
    catches SIGTERM, or a TPU maintenance notice, on any process and agrees in the background on
    a step all of them can still reach; `reached_preemption_sync_point(step)` is a local check
    that turns True on every process at that step. One process: a SIGTERM handler sets a flag.
    """

    def __init__(self):
        self.multiprocess = jax.process_count() > 1
        self._signalled = False
        if not self.multiprocess:  # A Python handler would replace the sync manager's own.
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        self._signalled = True

    def reached(self, step):
        if self.multiprocess:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._signalled


def run(config, workdir):
    # ---- Workdir and config (jax.distributed was started by lidit_jax.main) -------------------
    workdir = paths.path(workdir)
    configuration.validate(config, num_devices=jax.device_count())
    if jax.process_index() == 0:
        paths.write_text_atomic(workdir / "config.json", config.to_json_best_effort(indent=1))
    preemption = _Preemption()

    # ---- Device mesh ---------------------------------------------------------------------------
    mesh = mesh_lib.build_mesh(config.mesh)
    rules = config.mesh.rules
    logging.info("mesh %s over %d devices (%s)", dict(mesh.shape), mesh.size,
                 jax.devices()[0].device_kind)

    # ---- Frozen encoders and the input pipeline ------------------------------------------------
    # Text states come from the cache written by --mode=encode when text.cache_dir is set, else
    # the frozen LLMs run inside the train step on the batch's token ids (text/in_step.py);
    # images are encoded by the VAE (or are pixels).
    inputs = inputs_lib.TrainInputs(config, workdir, mesh)

    # ---- The train program: model, abstract state, jitted step (train/program.py) -------------
    encoder_args = () if inputs.text_encoders is None else (inputs.encoder_params,)
    program = program_lib.build(
        config, mesh, inputs.llm_widths, inputs.channels, inputs.image_hw,
        inputs.batch_shardings(), inputs.text_encoders, *encoder_args)
    graphdef, objective = program.graphdef, program.objective

    # ---- Samples for fixed prompts, from the EMA weights ---------------------------------------
    # Read from the text cache (--mode=encode stores the fixed prompts); a prompt missing there
    # loads the LLMs, which leave device memory before the train state is allocated.
    sampler = sampling.FixedPromptSampler(config, graphdef, objective, inputs, mesh)
    # Shapes scores and a fixed-noise validation loss every eval.every steps (0: off); its
    # prompts are encoded here too, before the LLMs are released.
    evaluator = (during_training.TrainingEval(config, graphdef, objective, inputs)
                 if config.eval.every else None)
    if inputs.cached is not None:
        inputs.release_encoders()

    # ---- Model, optimizer, EMA: restored or created, directly in their shards ----------------
    # Restored straight into the abstract state: the state is never allocated twice.
    checkpointer = checkpoint_lib.Checkpointer(workdir, config.checkpoint,
                                               remove_unfinished=True)
    restored = checkpointer.restore_latest(
        program.abstract_state, inputs.fingerprints(),
        allow_mismatch=config.text.allow_fingerprint_mismatch)
    if restored is not None:
        step, state, data_state, _ = restored
        inputs.set_state(data_state)
        logging.info("resumed from step %d", step)
    else:
        state = program.init_state()
        if config.train.init_from:  # A new run from another run's weights (train.init_from).
            state = init_from.initialize(state, graphdef, config, inputs.fingerprints())
    logging.info("trainable parameters: %d",
                 sum(x.size for x in jax.tree.leaves(state.params)))
    start_step = int(state.step)

    # ---- Loop -------------------------------------------------------------------------------------
    writer = metrics_lib.MetricsWriter(workdir, config.logging.tensorboard)
    timer = metrics_lib.StepTimer()
    profile = _ProfileWindow(config, workdir)
    progress = tqdm.tqdm(total=config.train.steps, initial=start_step, dynamic_ncols=True,
                         disable=not config.logging.progress_bar or jax.process_index() != 0)
    nan_guard = _NonFiniteGuard(config.train.nan_policy, int(state.skipped_steps), start_step,
                                checkpointer.directory)
    log = _DeferredLog(writer, timer, nan_guard, progress, config.train.batch_size,
                       program.model_flops_per_step)
    step = start_step
    try:
        with jax.set_mesh(mesh), sharding.axis_rules(rules):
            while step < config.train.steps and not preemption.reached(step):
                profile.before_step(step)
                batch = inputs.next_batch()  # On the devices already (data.device_prefetch).
                timer.data_ready()
                state, step_metrics = program.step(state, batch, *encoder_args)
                step += 1
                timer.dispatched(step_metrics["loss"])
                last = step == config.train.steps
                if config.logging.record_ids:
                    writer.write_record_ids(step, inputs.global_record_ids())
                if step % config.train.log_every == 0 or last:
                    log.push(step, step_metrics, inputs.counters())
                else:
                    log.poll()
                progress.update(1)
                if step % config.train.sample_every == 0 or last:
                    sampler.write(step, state.ema_params, writer, workdir / "samples")
                    timer.skip()
                if evaluator and (step % config.eval.every == 0 or last):
                    evaluator.write(step, state.ema_params, writer)
                    timer.skip()
                if step % config.checkpoint.every == 0 or last:
                    # No checkpoint past a non-finite step under nan_policy=stop. The save waits
                    # for this step's state anyway, so reading its counter adds no wait.
                    nan_guard.check(step, state.skipped_steps)
                    checkpointer.save(step, state, inputs.get_state(), _meta(config, inputs))
                    timer.skip()
            # Before any final save: the last log step's metrics, and the guard up to `step`.
            log.flush()
            nan_guard.check(step, state.skipped_steps)
        preempted = step < config.train.steps  # Stopped early: preemption.
        if preempted:  # Waits instead when `step` is the checkpoint just saved (every N).
            logging.warning("preemption: saving step %d and exiting", step)
            checkpointer.save(step, state, inputs.get_state(), _meta(config, inputs), force=True)
    finally:
        # Also on an exception: an async save in flight completes before the process ends.
        checkpointer.close()
        profile.close()
        writer.close()
        progress.close()
        inputs.close()
    return preempted  # lidit_jax.main then exits with train.preemption_exit_code.


class _DeferredLog:
    """Writes a log step's metrics once the device has computed them, never waiting for them then.

    Reading step n's values at step n would wait until the device has run every step dispatched
    so far: its queue would drain, and stay empty until the host dispatches the next step. They
    wait here instead, written as soon as `poll` finds them ready (`is_ready()`, never blocking)
    or at the next log step (`push`), when the device has had a whole log interval to compute
    them: MaxText writes step n's metrics one log step later too. Each line's timing fields are
    those of the interval that ends at its own step. `flush` writes the last ones.
    """

    def __init__(self, writer, timer, nan_guard, progress, examples_per_step, flops_per_step):
        self.writer, self.timer, self.nan_guard, self.progress = writer, timer, nan_guard, progress
        self.examples_per_step, self.flops_per_step = examples_per_step, flops_per_step
        self._pending = None  # (step, metrics on the devices, host-side scalars)

    def push(self, step, step_metrics, counters):
        if self._pending is not None:
            self._write()
            self.timer.synced()  # Waited only if the device ran a whole interval behind.
        scalars = self.timer.summary(self.examples_per_step, self.flops_per_step)
        self._pending = (step, step_metrics, {**scalars, **counters})

    def poll(self):
        if self._pending is not None and all(x.is_ready()
                                             for x in jax.tree.leaves(self._pending[1])):
            self._write()

    def flush(self):
        if self._pending is not None:
            self._write()

    def _write(self):
        step, step_metrics, host_scalars = self._pending
        self._pending = None
        step_metrics = jax.device_get(step_metrics)
        # A checkpoint since `step` checked the counter already; this check then does nothing.
        self.nan_guard.check(step, step_metrics["skipped_steps"])
        scalars = {k: v for k, v in step_metrics.items() if k != "finite"}
        scalars.update(host_scalars)
        self.writer.write_scalars(step, scalars)
        self.progress.set_postfix(
            loss=f"{scalars['loss']:.4f}", img_s=f"{scalars['images_per_sec']:.1f}",
            tflops=f"{scalars.get('tflops_per_device', 0.0):.3f}",
            mfu=f"{scalars.get('mfu', 0.0):.1%}")


class _NonFiniteGuard:
    """train.nan_policy=stop: raises when a step since the last check skipped its update.

    Reads the state's cumulative skipped-step counter (the train step counts every non-finite
    step and keeps its update out of the state), so checking only at log and checkpoint steps
    misses none and costs no per-step sync. A check of a step at or before the last one checked
    does nothing: the later check covered it (a checkpoint overtakes a deferred log step).
    """

    def __init__(self, policy, skipped, step, directory):
        self.policy, self.skipped, self.step, self.directory = policy, skipped, step, directory

    def check(self, step, skipped):
        if step <= self.step:
            return
        skipped = int(skipped)
        if self.policy == "stop" and skipped > self.skipped:
            where = (f"at step {step}" if step == self.step + 1
                     else f"in steps {self.step + 1}..{step}")
            raise NonFiniteLoss(f"non-finite loss or gradient {where}; the last checkpoint in "
                                f"{self.directory} is clean")
        self.skipped, self.step = skipped, step


def _meta(config, inputs):
    return {"config": json.loads(config.to_json_best_effort()),
            "fingerprints": inputs.fingerprints()}


class _ProfileWindow:
    """A jax.profiler trace of the steps [logging.profile_start, + logging.profile_steps) into
    WORKDIR/profile; a run that ends inside the window still writes its trace (`close`). The
    profiler writes local files, so a remote workdir gets the trace uploaded at the end."""

    def __init__(self, config, workdir):
        self.start, self.steps = config.logging.profile_start, config.logging.profile_steps
        self.target = workdir / "profile"
        self.local = None
        self.tracing = False

    def before_step(self, step):
        if step == self.start:
            if paths.is_remote(self.target):
                self.local = tempfile.mkdtemp(prefix="lidit_profile_")
            jax.profiler.start_trace(self.local or str(self.target))
            self.tracing = True
        elif self.tracing and step == self.start + self.steps:
            self.close()

    def close(self):
        if self.tracing:
            jax.profiler.stop_trace()
            self.tracing = False
            if self.local is not None:
                paths.upload(self.local, self.target)
