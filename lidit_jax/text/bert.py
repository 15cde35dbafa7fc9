"""A frozen BERT encoder (Flax NNX): bidirectional prompt encoder beside the decoder-only LLMs.

BERT (model_type `bert`; all-MiniLM-L6-v2 ships offline): word + position + token-type(0)
embeddings, LayerNorm; then post-norm layers
  x = LN(x + O(SelfAttn(x)))   (q/k/v/o with biases, scale head_dim**-0.5, padding-masked keys)
  x = LN(x + W2 act(W1 x))
Same `hidden_states` contract as `decoder.DecoderLM` (transformers' output_hidden_states: entry 0
the normalised embeddings, entry i the output of layer i; BERT has no final norm, so entry L is
the last layer's output as it is). Layers are stacked on a leading `layers` axis and scanned.
LayerNorms run in float32; positions are 0..len-1 for every row (right padding leaves real
tokens unchanged).
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lidit_jax.nn.attention import dot_product_attention
from lidit_jax.nn.layers import layer_norm
from lidit_jax.parallel.sharding import constrain
from lidit_jax.text.transformer import FrozenTextModel, dense, transformer_layer_params

SUPPORTED_HF_MODEL_TYPES = ("bert",)
# Hugging Face hidden_act -> ours.
ACTIVATION_NAMES = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                    "relu": "relu"}
ACTIVATIONS = {"gelu": lambda x: jax.nn.gelu(x, approximate=False),
               "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True), "relu": jax.nn.relu}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Architecture of one BERT encoder (hashable: a static jit argument)."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_positions: int
    type_vocab_size: int
    layer_norm_eps: float
    activation: str = "gelu"
    family: str = "bert"

    has_final_norm = False  # hidden_states[-1] is the last layer's (already normalised) output.

    @property
    def head_dim(self):
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, raw, name="model", where="config.json"):
        """A Hugging Face config.json dict -> BertConfig (`where` names the file in errors)."""
        from transformers import CONFIG_MAPPING
        hf = CONFIG_MAPPING[raw["model_type"]].from_dict(dict(raw))
        position_type = getattr(hf, "position_embedding_type", "absolute") or "absolute"
        if position_type != "absolute":
            raise ValueError(f"{where}: position_embedding_type {position_type!r}; only "
                             "'absolute' is supported")
        if hf.hidden_act not in ACTIVATION_NAMES:
            raise ValueError(f"{where}: hidden_act {hf.hidden_act!r}; supported: "
                             f"{sorted(ACTIVATION_NAMES)}")
        if hf.hidden_size % hf.num_attention_heads:
            raise ValueError(f"{where}: hidden_size {hf.hidden_size} is not a multiple of "
                             f"num_attention_heads {hf.num_attention_heads}")
        return cls(name=name, vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
                   intermediate_size=hf.intermediate_size, num_layers=hf.num_hidden_layers,
                   num_heads=hf.num_attention_heads, max_positions=hf.max_position_embeddings,
                   type_vocab_size=hf.type_vocab_size, layer_norm_eps=hf.layer_norm_eps,
                   activation=ACTIVATION_NAMES[hf.hidden_act])


def affine_layer_norm(x, weight, bias, eps):
    """BERT's LayerNorm with scale and shift: nn.layers.layer_norm (float32), cast back."""
    return (layer_norm(x, eps) * weight.astype(jnp.float32)
            + bias.astype(jnp.float32)).astype(x.dtype)


def _layer_params(config):
    """name -> (per-layer shape, logical axes) of one BERT layer's weights: the shared table
    plus a bias for every projection and LayerNorm."""
    e, h, d, f = config.hidden_size, config.num_heads, config.head_dim, config.intermediate_size
    params = transformer_layer_params(e, h, h, d, f, gated=False)
    params.update({f"{name}_bias": ((h, d), ("heads", "head_dim")) for name in ("q", "k", "v")})
    params.update(o_bias=((e,), ("embed",)), attn_norm_bias=((e,), ("norm",)),
                  up_bias=((f,), ("mlp",)), down_bias=((e,), ("embed",)),
                  mlp_norm_bias=((e,), ("norm",)))
    return params


