"""Checkpoints: round trip with the data position, fallback past a damaged step, fingerprints."""
import glob
import os

import jax
import numpy as np
import pytest
from flax import nnx

from lidit_jax.diffusion.dit import LIDiT
from lidit_jax.train import checkpoint as checkpoint_lib
from lidit_jax.train.state import create_train_state
from train_helpers import LLM_WIDTH, make_mesh, tiny_config

FINGERPRINTS = {"smollm2": {"llm": "llama:tiny", "fingerprint": "abc", "layer": -3}}


def make_state(config, mesh, seed=0):
    config.seed = seed
    constructor = lambda: LIDiT(config, [LLM_WIDTH], 3, rngs=nnx.Rngs(seed))  # noqa: E731
    return create_train_state(constructor, config, mesh)[1]


def save_steps(tmp_path, config, mesh, steps):
    checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), config.checkpoint)
    states = {}
    for step in steps:
        states[step] = make_state(config, mesh, seed=step)
        checkpointer.save(step, states[step], {"next_index": step * 10},
                          {"fingerprints": FINGERPRINTS})
    checkpointer.close()
    return states


def assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


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


def test_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path):
    config, mesh = tiny_config(), make_mesh(1, 1, 1)
    states = save_steps(tmp_path, config, mesh, [1, 2])
    damaged = [f for f in glob.glob(str(tmp_path / "checkpoints" / "2" / "state" / "**" / "*"),
                                    recursive=True) if os.path.isfile(f) and os.path.getsize(f) > 64]
    assert damaged
    for path in damaged:  # Truncate every data file of the newest step.
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 3)
    checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), config.checkpoint)
    step, state, data_state, _ = checkpointer.restore_latest(
        checkpoint_lib.abstract_like(states[1]), FINGERPRINTS)
    assert step == 1 and data_state == {"next_index": 10}
    assert_same(state, states[1])


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
