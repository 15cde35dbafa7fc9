"""What the three frozen text transformers share (the decoder-only LLMs of `text/decoder.py`,
`text/bert.py`, `text/t5.py`): their module base, the weights every family's layer has, and the
matmul that accumulates in float32 as transformers does.
"""
import jax.numpy as jnp
from flax import nnx


def dense(spec, x, w):
    """einsum accumulated in float32, result in x's dtype (bf16 sums over 1-2k terms otherwise
    lose the precision transformers keeps: its CPU / GPU matmuls accumulate in float32)."""
    return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def transformer_layer_params(e, h, kv, d, f, *, gated):
    """name -> (per-layer shape, logical axes) of what every family's layer has: the two
    pre-norm scales, q/k/v/o projections (kv heads for k/v) and the MLP (gate only if `gated`).
    e width, h heads, kv key/value heads, d head_dim, f MLP width."""
    params = {
        "attn_norm": ((e,), ("norm",)),
        "q": ((e, h, d), ("embed", "heads", "head_dim")),
        "k": ((e, kv, d), ("embed", "kv_heads", "head_dim")),
        "v": ((e, kv, d), ("embed", "kv_heads", "head_dim")),
        "o": ((h, d, e), ("heads", "head_dim", "embed")),
        "mlp_norm": ((e,), ("norm",)),
        "up": ((e, f), ("embed", "mlp")),
        "down": ((f, e), ("mlp", "embed")),
    }
    if gated:
        params["gate"] = ((e, f), ("embed", "mlp"))
    return params


class FrozenTextModel(nnx.Module):
    """The base of decoder.DecoderLM, bert.BertEncoder and t5.T5Encoder: built under
    `nnx.eval_shape` from zero placeholders that `weights.load_llm` fills, every parameter with
    its logical axes, per-layer weights stacked on a leading `layers` axis for `lax.scan`.
    `attention` is the `dot_product_attention` implementation (config.text.attention).
    """

    def __init__(self, config, dtype, attention):
        self.config = config
        self.dtype = dtype
        self.attention = attention

    def param(self, shape, axes):
        return nnx.Param(jnp.zeros(shape, self.dtype), out_sharding=axes)

    def stacked_layers(self, layer_params):
        """{name: (shape, axes)} of one layer -> nnx.Dict of [num_layers, *shape] parameters."""
        return nnx.Dict({name: self.param((self.config.num_layers, *shape), ("layers", *axes))
                         for name, (shape, axes) in layer_params.items()})
