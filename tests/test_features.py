"""Multi-layer text features (text/features.py): what each `text.llms.<name>.layer` choice feeds
the denoiser, the learned LayerPool, the text cache of each choice and its metadata check, and
the config's refusals."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import common
from lidit_jax import configuration
from lidit_jax.data import array_cache, pipeline
from lidit_jax.text import cache as text_cache
from lidit_jax.text import features
from lidit_jax.text.encoder import PromptEncoder
from lidit_jax.text.refiner import TextConditioner

NUM_CAPTIONS = 8


def _states(num=5, shape=(2, 3, 4), seed=0):
    rng = np.random.default_rng(seed)
    # Different scales per layer, as in an LLM's residual stream.
    return [jnp.asarray(rng.normal(size=shape) * (1 + 10 * i), jnp.float32) for i in range(num)]


def _rms_normed(x):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6)


def test_select_each_choice():
    states = _states()
    host = [np.asarray(s) for s in states]
    np.testing.assert_array_equal(features.select(states, -3, "concat"), host[-3])
    np.testing.assert_array_equal(features.select(states, (-1, -3), "concat"),
                                  np.concatenate([host[-1], host[-3]], axis=-1))
    np.testing.assert_allclose(features.select(states, (-1, -3), "mean"),
                               (host[-1] + host[-3]) / 2, rtol=1e-6)
    np.testing.assert_allclose(features.select(states, "all_norm_avg", "concat"),
                               np.mean([_rms_normed(h) for h in host], axis=0), rtol=1e-5,
                               atol=1e-6)
    assert features.select(states, "attention_pool", "concat").shape == (2, 3, 5, 4)
    doubled = features.select(states, (0, 1), "mean", final_norm=lambda s: 2 * s)
    np.testing.assert_allclose(doubled, host[0] + host[1], rtol=1e-6)
    assert [features.feature_width(c, m, 4) for c, m in
            [(-3, "concat"), ((-1, -3), "concat"), ((-1, -3), "mean"), ("all_norm_avg", "concat"),
             ("attention_pool", "concat")]] == [4, 8, 4, 4, 4]


def test_layer_pool_starts_as_all_norm_avg_and_learns():
    states = _states()
    stacked = features.select(states, "attention_pool", "concat")
    pool = features.LayerPool(4)
    np.testing.assert_allclose(pool(stacked), features.select(states, "all_norm_avg", "concat"),
                               rtol=1e-5, atol=1e-6)
    target = np.asarray(_rms_normed(np.asarray(states[2])))  # Learnable: pick one layer.

    def loss(model):
        return jnp.mean((model(stacked) - target) ** 2)

    start = loss(pool)
    for _ in range(20):
        grads = nnx.grad(loss)(pool)
        assert np.abs(np.asarray(grads.query[...])).sum() > 0
        pool.query[...] = pool.query[...] - 1.0 * grads.query[...]
    assert loss(pool) < 0.9 * start


def test_text_conditioner_owns_a_trainable_pool_per_pooled_branch():
    config = common.get_config()
    config.text.encoders, config.text.fusion = "smollm2,gemma3", "concat"
    config.text.llms.gemma3.layer = "attention_pool"
    model = TextConditioner(config.text, [24, 16], 32, rngs=nnx.Rngs(0))
    assert list(model.layer_pools.keys()) == ["1"]
    rng = np.random.default_rng(0)
    states = [jnp.asarray(rng.normal(size=(2, 6, 24))), jnp.asarray(rng.normal(size=(2, 6, 4, 16)))]
    masks = [jnp.ones((2, 6), bool)] * 2
    tokens, token_mask, pooled = model(states, masks, masks, jnp.zeros((2, 32)))
    assert tokens.shape == (2, 12, 32) and np.isfinite(np.asarray(tokens)).all()
    params = nnx.state(model, nnx.Param)
    assert params["layer_pools"]["1"]["query"][...].shape == (16,)


@pytest.mark.parametrize("layer,combine,needle", [
    ("last", "concat", "expected an int"),
    ([], "concat", "non-empty"),
    ([-1, -1], "concat", "twice"),
    ([-1, -2], "sum", "layer_combine='sum'"),
    (1.5, "concat", "expected an int"),
])
def test_config_refuses_bad_layer_choices(layer, combine, needle):
    config = common.get_config()
    config.text.llms.smollm2.layer = layer
    config.text.llms.smollm2.layer_combine = combine
    with pytest.raises(configuration.ConfigError, match=rf"text\.llms\.smollm2\..*{needle}"):
        configuration.validate(config)


def _config(tiny_llm, cache_dir, layer, combine="concat"):
    config = common.get_config()
    config.text.llms.smollm2.update(path=str(tiny_llm), width=0, layer=layer,
                                    layer_combine=combine)
    config.text.use_chat_template = False
    config.text.max_length = 48
    config.text.cache_dir = str(cache_dir)
    config.data.shapes_num_records = NUM_CAPTIONS
    return config


@pytest.mark.parametrize("layer,combine,num_states", [
    ((-1, -3), "concat", None), ("attention_pool", "concat", 3)])
def test_cache_stores_what_the_choice_needs(tiny_llm, tmp_path, layer, combine, num_states):
    config = _config(tiny_llm, tmp_path, layer, combine)
    with pytest.raises(configuration.ConfigError, match="outside the 3 hidden states"):
        PromptEncoder("smollm2", _config(tiny_llm, tmp_path, [-4]).text.llms.smollm2,
                      config.text)
    encoder = PromptEncoder("smollm2", config.text.llms.smollm2, config.text)
    source = pipeline.make_source(config.data)
    text_cache.write_text_cache(encoder, config, str(tmp_path), source.caption, NUM_CAPTIONS)
    reader = text_cache.CachedTextStates(
        str(tmp_path / "smollm2"), config.text.max_length,
        expected=text_cache.expected_metadata(encoder, config, NUM_CAPTIONS))
    cached = reader.lookup(np.arange(4), np.zeros(4, bool))
    online = np.asarray(encoder.encode([source.caption(i) for i in range(4)])["states"])
    assert cached["states"].shape == online.shape
    assert online.shape[2:] == ((num_states, 32) if num_states else (64,))
    mask = cached["mask"]
    np.testing.assert_allclose(cached["states"][mask].astype(np.float32),
                               online[mask].astype(np.float32), rtol=2 ** -7, atol=1e-3)
    # Another combination of the same layers reads other states: refused, naming the field.
    other = _config(tiny_llm, tmp_path, (-1, -3), "mean" if combine == "concat" else "concat")
    other_encoder = PromptEncoder("smollm2", other.text.llms.smollm2, other.text)
    with pytest.raises(array_cache.CacheMismatch, match=r"\blayer: cache has"):
        text_cache.CachedTextStates(str(tmp_path / "smollm2"), other.text.max_length,
                                    expected=text_cache.expected_metadata(other_encoder, other,
                                                                          NUM_CAPTIONS))


def test_command_line_sets_lists_and_names():
    """`--config.text.llms.<name>.layer=[-1,-3]` / `=all_norm_avg` parse (configs/common.py)."""
    from ml_collections import config_flags
    parser = config_flags.config_flags._FIELD_TYPE_TO_PARSER[object]
    assert parser.parse("[-1,-3]") == [-1, -3]
    assert parser.parse("all_norm_avg") == "all_norm_avg"
    assert parser.parse("-2") == -2


def test_describe_widths_follow_the_choice_and_compile_refuses_attention_pool():
    from lidit_jax import aot_compile
    config = common.get_config()
    config.text.llms.smollm2.layer = [-1, -3]
    assert configuration.llm_widths_from_config(config) == [2 * 576]
    config.text.llms.smollm2.layer_combine = "mean"
    assert configuration.llm_widths_from_config(config) == [576]
    config.text.llms.smollm2.layer = "attention_pool"
    assert configuration.llm_widths_from_config(config) == [576]
    with pytest.raises(configuration.ConfigError, match=r"smollm2\.layer='attention_pool'"):
        aot_compile.compile_train_step(config, jax.devices()[:1])
