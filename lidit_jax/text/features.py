"""Which hidden states of a frozen encoder feed the refiner (`text.llms.<name>.layer`).

  layer                     states the denoiser receives              width     cache size
  -3 (int)                  hidden_states[-3] (the paper)             w         1x
  [-1, -3] (list of ints)   layer_combine "concat": on channels       n * w     n x
                            layer_combine "mean": their mean          w         1x
  "all_norm_avg"            mean over all L+1 states, each            w         1x
                            RMS-normalised (no weight)
  "attention_pool"          all L+1 states [len, L+1, w]; `LayerPool`  w         (L+1) x
                            (in the trainable TextConditioner) learns
                            a per-token softmax over them

With `final_norm`, the encoder's final norm is applied to each chosen state first. The text cache
stores exactly what the denoiser receives (bf16), so its size grows as the last column says:
SmolLM2 (31 states of 576) with attention_pool stores 35.7 kB per token instead of 1.2 kB.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from lidit_jax.nn.layers import normalize_rms

STRATEGIES = ("all_norm_avg", "attention_pool")
COMBINES = ("concat", "mean")


class LayerChoiceError(ValueError):
    """A `text.llms.<name>.layer` / `layer_combine` value that cannot be used."""


def encoder_names(text_config):
    """The LLM names of `text.encoders` ('llama3,qwen'), in branch order."""
    return [name.strip() for name in text_config.encoders.split(",") if name.strip()]


def parse(layer, combine, key):
    """A config value -> int, tuple of ints, or a STRATEGIES name (errors name `key`)."""
    if isinstance(layer, bool):
        raise LayerChoiceError(f"{key}.layer={layer!r}: expected an int, a list of ints or one "
                               f"of {STRATEGIES}")
    if isinstance(layer, int):
        return layer
    if isinstance(layer, str):
        if layer not in STRATEGIES:
            raise LayerChoiceError(f"{key}.layer={layer!r}: expected an int, a list of ints or "
                                   f"one of {STRATEGIES}")
        return layer
    if isinstance(layer, (list, tuple)) and layer and all(
            isinstance(i, int) and not isinstance(i, bool) for i in layer):
        if combine not in COMBINES:
            raise LayerChoiceError(f"{key}.layer_combine={combine!r}; known: {COMBINES}")
        if len(set(layer)) != len(layer):
            raise LayerChoiceError(f"{key}.layer={list(layer)} names a layer twice")
        return tuple(layer)
    raise LayerChoiceError(f"{key}.layer={layer!r}: expected an int, a non-empty list of ints "
                           f"or one of {STRATEGIES}")


def check_range(choice, num_states, key, model_name):
    """Every index of `choice` must address one of the encoder's num_states hidden states."""
    indices = [choice] if isinstance(choice, int) else choice if isinstance(choice, tuple) else []
    outside = [i for i in indices if not -num_states <= i < num_states]
    if outside:
        raise LayerChoiceError(f"{key}.layer={outside[0]} is outside the {num_states} hidden "
                               f"states of {model_name}")


def feature_width(choice, combine, width):
    """Channels of the states the denoiser receives, from the encoder's hidden size."""
    return width * len(choice) if isinstance(choice, tuple) and combine == "concat" else width


def describe(choice, combine):
    """JSON-friendly identity of the choice (text cache and checkpoint metadata)."""
    if isinstance(choice, tuple):
        return {"layer": list(choice), "layer_combine": combine}
    return choice


def select(hidden_states, choice, combine, final_norm=None):
    """The L+1 hidden states [batch, len, w] -> what the denoiser receives.

    Returns [batch, len, feature_width] or, for "attention_pool", [batch, len, L+1, w], in the
    states' dtype; `final_norm` (None: not applied) maps states to normed states.
    """
    norm = final_norm or (lambda s: s)
    if isinstance(choice, int):
        return norm(hidden_states[choice])
    if isinstance(choice, tuple):
        chosen = [norm(hidden_states[i]) for i in choice]
        if combine == "concat":
            return jnp.concatenate(chosen, axis=-1)
        return (sum(s.astype(jnp.float32) for s in chosen) / len(chosen)).astype(chosen[0].dtype)
    states = [norm(s) for s in hidden_states]
    if choice == "all_norm_avg":
        total = sum(normalize_rms(s.astype(jnp.float32)) for s in states)
        return (total / len(states)).astype(states[0].dtype)
    return jnp.stack(states, axis=2)


class LayerPool(nnx.Module):
    """A learned per-token softmax over an encoder's hidden states ("attention_pool").

    states [batch, len, S, w] -> [batch, len, w] float32:
      n_s = RMSNorm(h_s) (no weight),  a_s = softmax_s(<n_s, q> / sqrt(w)),  out = sum_s a_s n_s.
    The query q [w] ("norm") starts at zero, so training starts from all_norm_avg's uniform mean;
    it lives in the trainable TextConditioner and trains with the refiner.
    """

    def __init__(self, width, *, param_dtype=jnp.float32):
        self.query = nnx.Param(jnp.zeros((width,), param_dtype), out_sharding=("norm",))

    def __call__(self, states):
        normed = normalize_rms(states.astype(jnp.float32))
        query = self.query[...].astype(jnp.float32)
        scores = jnp.einsum("blsw,w->bls", normed, query) / jnp.sqrt(normed.shape[-1])
        weights = jax.nn.softmax(scores, axis=-1)
        return jnp.einsum("bls,blsw->blw", weights, normed)


def pools_layers(text_config, name):
    """Whether encoder `name` of config.text feeds all its states to a LayerPool."""
    return text_config.llms[name].layer == "attention_pool"
