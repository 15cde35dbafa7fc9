"""text/in_step.py: the frozen LLMs inside the train step (text.cache_dir="").

Their states against the full forward's for every layer choice, the weights cut to the layers
those need, token ids cut to a length bucket, and the contract: training online matches
training from the text cache on the same batches.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo_shapes
from lidit_jax import encode
from lidit_jax.parallel import sharding
from lidit_jax.text import features
from lidit_jax.text.encoder import PromptEncoder
from lidit_jax.text.in_step import length_bucket
from lidit_jax.text.weights import load_llm
from lidit_jax.train import loop
from lidit_jax.train.inputs import TrainInputs
from lidit_jax.train import program as program_lib
from train_helpers import make_mesh

NUM_LAYERS = 4
CAPTIONS = ["a red circle on the left", "", "two small blue squares in the middle of the image"]


@pytest.fixture(scope="module")
def llm4(tmp_path_factory):
    """A random 4-layer Llama with an untied LM head + SmolLM2's tokenizer (conftest's tiny_llm
    has 2 layers: too few to tell layer -3 from the embeddings)."""
    import torch
    import transformers

    from lidit_jax.text import models

    gguf = models.default_model_path("smollm2")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
        num_hidden_layers=NUM_LAYERS, num_attention_heads=2, num_key_value_heads=1,
        tie_word_embeddings=False)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("llm4")
    transformers.LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def _config(path, layer=-3, layer_combine="concat", final_norm=False):
    config = demo_shapes.get_config()
    llm = config.text.llms.smollm2
    llm.path, llm.width, llm.layer = str(path), 0, layer
    llm.layer_combine, llm.final_norm = layer_combine, final_norm
    config.text.max_length = 48
    return config


def test_length_buckets_are_powers_of_two_up_to_max_length():
    assert [length_bucket(n, 56) for n in (1, 16, 17, 33, 40, 56)] == [16, 16, 32, 56, 56, 56]
    assert {length_bucket(n, 256) for n in range(1, 257)} == {16, 32, 64, 128, 256}


@pytest.mark.parametrize("layer,combine,final_norm,depth", [
    (-3, "concat", False, 2),  # The paper's choice: L-2 blocks.
    (0, "concat", False, 0),  # The embeddings: no block runs.
    (-1, "concat", False, 4),  # The last state, after the final norm.
    (-2, "concat", True, 3),
    ([1, -2], "concat", False, 3),
    ([1, 3], "mean", False, 3),
    ("all_norm_avg", "concat", False, 4),
    ("attention_pool", "concat", False, 4),
])
def test_states_equal_the_full_forward_from_only_the_layers_they_need(
        llm4, layer, combine, final_norm, depth):
    config = _config(llm4, layer, combine, final_norm)
    encoder = PromptEncoder("smollm2", config.text.llms.smollm2, config.text)
    assert encoder.choice.depth == depth
    llm = encoder.load()
    assert {x.shape[0] for x in jax.tree.leaves(llm.state["layers"])} == {depth}
    assert llm.state["lm_head"][...].size == 0  # Logits only: never kept.
    online = encoder.encode(CAPTIONS)

    full = load_llm(llm4)  # Every layer, transformers' output_hidden_states.
    tokens = encoder.tokenize(CAPTIONS)
    choice = features.parse(layer, combine, "text.llms.smollm2")
    reference = features.select(full.hidden_states(tokens["input_ids"], tokens["mask"]), choice,
                                combine, full.final_norm if final_norm else None)
    assert online["states"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(online["states"], np.float32),
                               np.asarray(reference.astype(jnp.bfloat16), np.float32),
                               rtol=2 ** -7, atol=1e-5)


@pytest.mark.slow
def test_train_step_runs_the_frozen_llm_sharded_on_the_global_mesh(llm4, tmp_path):
    config = _config(llm4)
    config.text.cache_dir = ""
    config.text.max_length = 128
    config.text.llms.smollm2.dtype = "bfloat16"
    config.model.depth, config.model.width, config.model.heads = 1, 32, 2
    config.text.refiner.depth, config.text.refiner.heads = 1, 2
    config.model.patch_size = 8
    config.data.shapes_num_records = 64
    config.data.device_prefetch = 0
    config.train.batch_size = 8
    config.mesh.data = 1
    config.mesh.fsdp = 2
    config.mesh.tensor = 2
    mesh = make_mesh(2, 2, 2)
    inputs = TrainInputs(config, str(tmp_path), mesh)
    batch = inputs.next_batch()
    ids = batch["text"][0]["input_ids"]
    # The shapes captions (<= 26 tokens) after the instruction's 25 shared tokens: those and a
    # bucket of 32 after them, not 128.
    prefix = inputs.encoders[0].prefix_ids
    assert len(prefix) == 25
    assert "states" not in batch["text"][0] and ids.dtype == jnp.int32 and ids.shape[1] == 25 + 32
    # The prefix's keys and values ride with the weights, on the global mesh (kv heads over
    # `tensor` where it divides them; the one kv head here is replicated), bf16.
    keys = inputs.encoder_params[0]["prefix"]["keys"]  # [layers run, prefix, kv, head_dim]
    assert keys.shape == (2, 25, 1, 16) and keys.sharding.mesh.shape == mesh.shape
    assert np.asarray(batch["text"][0]["mask"]).sum(1).max() > 32
    weights = jax.tree.leaves(inputs.encoder_params)
    assert any(not w.sharding.is_fully_replicated for w in weights)
    assert all(w.dtype == jnp.bfloat16 for w in weights)
    assert all(w.sharding.mesh.shape == mesh.shape for w in weights)  # The global mesh.

    program = program_lib.build(config, mesh, inputs.llm_widths, inputs.channels,
                                inputs.image_hw, inputs.batch_shardings(), inputs.text_encoders,
                                inputs.encoder_params)
    state = program.init_state()
    # The LLM is no trainable parameter: no optimizer moments, no EMA.
    assert not any(x.shape[-1] == NUM_LAYERS or x.size >= 49152 * 32
                   for x in jax.tree.leaves(state.params))
    step = program.step
    before = [np.asarray(w) for w in weights]
    with jax.set_mesh(mesh), sharding.axis_rules(config.mesh.rules):
        state, metrics = step(state, batch, inputs.encoder_params)
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
    for w, b in zip(jax.tree.leaves(inputs.encoder_params), before):  # Not donated, unchanged.
        np.testing.assert_array_equal(np.asarray(w), b)
    # The logged MFU counts the LLM's forward: 2 of its blocks over the 103 tokens after the
    # prefix of every caption at text.max_length, beside the DiT's step.
    dit = program_lib.build(config, mesh, inputs.llm_widths, inputs.channels, inputs.image_hw,
                            inputs.batch_shardings()).model_flops_per_step
    e, kv, f, tokens = 32, 16, 64, 128 - 25
    matmul = 2 * (2 * e * e + 2 * e * kv + 3 * e * f) * tokens + 4 * tokens * 128 * e
    assert program.model_flops_per_step - dit == pytest.approx(8 * 2 * matmul)
    inputs.close()


def _losses(workdir):
    with open(workdir / "metrics.jsonl") as f:
        return [json.loads(line)["loss"] for line in f]


@pytest.mark.slow
def test_online_training_matches_training_from_the_text_cache(tmp_path):
    """The Contract: --mode=train with text.cache_dir="" on the demo config trains, and its loss
    over 8 steps matches the cached path's on the same batches (both encode in float32, keep
    bf16 states) within 1e-2 relative."""
    def config_for(cache_dir):
        config = demo_shapes.get_config()  # SmolLM2-135M in float32, layer -3.
        config.text.cache_dir = cache_dir
        config.model.depth, config.model.width = 2, 64
        config.data.shapes_num_records = 64
        config.train.steps, config.train.batch_size, config.train.log_every = 8, 8, 1
        config.train.sample_every = 1000  # The last step still samples: one image per prompt.
        config.train.sample_prompts = ("a red circle",)
        config.train.samples_per_prompt = 1
        config.diffusion.sample_steps = 2
        config.eval.every = 0
        config.checkpoint.every = 1000
        config.logging.progress_bar = False
        return config

    cached, online = tmp_path / "cached", tmp_path / "online"
    encode.run(config_for("text_cache"), str(cached))
    loop.run(config_for("text_cache"), str(cached))
    loop.run(config_for(""), str(online))
    cached_losses, online_losses = _losses(cached), _losses(online)
    assert len(online_losses) == 8 and np.isfinite(online_losses).all()
    np.testing.assert_allclose(online_losses, cached_losses, rtol=1e-2)


def test_configured_shape_must_be_the_loaded_llms(tiny_llm):
    """The width and architecture that describe and compile use must be the weights' own."""
    from lidit_jax import configuration
    config = _config(tiny_llm)
    config.text.llms.smollm2.width = 576  # tiny_llm is 32 wide.
    with pytest.raises(configuration.ConfigError, match=r"width=576, but .* hidden size 32"):
        PromptEncoder.from_config(config, "smollm2")
    config.text.llms.smollm2.width, config.text.llms.smollm2.architecture = 0, "llama3-8b"
    with pytest.raises(configuration.ConfigError,
                       match=r"architecture='llama3-8b' does not match .*hidden_size 32"):
        PromptEncoder.from_config(config, "smollm2")


