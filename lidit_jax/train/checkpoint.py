"""Orbax checkpoints of the train state, the data iterator position and the run's identity.

Each step directory holds three items:
  state: the TrainState (parameters, optimizer, EMA, step, RNG), sharded arrays.
  data:  the input iterator's state (JSON), so a resumed run sees exactly the same records.
  meta:  the config and the frozen encoders' fingerprints (LLM id, weights hash, layer, template;
         VAE hash). A run refuses to resume from a checkpoint made with different encoders unless
         `text.allow_fingerprint_mismatch` is set.
Saves are asynchronous; Orbax writes into a temporary directory and renames it when complete, so
a kill mid-save never leaves a half checkpoint under a step name.
Every process restores the same step (`restore_latest`): a step that some process cannot read
because it is damaged (a missing, truncated or corrupt file) is skipped by all of them, with a
warning; a transient storage error is retried on the same step by all of them.
The workdir may be local or gs:// (Orbax writes arrays through tensorstore, the rest through
etils.epath).
"""
import json
import re
import time

import jax
import orbax.checkpoint as ocp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from lidit_jax import paths


# Seconds before each retry of a step that failed with a transient storage error on some
# process; tensorstore has already retried each request by then. Then the restore raises.
TRANSIENT_RETRY_DELAYS = (10, 60)
# Tensorstore status codes of a failed read that says nothing about the checkpoint itself
# (ABORTED: tensorstore's own retries ran out, e.g. the server refused the connection).
_TRANSIENT_STATUS = re.compile(
    r"\b(UNAVAILABLE|DEADLINE_EXCEEDED|RESOURCE_EXHAUSTED|ABORTED|CANCELLED):")
# One process's attempt to read a step; the highest over all processes decides what all do.
_RESTORED, _TRANSIENT, _DAMAGED, _MISMATCH = range(4)


class FingerprintMismatch(ValueError):
    """The checkpoint was made with other frozen encoders than the config asks for."""


