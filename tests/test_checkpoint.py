"""Checkpoints: round trip with the data position, fallback past a damaged step, fingerprints,
a forced save of a step already saved, transient errors told from damage. Several processes
agreeing on the step: tests/test_preemption.py."""
import glob
import os
import socket

import jax
import numpy as np
import pytest
import tensorstore as ts

from lidit_jax.train import checkpoint as checkpoint_lib
from lidit_jax.train.program import abstract_model
from train_helpers import LLM_WIDTH, make_mesh, tiny_config

FINGERPRINTS = {"smollm2": {"llm": "llama:tiny", "fingerprint": "abc", "layer": -3}}


def make_state(config, mesh, seed=0):
    config.seed = seed
    return abstract_model(config, mesh, [LLM_WIDTH], 3).init_state()


def save_steps(tmp_path, config, mesh, steps):
    checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), config.checkpoint)
    states = {}
    for step in steps:
        states[step] = make_state(config, mesh, seed=step)
        checkpointer.save(step, states[step], {"next_index": step * 10},
                          {"fingerprints": FINGERPRINTS})
    checkpointer.close()
    return states


def damage(tmp_path, step):
    """Truncates every data file of `step`'s train state to a third."""
    pattern = str(tmp_path / "checkpoints" / str(step) / "state" / "**" / "*")
    damaged = [f for f in glob.glob(pattern, recursive=True)
               if os.path.isfile(f) and os.path.getsize(f) > 64]
    assert damaged
    for path in damaged:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 3)


def assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_round_trip_restores_state_and_data_position(tmp_path):
    config, mesh = tiny_config(), make_mesh(2, 2, 2)
    states = save_steps(tmp_path, config, mesh, [1, 2])
    checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), config.checkpoint)
    step, state, data_state, meta = checkpointer.restore_latest(
        checkpoint_lib.abstract_like(states[2]), FINGERPRINTS)
    assert step == 2 and data_state == {"next_index": 20}
    assert_same(state, states[2])
    leaf = jax.tree.leaves(state.params)[0]
    assert leaf.sharding == jax.tree.leaves(states[2].params)[0].sharding


@pytest.mark.slow
def test_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path):
    config, mesh = tiny_config(), make_mesh(1, 1, 1)
    states = save_steps(tmp_path, config, mesh, [1, 2])
    damage(tmp_path, 2)
    checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), config.checkpoint)
    step, state, data_state, _ = checkpointer.restore_latest(
        checkpoint_lib.abstract_like(states[1]), FINGERPRINTS)
    assert step == 1 and data_state == {"next_index": 10}
    assert_same(state, states[1])


@pytest.mark.slow
def test_the_training_run_replaces_a_damaged_step_it_fell_back_past(tmp_path):
    # Left on disk, step 2 would block the resumed run's save of step 2 (Orbax skips a step at
    # or below the newest) and be the newest again at the next restart.
    config, mesh = tiny_config(), make_mesh(1, 1, 1)
    states = save_steps(tmp_path, config, mesh, [1, 2])
    damage(tmp_path, 2)
    checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), config.checkpoint,
                                               remove_unfinished=True)
    step, state, _, _ = checkpointer.restore_latest(
        checkpoint_lib.abstract_like(states[1]), FINGERPRINTS)
    assert step == 1 and checkpointer.manager.all_steps() == [1]
    assert checkpointer.save(2, state, {"next_index": 20}, {"fingerprints": FINGERPRINTS})
    checkpointer.close()


def test_no_restorable_step_is_an_error_not_a_fresh_start(tmp_path):
    # A fresh start would not save again until it passed step 1: Orbax skips lower steps.
    config, mesh = tiny_config(), make_mesh(1, 1, 1)
    states = save_steps(tmp_path, config, mesh, [1])
    damage(tmp_path, 1)
    checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), config.checkpoint)
    with pytest.raises(RuntimeError, match=r"none of the checkpoint steps \[1\]"):
        checkpointer.restore_latest(checkpoint_lib.abstract_like(states[1]), FINGERPRINTS)


