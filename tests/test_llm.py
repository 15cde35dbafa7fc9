"""Parity of lidit_jax.text.decoder (loaded as a text.llm.LLM) with transformers' models.

Tiny random models of each family (saved as Hugging Face folders, so the folder loader is tested
too), the sharded load on an 8-device CPU mesh, and the real offline SmolLM2 / Gemma 3 GGUF files
against transformers loading the same file.
"""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import PartitionSpec

from configs import common
from lidit_jax.parallel import mesh as mesh_lib
from lidit_jax.text import load_llm
from lidit_jax.text.models import default_model_path
from model_helpers import (TINY_MODELS, VOCAB, build_tiny, random_batch, relative_error,
                           torch_outputs)


@pytest.mark.parametrize("family", sorted(TINY_MODELS))
def test_tiny_model_matches_transformers(family, tmp_path):
    reference = build_tiny(family, tmp_path)
    llm = load_llm(tmp_path)
    tower = TINY_MODELS[family][1]
    assert llm.config.family == tower and llm.name == f"{tower}:{tmp_path.name}"
    ids, mask = random_batch(seed=1)
    ref_states, ref_logits = torch_outputs(reference, ids, mask)
    ours = llm.hidden_states(ids, mask)
    layers = reference.config.get_text_config().num_hidden_layers
    assert len(ours) == len(ref_states) == layers + 1
    errors = [relative_error(a, b, mask) for a, b in zip(ours, ref_states)]
    assert max(errors) <= 1e-4, errors
    assert relative_error(llm.logits(ids, mask), ref_logits, mask) <= 1e-4


def test_right_padding_leaves_real_tokens_unchanged(tmp_path):
    build_tiny("gemma3", tmp_path)
    llm = load_llm(tmp_path)
    ids, mask = random_batch(seed=2, lengths=(12, 9))
    padded = llm.hidden_states(ids, mask)
    alone = llm.hidden_states(ids[1:, :9], mask[1:, :9])
    # Masked keys add exact zeros, but matmuls over 12 keys and over 9 accumulate in different
    # orders: float32 rounding (~2e-6 absolute after the layers), nothing more.
    for p, a in zip(padded, alone):
        np.testing.assert_allclose(np.asarray(p)[1, :9], np.asarray(a)[0], rtol=1e-5, atol=1e-5)


