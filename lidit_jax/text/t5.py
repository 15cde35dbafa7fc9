"""A frozen T5 encoder (Flax NNX): the prompt encoder of PixArt, SD3 and FLUX, and the paper's
baseline.

The encoder half of T5 (model_type `t5`, `mt5`, `umt5`; a full encoder-decoder folder loads its
encoder and shared embedding only). Pre-norm layers without biases:
  x = x + O(SelfAttn(RMSNorm(x)) + relative position bias)     (logits unscaled: T5 folds
                                                                 head_dim**-0.5 into q)
  x = x + wo(act(wi_0 h) * wi_1 h)   with h = RMSNorm(x)        (v1.1 / mT5 / umT5: gated-GELU)
  x = x + wo(relu(wi h))                                        (v1.0)
then a final RMSNorm. RMSNorm is T5's LayerNorm: no mean, no bias, float32. The relative
position bias maps key - query offsets to log-spaced buckets (bidirectional: half the buckets
per direction); T5 and mT5 learn one table in layer 0 shared by all layers, umT5 one per layer.

Same `hidden_states` contract as `decoder.DecoderLM`: entry 0 the embeddings, entry i < L the
output of layer i, entry L the last layer after the final norm (transformers'
output_hidden_states). The residual stream is carried in float32 (T5's activations grow large
enough that fp16 checkpoints clamp them in transformers); matmuls run in the weights' dtype.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from lidit_jax.nn.attention import dot_product_attention
from lidit_jax.nn.layers import rms_norm
from lidit_jax.parallel.sharding import constrain
from lidit_jax.text.transformer import FrozenTextModel, dense, transformer_layer_params

SUPPORTED_HF_MODEL_TYPES = ("t5", "mt5", "umt5")
ACTIVATION_NAMES = {"relu": "relu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                    "gelu": "gelu"}
ACTIVATIONS = {"relu": jax.nn.relu, "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
               "gelu": lambda x: jax.nn.gelu(x, approximate=False)}


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Architecture of one T5 encoder (hashable: a static jit argument).

    per_layer_position_bias: umT5 (one bucket table per layer) vs T5 / mT5 (layer 0's table).
    """

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    num_buckets: int
    max_distance: int
    layer_norm_eps: float
    activation: str
    gated: bool
    per_layer_position_bias: bool = False
    family: str = "t5"

    has_final_norm = True

    @classmethod
    def from_hf(cls, raw, name="model", where="config.json"):
        """A Hugging Face config.json dict -> T5Config (`where` names the file in errors)."""
        from transformers import CONFIG_MAPPING
        model_type = raw["model_type"]
        hf = CONFIG_MAPPING[model_type].from_dict(dict(raw))
        if hf.dense_act_fn not in ACTIVATION_NAMES:
            raise ValueError(f"{where}: feed_forward_proj {hf.feed_forward_proj!r} (activation "
                             f"{hf.dense_act_fn!r}); supported activations: "
                             f"{sorted(ACTIVATION_NAMES)}")
        return cls(name=name, vocab_size=hf.vocab_size, hidden_size=hf.d_model,
                   intermediate_size=hf.d_ff, num_layers=hf.num_layers, num_heads=hf.num_heads,
                   head_dim=hf.d_kv, num_buckets=hf.relative_attention_num_buckets,
                   max_distance=hf.relative_attention_max_distance,
                   layer_norm_eps=hf.layer_norm_epsilon,
                   activation=ACTIVATION_NAMES[hf.dense_act_fn], gated=bool(hf.is_gated_act),
                   per_layer_position_bias=model_type == "umt5",
                   family="umt5" if model_type == "umt5" else "t5")


def relative_position_buckets(length, num_buckets, max_distance):
    """Bidirectional T5 buckets [length (query), length (key)] int32 of key - query offsets.

    Half the buckets per direction; in each, offsets below a quarter of num_buckets get their own
    bucket, larger ones log-spaced buckets up to max_distance (computed in float32, as
    transformers does, so the bucket edges agree).
    """
    position = np.arange(length)
    relative = position[None, :] - position[:, None]
    half = num_buckets // 2
    buckets = (relative > 0).astype(np.int64) * half
    distance = np.abs(relative)
    max_exact = half // 2
    # Offsets below max_exact take the exact branch; clamping them to 1 only avoids log(0).
    log_ratio = (np.log(np.maximum(distance, 1).astype(np.float32) / np.float32(max_exact))
                 / np.float32(math.log(max_distance / max_exact)))
    large = max_exact + (log_ratio * np.float32(half - max_exact)).astype(np.int64)
    large = np.minimum(large, half - 1)
    return (buckets + np.where(distance < max_exact, distance, large)).astype(np.int32)


def _layer_params(config):
    """name -> (per-layer shape, logical axes) of one encoder layer's weights."""
    h = config.num_heads
    params = transformer_layer_params(config.hidden_size, h, h, config.head_dim,
                                      config.intermediate_size, gated=config.gated)
    if config.per_layer_position_bias:
        params["position_bias"] = ((config.num_buckets, h), (None, "heads"))
    return params


