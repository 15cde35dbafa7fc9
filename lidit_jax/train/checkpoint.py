"""Orbax checkpoints of the train state, the data iterator position and the run's identity.

Each step directory holds three items:
  state: the TrainState (parameters, optimizer, EMA, step, RNG), sharded arrays.
  data:  the input iterator's state (JSON), so a resumed run sees exactly the same records.
  meta:  the config and the frozen encoders' fingerprints (LLM id, weights hash, layer, template;
         VAE hash). A run refuses to resume from a checkpoint made with different encoders unless
         `text.allow_fingerprint_mismatch` is set.
Saves are asynchronous; Orbax writes into a temporary directory and renames it when complete, so
a kill mid-save never leaves a half checkpoint under a step name. A step directory damaged later
(e.g. a truncated file) fails to restore and the previous step is used, with a warning.
The workdir may be local or gs:// (Orbax writes arrays through tensorstore, the rest through
etils.epath).
"""
import json

import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from lidit_jax import paths


class FingerprintMismatch(ValueError):
    """The checkpoint was made with other frozen encoders than the config asks for."""


class Checkpointer:
    """Keeps the last `checkpoint.keep` checkpoints plus every `keep_period`-th step."""

    def __init__(self, workdir, checkpoint_config, *, remove_unfinished=False):
        """remove_unfinished: delete what an interrupted save left (the training run does;
        `sample` and `export` must not, a run may be saving into the same workdir)."""
        options = ocp.CheckpointManagerOptions(
            max_to_keep=checkpoint_config.keep,
            keep_period=checkpoint_config.keep_period or None,
            enable_async_checkpointing=checkpoint_config.async_save,
            create=True,
        )
        self.directory = paths.path(workdir) / "checkpoints"
        if remove_unfinished:
            if jax.process_index() == 0:
                remove_unfinished_steps(self.directory)
            if jax.process_count() > 1:  # Nobody lists the steps while process 0 deletes.
                multihost_utils.sync_global_devices("lidit_jax checkpoint cleanup")
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "meta"))

    def save(self, step, state, data_state, meta, *, force=False):
        """Starts saving `step` (async); returns whether a save was started."""
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
        """
        if isinstance(abstract_state, dict):
            state_args = ocp.args.PyTreeRestore(
                item=abstract_state, partial_restore=True,
                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))
        else:
            state_args = ocp.args.StandardRestore(abstract_state)
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                meta = self.manager.restore(step, args=ocp.args.Composite(
                    meta=ocp.args.JsonRestore()))["meta"]
                check_fingerprints(meta.get("fingerprints", {}), expected_fingerprints,
                                   allow_mismatch)
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=state_args,
                    data=ocp.args.JsonRestore()))
            except FingerprintMismatch:
                raise
            except Exception as e:  # noqa: BLE001 - any damage means: try the previous one.
                logging.warning("checkpoint step %d in %s cannot be restored (%s: %s); "
                                "trying the previous one", step, self.directory,
                                type(e).__name__, str(e)[:300])
                continue
            return step, restored["state"], restored["data"], meta
        return None


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