def parameter_sources(config):
    """variable path -> (HF tensor name ({i}: layer), HF shape, HF array -> ours)."""
    e, h, d, f = config.hidden_size, config.num_heads, config.head_dim, config.intermediate_size
    layer = "encoder.layer.{i}."
    heads = lambda w: w.T.reshape(e, h, d)  # noqa: E731  [h*d, e] -> [e, h, d]
    sources = {
        ("embed",): ("embeddings.word_embeddings.weight", (config.vocab_size, e), None),
        ("position_embed",): ("embeddings.position_embeddings.weight",
                              (config.max_positions, e), None),
        ("type_embed",): ("embeddings.token_type_embeddings.weight",
                          (config.type_vocab_size, e), None),
        ("embed_norm",): ("embeddings.LayerNorm.weight", (e,), None),
        ("embed_norm_bias",): ("embeddings.LayerNorm.bias", (e,), None),
        ("layers", "o"): (layer + "attention.output.dense.weight", (e, h * d),
                          lambda w: w.T.reshape(h, d, e)),
        ("layers", "o_bias"): (layer + "attention.output.dense.bias", (e,), None),
        ("layers", "attn_norm"): (layer + "attention.output.LayerNorm.weight", (e,), None),
        ("layers", "attn_norm_bias"): (layer + "attention.output.LayerNorm.bias", (e,), None),
        ("layers", "up"): (layer + "intermediate.dense.weight", (f, e), np.transpose),
        ("layers", "up_bias"): (layer + "intermediate.dense.bias", (f,), None),
        ("layers", "down"): (layer + "output.dense.weight", (e, f), np.transpose),
        ("layers", "down_bias"): (layer + "output.dense.bias", (e,), None),
        ("layers", "mlp_norm"): (layer + "output.LayerNorm.weight", (e,), None),
        ("layers", "mlp_norm_bias"): (layer + "output.LayerNorm.bias", (e,), None),
    }
    for name, hf in (("q", "query"), ("k", "key"), ("v", "value")):
        sources[("layers", name)] = (layer + f"attention.self.{hf}.weight", (h * d, e), heads)
        sources[("layers", f"{name}_bias")] = (layer + f"attention.self.{hf}.bias", (h * d,),
                                               lambda b: b.reshape(h, d))
    return sources


class BertEncoder(FrozenTextModel):
    """The encoder. Built under `nnx.eval_shape` and filled by `weights.load_llm`.

    Variables: embed [vocab, embed]; position_embed [positions, embed]; type_embed [types,
    embed]; embed_norm(_bias) [norm]; layers.<name> [layers, ...] (see `_layer_params`).
    """

    def __init__(self, config, dtype=jnp.float32, attention="xla"):
        super().__init__(config, dtype, attention)
        e = config.hidden_size
        self.embed = self.param((config.vocab_size, e), ("vocab", "embed"))
        self.position_embed = self.param((config.max_positions, e), (None, "embed"))
        self.type_embed = self.param((config.type_vocab_size, e), (None, "embed"))
        self.embed_norm = self.param((e,), ("norm",))
        self.embed_norm_bias = self.param((e,), ("norm",))
        self.layers = self.stacked_layers(_layer_params(config))

    def __call__(self, input_ids, attention_mask):
        """input_ids, attention_mask [batch, len] -> (embeddings, stacked layer outputs, final).

        embeddings [batch, len, embed]; stacked [layers, batch, len, embed]; final [batch, len,
        embed] (= stacked[-1]: BERT has no final norm).
        """
        c = self.config
        length = input_ids.shape[1]
        if length > c.max_positions:
            raise ValueError(f"{c.name}: {length} tokens exceed its {c.max_positions} position "
                             "embeddings; lower text.max_length")
        x = (jnp.take(self.embed[...], input_ids, axis=0) + self.type_embed[0]
             + self.position_embed[:length][None])
        x = affine_layer_norm(x, self.embed_norm[...], self.embed_norm_bias[...],
                              c.layer_norm_eps)
        x = constrain(x.astype(self.dtype), ("batch", "length", "embed"))
        key_mask = attention_mask.astype(bool)
        weights = {name: p[...] for name, p in self.layers.items()}

        def layer(x, p):
            x = self._layer(p, x, key_mask)
            return x, x

        last, stacked = jax.lax.scan(layer, x, weights)
        return x, stacked, last

    def _layer(self, p, x, key_mask):
        """One post-norm block on x [batch, len, embed]."""
        c = self.config
        q, k, v = (dense("ble,ehd->blhd", x, p[n]) + p[f"{n}_bias"] for n in ("q", "k", "v"))
        attended = dot_product_attention(q, k, v, key_mask=key_mask, causal=False,
                                         implementation=self.attention)
        h = dense("blhd,hde->ble", attended, p["o"]) + p["o_bias"]
        x = affine_layer_norm(x + h, p["attn_norm"], p["attn_norm_bias"], c.layer_norm_eps)
        h = ACTIVATIONS[c.activation](dense("ble,ef->blf", x, p["up"]) + p["up_bias"])
        h = constrain(h, ("batch", "length", "mlp"))
        h = dense("blf,fe->ble", h, p["down"]) + p["down_bias"]
        x = affine_layer_norm(x + h, p["mlp_norm"], p["mlp_norm_bias"], c.layer_norm_eps)
        return constrain(x, ("batch", "length", "embed"))

    def apply_final_norm(self, states):
        raise ValueError(f"{self.config.name}: BERT has no final norm; set "
                         "text.llms.<name>.final_norm=False")