class Checkpointer:
    """Keeps the last `checkpoint.keep` checkpoints plus every `keep_period`-th step."""

    def __init__(self, workdir, checkpoint_config, *, remove_unfinished=False):
        """remove_unfinished: delete what an interrupted save left, and the steps newer than
        the one `restore_latest` restored (they cannot be restored, and would block the saves
        of their steps). The training run does; `sample` and `export` must not, a run may be
        saving into the same workdir."""
        options = ocp.CheckpointManagerOptions(
            max_to_keep=checkpoint_config.keep,
            keep_period=checkpoint_config.keep_period or None,
            enable_async_checkpointing=checkpoint_config.async_save,
            create=True,
        )
        self.directory = paths.path(workdir) / "checkpoints"
        self.remove_unfinished = remove_unfinished
        if remove_unfinished:
            if jax.process_index() == 0:
                remove_unfinished_steps(self.directory)
            if jax.process_count() > 1:  # Nobody lists the steps while process 0 deletes.
                multihost_utils.sync_global_devices("lidit_jax checkpoint cleanup")
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "meta"))

    def save(self, step, state, data_state, meta, *, force=False):
        """Starts saving `step` (async); returns whether a save was started.

        A step already saved, or still being saved, is not saved again: this waits for it
        instead. A preemption right after an every-N checkpoint asks for exactly that (the
        loop's final forced save of the step it just saved); Orbax would raise
        StepAlreadyExistsError, and a run that exits non-zero is not requeued by SLURM.
        """
        if step in self.manager.all_steps():
            self.manager.wait_until_finished()
            return False
        return self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                    data=ocp.args.JsonSave(data_state),
                                    meta=ocp.args.JsonSave(meta)),
            force=force,
        )

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()

    def restore_latest(self, abstract_state, expected_fingerprints, allow_mismatch=False):
        """(step, state, data_state, meta) of the newest restorable checkpoint, or None if none.

        `abstract_state` is a tree of jax.ShapeDtypeStruct with shardings: arrays are restored
        directly into their shards, and nothing else is allocated. A dict naming some of the
        TrainState's fields (`ema_only`) restores just those and returns that dict.

        Each process reads only its own shards, so one process can fail where the others
        succeed; restoring different steps would mix shards of two steps or hang at the first
        collective. After each attempt the processes agree (one all-gather of a status each):
        all restored, or all try again: the same step after a transient storage error
        (TRANSIENT_RETRY_DELAYS, then raise: an outage is no reason to lose steps), the previous
        step if the step is damaged for any of them. Raises if steps exist but none restores: a
        fresh start would not save until it passed the newest step's number.
        """
        if isinstance(abstract_state, dict):
            state_args = ocp.args.PyTreeRestore(
                item=abstract_state, partial_restore=True,
                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))
        else:
            state_args = ocp.args.StandardRestore(abstract_state)
        steps = sorted(self.manager.all_steps(), reverse=True)
        # The item handlers, not the manager: its restore ends in a barrier (a collective) that
        # a process whose read raised skips, so the others' barrier would meet its agreement.
        handler = ocp.CompositeCheckpointHandler()
        try:
            for step in steps:
                for delay in (*TRANSIENT_RETRY_DELAYS, None):
                    outcome, result = self._read_step(handler, step, state_args,
                                                      expected_fingerprints, allow_mismatch)
                    outcomes = self._agree(step, outcome)
                    if max(outcomes) == _RESTORED:
                        self._remove_newer_than(step, steps)
                        return step, result["state"], result["data"], result["meta"]
                    failed = [i for i, o in enumerate(outcomes) if o != _RESTORED]
                    if max(outcomes) == _MISMATCH:
                        if outcome == _MISMATCH:
                            raise result
                        raise FingerprintMismatch(
                            f"process(es) {failed} found checkpoint step {step} in "
                            f"{self.directory} made with different frozen encoders (their logs "
                            "name the fields; --config.text.allow_fingerprint_mismatch=True "
                            "resumes anyway)")
                    result = None  # This process's copy goes before the next attempt.
                    if max(outcomes) == _DAMAGED:
                        logging.warning("checkpoint step %d in %s is damaged for process(es) "
                                        "%s; every process tries the previous one", step,
                                        self.directory, failed)
                        break
                    if delay is None:
                        raise RuntimeError(
                            f"checkpoint step {step} in {self.directory} could not be read by "
                            f"process(es) {failed} after {len(TRANSIENT_RETRY_DELAYS) + 1} "
                            "attempts (transient storage errors, in their logs); restart the "
                            "run when the storage answers")
                    logging.warning("checkpoint step %d: transient read error on process(es) "
                                    "%s; every process retries it in %d s", step, failed, delay)
                    time.sleep(delay)
        finally:
            handler.close()
        if steps:
            raise RuntimeError(
                f"none of the checkpoint steps {steps} in {self.directory} can be restored (each "
                "process logged why: damage, or a model config other than the checkpoint's); "
                "fix the config, or move the directory away to start over")
        return None

    def _remove_newer_than(self, step, steps):
        """The steps restore_latest skipped go (remove_unfinished): the run recomputes them."""
        for newer in steps if self.remove_unfinished else ():
            if newer > step:
                logging.warning("deleting checkpoint step %d in %s: it cannot be restored, and "
                                "this run recomputes it", newer, self.directory)
                self.manager.delete(newer)

    def _read_step(self, handler, step, state_args, expected_fingerprints, allow_mismatch):
        """(outcome, restored items) of this process's attempt to read `step`; on failure the
        second element is the exception."""
        directory = self.directory / str(step)
        try:
            meta = handler.restore(directory, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore()))["meta"]
            check_fingerprints(meta.get("fingerprints", {}), expected_fingerprints,
                               allow_mismatch)
            restored = handler.restore(directory, args=ocp.args.Composite(
                state=state_args, data=ocp.args.JsonRestore()))
        except FingerprintMismatch as e:
            return _MISMATCH, e
        except Exception as e:  # noqa: BLE001 - classified here, agreed on by all processes.
            transient = is_transient(e)
            root = list(_causes(e))[-1]  # Orbax's wrapper names the array, its cause the why.
            logging.warning("checkpoint step %d in %s cannot be read by this process (%s; %s: "
                            "%s; %s: %s)", step, self.directory,
                            "transient" if transient else "damaged", type(e).__name__,
                            str(e)[:200], type(root).__name__, str(root)[:300])
            return (_TRANSIENT if transient else _DAMAGED), e
        return _RESTORED, {"state": restored["state"], "data": restored["data"], "meta": meta}

    def _agree(self, step, outcome):
        """Every process's outcome for `step`, by process index (one all-gather)."""
        gathered = np.asarray(multihost_utils.process_allgather(
            np.array([step, outcome], np.int32))).reshape(-1, 2)
        if (gathered[:, 0] != step).any():  # Their listings of the directory differ.
            raise RuntimeError(f"the processes tried different checkpoint steps "
                               f"{gathered[:, 0].tolist()} in {self.directory}")
        return gathered[:, 1].tolist()


