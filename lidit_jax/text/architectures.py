"""The published shapes of the paper's LLMs: their config.json, shipped so that a config can be
described and compiled (`--mode=describe`, `--mode=compile`) on a host that holds no weights.

A config names one with `text.llms.<name>.architecture`; it is used only while
`text.llms.<name>.path` is empty, and once the path is set the loaded model must have the same
shape (`check_matches`), so a config cannot describe one model and train another.
"""
# The two LLMs of LI-DiT (arXiv 2406.11831). The LLaVA-tuned checkpoints the configs name
# (llama3-llava-next-8b-hf, llava-interleave-qwen-7b-hf) have these language towers.
KNOWN = {
    "llama3-8b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 128256, "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0, "max_position_embeddings": 8192, "tie_word_embeddings": False,
        "hidden_act": "silu", "torch_dtype": "bfloat16"},
    "qwen1.5-7b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 4096,
        "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 32, "vocab_size": 151936, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "max_position_embeddings": 32768,
        "tie_word_embeddings": False, "hidden_act": "silu", "use_sliding_window": False,
        "torch_dtype": "bfloat16"},
}

# What must agree between a named architecture and the weights a run loads.
_COMPARED = ("hidden_size", "num_layers", "intermediate_size", "num_heads", "num_kv_heads")


def model_config(name, key):
    """The model config (decoder.LLMConfig) of a KNOWN architecture; ValueError naming `key`."""
    from lidit_jax.text.weights import config_from_hf  # Loads the model families: only here.
    if name not in KNOWN:
        raise ValueError(f"{key}={name!r} is not a shipped architecture; known: {sorted(KNOWN)}")
    return config_from_hf(KNOWN[name], name=name, where=f"{key}={name}")


def check_matches(name, loaded, key):
    """ValueError when the loaded model's shape differs from architecture `name`'s."""
    expected = model_config(name, key)
    differ = [f"{field} {getattr(loaded, field)} (architecture: {getattr(expected, field)})"
              for field in _COMPARED
              if getattr(loaded, field, None) != getattr(expected, field, None)]
    if differ:
        raise ValueError(f"{key}={name!r} does not match the weights loaded: "
                         + ", ".join(differ))
