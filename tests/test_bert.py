"""Parity of lidit_jax.text.bert with transformers' BertModel: a tiny random model (every weight
random, saved as a Hugging Face folder), the sharded load, and the real offline MiniLM files."""
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import PartitionSpec

from configs import common
from lidit_jax import configuration
from lidit_jax.parallel import mesh as mesh_lib
from lidit_jax.text import load_llm
from lidit_jax.text.encoder import PromptEncoder
from lidit_jax.text.models import default_model_path
from model_helpers import VOCAB, random_batch, relative_error


def build_tiny_bert(folder, hidden_act="gelu", seed=0):
    torch.manual_seed(seed)
    model = transformers.BertModel(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=16, type_vocab_size=2,
        hidden_act=hidden_act), add_pooling_layer=False)
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        for name, param in model.named_parameters():
            base = 1.0 if "LayerNorm.weight" in name else 0.0
            param.copy_(base + 0.1 * torch.randn_like(param))
    model.save_pretrained(folder)
    return model.eval()


def hidden_states_torch(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    output_hidden_states=True)
    return [h.numpy() for h in out.hidden_states]


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new"])
def test_tiny_bert_matches_transformers(hidden_act, tmp_path):
    reference = build_tiny_bert(tmp_path, hidden_act)
    llm = load_llm(tmp_path)
    assert llm.name == f"bert:{tmp_path.name}" and not llm.config.has_final_norm
    ids, mask = random_batch(seed=1)
    ours, ref = llm.hidden_states(ids, mask), hidden_states_torch(reference, ids, mask)
    assert len(ours) == len(ref) == 4
    errors = [relative_error(a, b, mask) for a, b in zip(ours, ref)]
    assert max(errors) <= 1e-4, errors


def test_sharded_bert_matches_unsharded(tmp_path):
    build_tiny_bert(tmp_path)
    config = common.get_config()
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 4, 2
    sharded = load_llm(tmp_path, mesh=mesh_lib.build_mesh(config.mesh), rules=config.mesh.rules)
    q = sharded.model.layers["q"][...]
    assert q.sharding.spec == PartitionSpec(None, "fsdp", "tensor", None)
    ids, mask = random_batch(seed=3, lengths=(12, 5, 8, 3))
    for a, b in zip(sharded.hidden_states(ids, mask), load_llm(tmp_path).hidden_states(ids, mask)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_real_minilm_matches_transformers():
    path = default_model_path("minilm")
    llm = load_llm(path)
    reference = transformers.AutoModel.from_pretrained(str(path), attn_implementation="eager")
    encoded = llm.tokenizer(["a small red circle left of a big blue square", "a star"],
                            padding=True, return_tensors="np")
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    ours, ref = llm.hidden_states(ids, mask), hidden_states_torch(reference.eval(), ids, mask)
    assert len(ours) == len(ref) == 7
    errors = [relative_error(a, b, mask) for a, b in zip(ours, ref)]
    assert max(errors) <= 1e-4, errors


def test_minilm_prompt_encoder_finds_the_caption_and_refuses_final_norm():
    config = common.get_config()
    config.text.use_chat_template = True  # BERT has none: plain "instruction + caption".
    encoder = PromptEncoder("minilm", config.text.llms.minilm, config.text)
    tokens = encoder.template.encode_batch(["A red circle", ""])
    kept = encoder.llm.tokenizer.convert_ids_to_tokens(
        tokens["input_ids"][0][tokens["prompt_mask"][0]])
    assert kept == ["a", "red", "circle"]  # Uncased WordPiece; [CLS] / [SEP] are template.
    assert not tokens["prompt_mask"][1].any()
    assert encoder.encode(["a red circle"])["states"].shape == (1, config.text.max_length, 384)
    config.text.llms.minilm.final_norm = True
    with pytest.raises(configuration.ConfigError, match=r"minilm.final_norm=True.*no final norm"):
        PromptEncoder("minilm", config.text.llms.minilm, config.text)