def parameter_sources(config):
    """variable path -> (HF tensor name ({i}: layer), HF shape, HF array -> ours)."""
    e, h, d, f = config.hidden_size, config.num_heads, config.head_dim, config.intermediate_size
    layer = "encoder.block.{i}.layer."
    heads = lambda w: w.T.reshape(e, h, d)  # noqa: E731  [h*d, e] -> [e, h, d]
    bias = "0.SelfAttention.relative_attention_bias.weight"
    sources = {
        ("embed",): ("shared.weight", (config.vocab_size, e), None),
        ("final_norm",): ("encoder.final_layer_norm.weight", (e,), None),
        ("layers", "attn_norm"): (layer + "0.layer_norm.weight", (e,), None),
        ("layers", "q"): (layer + "0.SelfAttention.q.weight", (h * d, e), heads),
        ("layers", "k"): (layer + "0.SelfAttention.k.weight", (h * d, e), heads),
        ("layers", "v"): (layer + "0.SelfAttention.v.weight", (h * d, e), heads),
        ("layers", "o"): (layer + "0.SelfAttention.o.weight", (e, h * d),
                          lambda w: w.T.reshape(h, d, e)),
        ("layers", "mlp_norm"): (layer + "1.layer_norm.weight", (e,), None),
        ("layers", "down"): (layer + "1.DenseReluDense.wo.weight", (e, f), np.transpose),
    }
    if config.gated:
        sources[("layers", "gate")] = (layer + "1.DenseReluDense.wi_0.weight", (f, e),
                                       np.transpose)
        sources[("layers", "up")] = (layer + "1.DenseReluDense.wi_1.weight", (f, e), np.transpose)
    else:
        sources[("layers", "up")] = (layer + "1.DenseReluDense.wi.weight", (f, e), np.transpose)
    if config.per_layer_position_bias:
        sources[("layers", "position_bias")] = (layer + bias, (config.num_buckets, h), None)
    else:
        sources[("position_bias",)] = ("encoder.block.0.layer." + bias, (config.num_buckets, h),
                                       None)
    return sources


# Stored names that mean one of ours: T5EncoderModel folders of some published checkpoints keep
# the tied embedding under the encoder's name only.
TENSOR_ALIASES = {"shared.weight": ("encoder.embed_tokens.weight",)}


class T5Encoder(FrozenTextModel):
    """The encoder. Built under `nnx.eval_shape` and filled by `weights.load_llm`.

    Variables: embed [vocab, embed]; final_norm [norm]; position_bias [buckets, heads] (T5, mT5)
    or layers.position_bias [layers, buckets, heads] (umT5); layers.<name> [layers, ...].
    """

    def __init__(self, config, dtype=jnp.float32, attention="xla"):
        super().__init__(config, dtype, attention)
        self.embed = self.param((config.vocab_size, config.hidden_size), ("vocab", "embed"))
        self.final_norm = self.param((config.hidden_size,), ("norm",))
        self.position_bias = (None if config.per_layer_position_bias else
                              self.param((config.num_buckets, config.num_heads), (None, "heads")))
        self.layers = self.stacked_layers(_layer_params(config))

    def __call__(self, input_ids, attention_mask):
        """input_ids, attention_mask [batch, len] -> (embeddings, stacked layer outputs, final).

        embeddings [batch, len, embed]; stacked [layers, batch, len, embed] (residual stream
        after each layer); final [batch, len, embed] (last layer after the final norm).
        """
        c = self.config
        x = constrain(jnp.take(self.embed[...], input_ids, axis=0),
                      ("batch", "length", "embed"))
        key_mask = attention_mask.astype(bool)
        buckets = relative_position_buckets(input_ids.shape[1], c.num_buckets, c.max_distance)
        weights = {name: p[...] for name, p in self.layers.items()}
        shared_bias = None if self.position_bias is None else self._bias(self.position_bias[...],
                                                                         buckets)

        def layer(x, p):
            bias = shared_bias if shared_bias is not None else self._bias(p["position_bias"],
                                                                          buckets)
            x = self._layer(p, x, key_mask, bias)
            return x, x.astype(self.dtype)

        last, stacked = jax.lax.scan(layer, x.astype(jnp.float32), weights)
        final = rms_norm(last, self.final_norm[...], c.layer_norm_eps, 0.0)
        return x, stacked, final.astype(self.dtype)

    @staticmethod
    def _bias(table, buckets):
        """table [buckets, heads], buckets [q, k] -> float32 logits bias [1, heads, q, k]."""
        return jnp.transpose(table[buckets], (2, 0, 1))[None].astype(jnp.float32)

    def _layer(self, p, x, key_mask, bias):
        """One pre-norm block on the float32 residual stream x [batch, len, embed]."""
        c = self.config

        def norm(h, name):
            return rms_norm(h, p[name], c.layer_norm_eps, 0.0).astype(self.dtype)

        h = norm(x, "attn_norm")
        q, k, v = (dense("ble,ehd->blhd", h, p[n]) for n in ("q", "k", "v"))
        attended = dot_product_attention(q, k, v, key_mask=key_mask, scale=1.0,
                                         bias=bias.astype(q.dtype),
                                         implementation=self.attention)
        x = constrain(x + dense("blhd,hde->ble", attended, p["o"]), ("batch", "length", "embed"))
        h = norm(x, "mlp_norm")
        up = dense("ble,ef->blf", h, p["up"])
        if c.gated:
            up = ACTIVATIONS[c.activation](dense("ble,ef->blf", h, p["gate"])) * up
        else:
            up = ACTIVATIONS[c.activation](up)
        h = dense("blf,fe->ble", constrain(up, ("batch", "length", "mlp")), p["down"])
        return constrain(x + h, ("batch", "length", "embed"))

    def apply_final_norm(self, states):
        """The final norm on any [..., embed] states (e.g. a middle hidden state)."""
        return rms_norm(states, self.final_norm[...], self.config.layer_norm_eps, 0.0)