def is_transient(error):
    """Whether a failed read says nothing about the checkpoint (retry it) rather than that the
    step is damaged: a timeout, a refused connection, or one of tensorstore's transient status
    codes, anywhere in the chain of causes."""
    return any(isinstance(e, (TimeoutError, ConnectionError)) or _TRANSIENT_STATUS.search(str(e))
               for e in _causes(error))


def _causes(error):
    """The error, then what caused it, down to the first."""
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def check_fingerprints(saved, expected, allow_mismatch=False):
    """Raises FingerprintMismatch naming each encoder field that differs."""
    differences = []
    for name in sorted(set(saved) | set(expected)):
        old, new = saved.get(name), expected.get(name)
        if old != new:
            differences.append(f"{name}: checkpoint {json.dumps(old)} vs config {json.dumps(new)}")
    if differences and not allow_mismatch:
        raise FingerprintMismatch(
            "the checkpoint was made with different frozen encoders (set "
            "--config.text.allow_fingerprint_mismatch=True to resume anyway): "
            + "; ".join(differences))
    for difference in differences:
        logging.warning("encoder fingerprint differs, resuming anyway: %s", difference)


def remove_unfinished_steps(directory):
    """Deletes the step directories a killed save left behind; returns their names.

    Locally Orbax saves into `<step>.orbax-checkpoint-tmp-*` and renames it when complete; gs://
    has no rename, so Orbax writes into `<step>/` and marks it complete with commit_success.txt.
    Either leftover would collide with the next save of that step. (Orbax's own
    `cleanup_tmp_directories` deletes in a background thread while the manager lists the steps;
    on gs:// the listing then sees the folder and fails once its last object is gone.)
    """
    directory = paths.path(directory)
    if not directory.exists():
        return []
    remote = paths.is_remote(directory)
    removed = []
    for child in directory.iterdir():
        unfinished = ("orbax-checkpoint-tmp" in child.name
                      or (remote and child.name.isdigit()
                          and not (child / "commit_success.txt").exists()))
        if unfinished:
            logging.warning("removing the unfinished checkpoint %s (a save was interrupted)",
                            child)
            child.rmtree()
            removed.append(child.name)
    return removed


def encoder_fingerprints(encoders, image_space):
    """The frozen encoders' identity a checkpoint records and a resume compares (one place)."""
    out = {encoder.name: encoder.metadata() for encoder in encoders}
    out["image_space"] = image_space.fingerprint
    return out


def ema_only(abstract_state):
    """The restore target for inference: {"ema_params": ...}; parameters, optimizer moments and
    counters stay on disk (a partial restore), so they never reach the devices."""
    return {"ema_params": abstract_state.ema_params}


def abstract_like(state):
    """ShapeDtypeStructs with the shardings of `state`, the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
