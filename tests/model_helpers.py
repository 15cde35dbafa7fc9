"""Tiny random transformers models of every decoder family (saved as Hugging Face folders), random
right-padded batches and the relative error the parity tests (test_llm, test_bert, test_t5,
test_weights) compare our hidden states with."""
import numpy as np
import torch
import transformers

VOCAB = 128


def _tiny_llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8}))


def _tiny_qwen2():
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))


def _tiny_gemma3():
    return transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
        sliding_window=4, final_logit_softcapping=30.0,
        layer_types=["sliding_attention", "sliding_attention", "full_attention",
                     "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0,
                                            "rope_theta": 1000000.0}}))


_TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)


def _tiny_qwen3():
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        **_TEXT, head_dim=24, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))


# Multimodal models: a tiny language tower (what we load) beside a tiny vision tower (ignored).
def _tiny_clip():
    return transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         image_size=28, patch_size=14)


def _tiny_llava():
    return transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
        text_config=transformers.MistralConfig(**_TEXT, sliding_window=None),
        vision_config=_tiny_clip()))


def _tiny_llava_next():
    return transformers.LlavaNextForConditionalGeneration(transformers.LlavaNextConfig(
        text_config=transformers.Qwen2Config(**_TEXT), vision_config=_tiny_clip(),
        image_grid_pinpoints=[[28, 28]]))


def _tiny_qwen2_5_vl():
    # M-RoPE sections of 4 + 2 + 2 frequencies (head_dim 16): rotated by the token index in
    # all three for text-only input.
    return transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(
        text_config=dict(_TEXT, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                 "mrope_section": [4, 2, 2]}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=2,
                           out_hidden_size=64, fullatt_block_indexes=[0])))


# name -> (builder, the family of the language tower).
TINY_MODELS = {"llama": (_tiny_llama, "llama"), "qwen2": (_tiny_qwen2, "qwen2"),
               "gemma3": (_tiny_gemma3, "gemma3"), "qwen3": (_tiny_qwen3, "qwen3"),
               "llava": (_tiny_llava, "llama"), "llava_next": (_tiny_llava_next, "qwen2"),
               "qwen2_5_vl": (_tiny_qwen2_5_vl, "qwen2")}


def build_tiny(family, folder, seed=0):
    """A tiny random transformers model of `family`, saved to `folder`; returns it (eval mode).

    Every weight is random (biases and norms too, which the default init leaves 0 or 1).
    """
    torch.manual_seed(seed)
    model = TINY_MODELS[family][0]()
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        for name, param in model.named_parameters():
            scale = 0.3 if "norm" in name else 0.08
            base = 1.0 if "norm" in name and family != "gemma3" else 0.0
            param.copy_(base + scale * torch.randn_like(param))
    model.save_pretrained(folder)
    return model.eval()


def random_batch(seed, lengths=(12, 7, 1), length=12):
    """Random ids [batch, length] and a right-padding mask with the given real lengths."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (len(lengths), length))
    mask = (np.arange(length)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
    return ids, mask


def torch_outputs(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    output_hidden_states=True)
    return [h.numpy() for h in out.hidden_states], out.logits.numpy()


def relative_error(ours, reference, mask):
    real = mask.astype(bool)
    ours, reference = np.asarray(ours, np.float32)[real], np.asarray(reference)[real]
    return float(np.abs(ours - reference).max() / np.abs(reference).max())