def test_sharded_load_matches_and_is_sharded(tmp_path):
    build_tiny("llama", tmp_path)
    config = common.get_config()
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 4, 2
    mesh = mesh_lib.build_mesh(config.mesh)
    sharded = load_llm(tmp_path, mesh=mesh, rules=config.mesh.rules)
    single = load_llm(tmp_path)
    q = sharded.model.layers["q"][...]
    assert q.sharding.spec == PartitionSpec(None, "fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (3, 16, 2, 16)
    assert sharded.model.embed[...].sharding.spec == PartitionSpec("tensor", "fsdp")
    ids, mask = random_batch(seed=3, lengths=(12, 5, 8, 3))
    for a, b in zip(sharded.hidden_states(ids, mask), single.hidden_states(ids, mask)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(sharded.logits(ids, mask)),
                               np.asarray(single.logits(ids, mask)), rtol=1e-5, atol=1e-5)


def greedy_ours(llm, prompt_ids, steps):
    """Greedy continuation with full recompute; one fixed [1, len + steps] shape (one compile)."""
    n = len(prompt_ids)
    ids = np.zeros((1, n + steps), np.int64)
    ids[0, :n] = prompt_ids
    for cur in range(n, n + steps):
        mask = (np.arange(n + steps) < cur)[None].astype(np.int64)
        ids[0, cur] = int(np.argmax(np.asarray(llm.logits(ids, mask))[0, cur - 1]))
    return ids[0, n:].tolist()


def greedy_torch(model, prompt_ids, steps):
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        for _ in range(steps):
            next_id = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return ids[0, len(prompt_ids):].tolist()


def check_real_model(name, tolerance, bf16_tolerance=None):
    path = default_model_path(name)
    llm = load_llm(path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    tokenizer = llm.tokenizer
    batch = tokenizer(["The capital of France is", "A photo of a red bicycle leaning on a wall"],
                      padding=True, padding_side="right", return_tensors="np")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    ref_states, _ = torch_outputs(reference, ids, mask)
    errors = [relative_error(a, b, mask) for a, b in zip(llm.hidden_states(ids, mask), ref_states)]
    assert len(errors) == llm.config.num_layers + 1
    assert max(errors) <= tolerance, errors
    if bf16_tolerance:  # bf16 weights (the configs' default) stay close to float32 states.
        bf16 = load_llm(path, dtype=jnp.bfloat16).hidden_states(ids, mask)
        errors = [relative_error(a, b, mask) for a, b in zip(bf16, ref_states)]
        assert max(errors) <= bf16_tolerance, errors
    prompt = tokenizer("The capital of France is")["input_ids"]
    ours, theirs = greedy_ours(llm, prompt, 8), greedy_torch(reference, prompt, 8)
    assert ours == theirs, (tokenizer.decode(ours), tokenizer.decode(theirs))
    return tokenizer.decode(ours)


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers():
    check_real_model("smollm2", 1e-3, bf16_tolerance=0.05)


@pytest.mark.slow
def test_gemma3_gguf_matches_transformers():
    check_real_model("gemma3", 1e-3)


def test_language_tower_under_either_layout_loads(tmp_path):
    """LLaVA publishes the tower as language_model.model.*; transformers 5 keeps it in memory as
    model.language_model.*: both load, and the vision tensors are never read."""
    from safetensors.numpy import load_file, save_file
    reference = build_tiny("llava", tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    renamed = {}
    for name, array in tensors.items():
        for old, new in (("language_model.model.", "model.language_model."),
                         ("language_model.lm_head.", "lm_head.")):
            if name.startswith(old):
                name = new + name[len(old):]
        renamed[name] = array
    assert any(n.startswith("model.language_model.layers.") for n in renamed)
    save_file(renamed, tmp_path / "model.safetensors")
    ids, mask = random_batch(seed=5)
    ref_states, _ = torch_outputs(reference, ids, mask)
    ours = load_llm(tmp_path).hidden_states(ids, mask)
    assert max(relative_error(a, b, mask) for a, b in zip(ours, ref_states)) <= 1e-4


@pytest.mark.parametrize("family", ["gemma3", "llama"])
def test_left_padding_leaves_real_tokens_unchanged(family, tmp_path):
    """text.padding_side='left': positions come from the mask (cumsum - 1), so a token's state
    does not depend on how much padding its row has."""
    build_tiny(family, tmp_path)
    llm = load_llm(tmp_path)
    ids, _ = random_batch(seed=4, lengths=(12, 9))
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # Row 1: 3 padding tokens on the left, then 9 real ones.
    padded = llm.hidden_states(ids, mask)
    alone = llm.hidden_states(ids[1:, 3:], mask[1:, 3:])
    for p, a in zip(padded, alone):
        np.testing.assert_allclose(np.asarray(p)[1, 3:], np.asarray(a)[0], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def template_tokens():
    """Real boundaries: SmolLM2's chat template + the paper's instruction over captions of
    several lengths (right padding), and the template's shared prefix."""
    from lidit_jax.text.tokenizer import PromptTemplate
    from lidit_jax.text.weights import open_source
    tokenizer = open_source(default_model_path("smollm2")).tokenizer()
    template = PromptTemplate(tokenizer, instruction=common.PAPER_INSTRUCTION,
                              use_instruction=True, system_prompt="", use_chat_template=True,
                              max_length=72)
    tokens = template.encode_batch(["a red circle on the left", "",
                                    "two small blue squares in the middle of the image"])
    return template, tokens


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma3"])
def test_prefix_keys_and_values_reused_give_the_full_forward(family, tmp_path, template_tokens):
    """The blocks run over the caption part only, after the shared prefix's cached keys and
    values (positions from the prefix's length): every layer's output equals the forward over
    [prefix + caption] (float32). Gemma's 4-token sliding window is shorter than the prefix."""
    from lidit_jax.text.encoder import shared_prefix
    build_tiny(family, tmp_path)
    llm = load_llm(tmp_path)
    template, tokens = template_tokens
    prefix, why_not = shared_prefix(template, llm.config)
    assert prefix is not None and 40 <= len(prefix) < template.template_length, why_not
    length = len(prefix)
    ids, mask = tokens["input_ids"] % VOCAB, tokens["mask"]  # The tiny vocabulary.
    assert (tokens["input_ids"][:, :length] == prefix).all()
    model = llm.model
    _, full, full_last, _ = model.residual_stream(jnp.asarray(ids), jnp.asarray(mask))
    _, _, _, (keys, values) = model.residual_stream(
        jnp.asarray(prefix % VOCAB)[None], jnp.ones((1, length), bool), return_keys_values=True)
    _, part, part_last, _ = model.residual_stream(
        jnp.asarray(ids[:, length:]), jnp.asarray(mask[:, length:]),
        prefix={"keys": keys[:, 0], "values": values[:, 0]})
    real = mask[:, length:].astype(bool)
    for ours, reference in [(part, full[:, :, length:]), (part_last[None], full_last[None, :,
                                                                                      length:])]:
        ours, reference = np.asarray(ours)[:, real], np.asarray(reference)[:, real]
        scale = np.abs(reference).max()
        assert np.abs(ours - reference).max() <= 1e-5 * scale
