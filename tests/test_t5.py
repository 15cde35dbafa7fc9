"""Parity of lidit_jax.text.t5 with transformers' T5 / umT5 encoders on tiny random models (every
weight random, saved as Hugging Face folders); sequences longer than max_distance so the
log-spaced buckets and their clamp are exercised; the sharded load; a full encoder-decoder folder
loads its encoder."""
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import PartitionSpec

from configs import common
from lidit_jax.parallel import mesh as mesh_lib
from lidit_jax.text import load_llm
from lidit_jax.text.t5 import relative_position_buckets
from model_helpers import VOCAB, random_batch, relative_error

VARIANTS = {  # name -> (config class, model class, feed_forward_proj)
    "t5_v1_0": (transformers.T5Config, transformers.T5EncoderModel, "relu"),
    "t5_v1_1": (transformers.T5Config, transformers.T5EncoderModel, "gated-gelu"),
    "umt5": (transformers.UMT5Config, transformers.UMT5EncoderModel, "gated-gelu"),
}


def build_tiny_t5(variant, folder, model_class=None, seed=0):
    config_class, encoder_class, proj = VARIANTS[variant]
    torch.manual_seed(seed)
    model = (model_class or encoder_class)(config_class(
        vocab_size=VOCAB, d_model=64, d_kv=12, d_ff=96, num_layers=3, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=10,
        feed_forward_proj=proj))
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        for name, param in model.named_parameters():
            base = 1.0 if "layer_norm" in name else 0.0
            scale = 0.3 if "norm" in name or "relative_attention" in name else 0.1
            param.copy_(base + scale * torch.randn_like(param))
    model.save_pretrained(folder)
    return model.eval()


def encoder_states(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    output_hidden_states=True)
    return [h.numpy() for h in out.hidden_states]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_tiny_t5_matches_transformers(variant, tmp_path):
    reference = build_tiny_t5(variant, tmp_path)
    llm = load_llm(tmp_path)
    assert llm.config.gated == (variant != "t5_v1_0")
    assert llm.config.per_layer_position_bias == (variant == "umt5")
    ids, mask = random_batch(seed=1, lengths=(16, 7, 1), length=16)
    ours, ref = llm.hidden_states(ids, mask), encoder_states(reference, ids, mask)
    assert len(ours) == len(ref) == 4
    errors = [relative_error(a, b, mask) for a, b in zip(ours, ref)]
    assert max(errors) <= 1e-4, errors


def test_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention
    length, buckets, distance = 300, 32, 128
    position = torch.arange(length)
    reference = T5Attention._relative_position_bucket(
        position[None, :] - position[:, None], bidirectional=True, num_buckets=buckets,
        max_distance=distance)
    np.testing.assert_array_equal(relative_position_buckets(length, buckets, distance),
                                  reference.numpy())


def test_encoder_decoder_folder_loads_the_encoder(tmp_path):
    reference = build_tiny_t5("t5_v1_1", tmp_path,
                              model_class=transformers.T5ForConditionalGeneration)
    ids, mask = random_batch(seed=2)
    ours = load_llm(tmp_path).hidden_states(ids, mask)
    ref = encoder_states(reference.get_encoder(), ids, mask)
    assert max(relative_error(a, b, mask) for a, b in zip(ours, ref)) <= 1e-4


def test_embedding_stored_under_the_encoder_name_loads(tmp_path):
    """Some published T5EncoderModel folders keep the tied embedding as encoder.embed_tokens."""
    from safetensors.numpy import load_file, save_file
    reference = build_tiny_t5("t5_v1_0", tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["encoder.embed_tokens.weight"] = tensors.pop("shared.weight")
    save_file(tensors, tmp_path / "model.safetensors")
    ids, mask = random_batch(seed=4)
    ours, ref = load_llm(tmp_path).hidden_states(ids, mask), encoder_states(reference, ids, mask)
    assert max(relative_error(a, b, mask) for a, b in zip(ours, ref)) <= 1e-4


def test_sharded_umt5_matches_unsharded(tmp_path):
    build_tiny_t5("umt5", tmp_path)
    config = common.get_config()
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 4, 2
    sharded = load_llm(tmp_path, mesh=mesh_lib.build_mesh(config.mesh), rules=config.mesh.rules)
    assert sharded.model.layers["q"][...].sharding.spec == PartitionSpec(None, "fsdp", "tensor",
                                                                         None)
    assert sharded.model.layers["position_bias"][...].sharding.spec == PartitionSpec(
        None, None, "tensor")
    ids, mask = random_batch(seed=3, lengths=(12, 5, 8, 3))
    for a, b in zip(sharded.hidden_states(ids, mask), load_llm(tmp_path).hidden_states(ids, mask)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_t5_prompt_encoder_finds_the_caption_with_a_sentencepiece_tokenizer(tmp_path):
    """A T5-style tokenizer (Unigram over Metaspace pieces, '</s>' appended, no chat template),
    trained here on a few captions: the template's span logic finds the caption's pieces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from lidit_jax.text.encoder import PromptEncoder
    config = common.get_config()
    captions = ["a red circle left of a blue square", "two green triangles", "a small star"]
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(captions + [config.text.instruction], trainers.UnigramTrainer(
        vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"))
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>",
                                                             special_tokens=[("</s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>",
                                                eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=len(fast), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu")).save_pretrained(tmp_path)
    fast.save_pretrained(tmp_path)
    config.text.llms.t5.update(path=str(tmp_path), dtype="float32", width=0)
    encoder = PromptEncoder("t5", config.text.llms.t5, config.text)
    tokens = encoder.template.encode_batch([captions[0], ""])
    kept = tokens["input_ids"][0][tokens["prompt_mask"][0]]
    assert fast.decode(kept) == captions[0]
    last = tokens["mask"][0].sum() - 1
    assert tokens["input_ids"][0][last] == fast.eos_token_id  # '</s>' is template, not caption.
    assert not tokens["prompt_mask"][1].any()
    encoded = encoder.encode(captions)
    assert encoded["states"].shape == (3, config.text.max_length, 32)
    assert encoder.metadata()["llm"] == f"t5:{tmp_path.name}"
