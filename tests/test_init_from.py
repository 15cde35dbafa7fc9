"""train.init_from (a new run from another run's weights) and the 1024 px stage config."""
import jax
import numpy as np
import pytest

from configs import lidit_10b
from lidit_jax import configuration
from lidit_jax.train.ema_safetensors import FORMAT, export_params
from lidit_jax.train import checkpoint as checkpoint_lib
from lidit_jax.train import init_from
from lidit_jax.train.program import abstract_model
from train_helpers import LLM_WIDTH, make_mesh, tiny_config


def _state(config, seed):
    config.seed = seed
    mesh = make_mesh(1, 1, 1)
    model = abstract_model(config, mesh, [LLM_WIDTH], 3)
    return model.graphdef, model.init_state()


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _assert_same(a, b):
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def _source_run(tmp_path):
    """A 'finished run': params and a different EMA (both moved off their init), checkpointed."""
    config = tiny_config()
    _, state = _state(config, seed=0)
    state = state.replace(
        step=state.step + 7,
        params=jax.tree.map(lambda x: x + 0.5, state.params),
        ema_params=jax.tree.map(lambda x: x - 0.25, state.ema_params))
    checkpointer = checkpoint_lib.Checkpointer(tmp_path / "source", config.checkpoint)
    checkpointer.save(7, state, {}, {"fingerprints": {}})
    checkpointer.close()
    return state


@pytest.mark.slow
@pytest.mark.parametrize("use_ema", [True, False])
def test_init_from_a_workdir_takes_weights_not_optimizer_or_step(tmp_path, use_ema):
    source = _source_run(tmp_path)
    config = tiny_config()
    config.train.init_from, config.train.init_from_ema = str(tmp_path / "source"), use_ema
    graphdef, fresh = _state(config, seed=1)
    started = init_from.initialize(fresh, graphdef, config, fingerprints={})
    _assert_same(started.params, source.params)
    _assert_same(started.ema_params, source.ema_params if use_ema else source.params)
    assert int(started.step) == 0
    _assert_same(started.opt_state, fresh.opt_state)
    _assert_same(started.rng, fresh.rng)


@pytest.mark.slow
def test_init_from_an_ema_export_sets_params_and_ema(tmp_path):
    source = _source_run(tmp_path)
    path = str(tmp_path / "ema.safetensors")
    export_params(source.ema_params, path, {"format": FORMAT, "step": 7})
    config = tiny_config()
    config.train.init_from = path
    graphdef, fresh = _state(config, seed=1)
    started = init_from.initialize(fresh, graphdef, config, fingerprints={})
    _assert_same(started.params, source.ema_params)
    _assert_same(started.ema_params, source.ema_params)
    assert int(started.step) == 0


def test_init_from_nothing_there_names_the_key(tmp_path):
    config = tiny_config()
    config.train.init_from = str(tmp_path / "missing")
    graphdef, fresh = _state(config, seed=1)
    with pytest.raises(ValueError, match="train.init_from"):
        init_from.initialize(fresh, graphdef, config, fingerprints={})


def test_1024_stage_validates_and_a_silent_image_size_is_refused():
    stage = lidit_10b.get_config("1024")
    configuration.validate(stage)
    assert stage.data.image_size == 1024 and "1024x1024" in stage.data.buckets
    configuration.validate(lidit_10b.get_config("offline,1024"))
    config = lidit_10b.get_config()
    config.data.image_size = 1024  # Over the 512 px buckets: was silently ignored.
    with pytest.raises(configuration.ConfigError, match="data.image_size=1024.*data.buckets"):
        configuration.validate(config)