def test_templates_without_a_shared_prefix_run_the_full_forward(llm4):
    """Left padding, or an encoder that is not causal: no prefix cache (the reason is
    logged); with right padding the cached prefix is exactly the tokens every caption starts
    with, and tokenized alone they are the same ids."""
    from lidit_jax.text.encoder import shared_prefix
    config = _config(llm4)
    encoder = PromptEncoder("smollm2", config.text.llms.smollm2, config.text)
    tokens = encoder.tokenize(CAPTIONS + ["42 apples", "(a) note"])
    prefix = encoder.prefix_ids
    assert (tokens["input_ids"][:, :len(prefix)] == prefix).all()
    alone = encoder.template.tokenizer(encoder.template.prefix, add_special_tokens=False)
    assert list(alone["input_ids"])[:len(prefix)] == list(prefix)
    assert encoder.prefix_mismatches == 0
    config.text.padding_side = "left"
    left = PromptEncoder("smollm2", config.text.llms.smollm2, config.text)
    assert left.prefix_ids is None and left.load() and left.params["prefix"] == {}
    bert_like = object()  # Any config that is not a decoder LLM's.
    assert shared_prefix(encoder.template, bert_like) == (
        None, "not a causal LLM: every token's state depends on the caption")


@pytest.mark.slow
def test_smollm2_prefix_reuse_matches_the_full_forward():
    """The real SmolLM2-135M GGUF (bf16, layer -3) with the paper's instruction in its chat
    template: the states with the template prefix's keys and values computed once equal the
    full forward's over [prefix + caption] to bf16 rounding of the state scale."""
    from flax import nnx

    from configs import common
    from lidit_jax.text.in_step import chosen_states
    config = common.get_config()
    config.text.llms.smollm2.dtype = "bfloat16"
    config.text.max_length = 96
    encoder = PromptEncoder("smollm2", config.text.llms.smollm2, config.text)
    assert encoder.template.chat_template and len(encoder.prefix_ids) == 49
    ours = encoder.encode(CAPTIONS, crop_padding=True)
    tokens = encoder.crop(encoder.tokenize(CAPTIONS), ours["states"].shape[1])
    assert ours["states"].shape[1] == 49 + 16
    model = nnx.merge(encoder.llm.graphdef, encoder.llm.state)
    full = jax.jit(lambda ids, mask: chosen_states(model, encoder.choice, ids, mask))(
        tokens["input_ids"], tokens["mask"])
    real = tokens["mask"]
    ours, full = (np.asarray(x, np.float32)[real] for x in (ours["states"], full))
    # Both paths round to bf16 states after float32 residuals and bf16 matmuls in different
    # shapes: a few bf16 steps (2^-8 relative) of the largest state.
    assert np.abs(ours - full).max() <= 2 ** -6 * np.abs(full).max()