def test_forced_save_of_a_step_saved_or_in_flight_waits_instead_of_raising(tmp_path):
    # A preemption right after an every-N checkpoint: the loop's final forced save asks for the
    # step again (Orbax raised StepAlreadyExistsError, and the run exited non-zero).
    config, mesh = tiny_config(), make_mesh(1, 1, 1)
    state = make_state(config, mesh)
    checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), config.checkpoint)
    assert checkpointer.save(1, state, {"next_index": 10}, {"fingerprints": FINGERPRINTS})
    assert not checkpointer.save(1, state, {"next_index": 10}, {"fingerprints": FINGERPRINTS},
                                 force=True)
    assert (tmp_path / "checkpoints" / "1" / "commit_success.txt").exists()  # It waited.
    checkpointer.close()
    # Resumed at step 1 and preempted before its first step: the step is on disk.
    checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), config.checkpoint)
    assert not checkpointer.save(1, state, {"next_index": 10}, {"fingerprints": FINGERPRINTS},
                                 force=True)
    checkpointer.close()


def test_a_refused_connection_is_transient_and_a_truncated_file_is_damage(tmp_path):
    with socket.socket() as s:  # A port nobody listens on.
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    retries = ts.Context({"http_request_retries": {"max_retries": 1, "initial_delay": "1ms"}})
    store = ts.KvStore.open({"driver": "http", "base_url": f"http://127.0.0.1:{port}/"},
                            context=retries).result()
    with pytest.raises(ValueError) as refused:
        store.read("x").result()
    assert checkpoint_lib.is_transient(refused.value)
    try:  # Wrapped, as Orbax's restore may: the cause still counts.
        raise RuntimeError("restore failed") from refused.value
    except RuntimeError as wrapped:
        assert checkpoint_lib.is_transient(wrapped)

    spec = {"driver": "zarr", "kvstore": f"file://{tmp_path}/array"}
    array = ts.open(spec, create=True, dtype=ts.float32, shape=[256]).result()
    array.write(np.arange(256, dtype=np.float32)).result()
    chunk = tmp_path / "array" / "0"
    with open(chunk, "r+b") as f:
        f.truncate(os.path.getsize(chunk) // 3)
    with pytest.raises(ValueError) as truncated:
        ts.open(spec).result().read().result()
    assert not checkpoint_lib.is_transient(truncated.value)


@pytest.mark.slow
def test_other_text_encoder_is_refused(tmp_path):
    config, mesh = tiny_config(), make_mesh(1, 1, 1)
    states = save_steps(tmp_path, config, mesh, [1])
    other = {"smollm2": dict(FINGERPRINTS["smollm2"], layer=-2)}
    checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), config.checkpoint)
    with pytest.raises(checkpoint_lib.FingerprintMismatch, match='"layer": -3.*"layer": -2'):
        checkpointer.restore_latest(checkpoint_lib.abstract_like(states[1]), other)
    step, *_ = checkpointer.restore_latest(checkpoint_lib.abstract_like(states[1]), other,
                                           allow_mismatch=True)
    assert step == 1


def test_remove_unfinished_steps_keeps_finished_ones(tmp_path):
    directory = tmp_path / "checkpoints"
    (directory / "8").mkdir(parents=True)
    (directory / "12.orbax-checkpoint-tmp-1795983775").mkdir()  # A save killed mid-way.
    assert checkpoint_lib.remove_unfinished_steps(directory) == [
        "12.orbax-checkpoint-tmp-1795983775"]
    assert sorted(p.name for p in directory.iterdir()) == ["8"]
    assert checkpoint_lib.remove_unfinished_steps(tmp_path / "missing") == []


def test_ema_only_restore_reads_just_the_ema(tmp_path):
    config, mesh = tiny_config(), make_mesh(2, 2, 2)
    states = save_steps(tmp_path, config, mesh, [3])
    checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), config.checkpoint)
    target = checkpoint_lib.ema_only(checkpoint_lib.abstract_like(states[3]))
    step, restored, _, _ = checkpointer.restore_latest(target, FINGERPRINTS)
    checkpointer.close()
    assert step == 3 and list(restored) == ["ema_params"]
    assert_same(restored["ema_params"], states[3].ema_params)
