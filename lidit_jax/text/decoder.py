"""A frozen decoder-only LLM (Flax NNX) for the Llama, Qwen2, Qwen3 and Gemma 3 text families.

One transformer covers the four families; they differ only in switches of `LLMConfig`:
  Llama (Llama 3, SmolLM2, Mistral): RMSNorm w, RoPE (default / linear / llama3 scaling), GQA,
    SwiGLU, tied or untied embeddings;
  Qwen2: Llama plus q/k/v biases;
  Qwen3: Llama plus q/k RMSNorm over head_dim (before RoPE);
  Gemma 3 text: norms applied as (1 + w), embeddings times sqrt(width), q/k RMSNorm over head_dim,
    a norm after each sublayer too, GELU-tanh GLU, sliding-window and global layers with their own
    rope bases, attention scale query_pre_attn_scalar**-0.5, optional final logit softcapping.

Numerics follow transformers (the parity tests compare every hidden state): RMSNorm in float32,
RoPE angles in float32 then cos/sin cast to the compute dtype, Gemma's embedding scale cast to the
compute dtype. Positions are 0..len-1 for every row, so right padding leaves real tokens unchanged.

Parameters carry logical axes (`embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `vocab`, `norm`,
`layers`); per-layer weights are stacked on a leading `layers` axis and applied with one
`jax.lax.scan`, so compile time does not grow with depth (32 layers compile like one). Gemma's
interleaved local/global layers stay inside the scan: each layer's rope frequencies and window are
scanned inputs next to its weights, so one traced layer body serves both kinds.

Multimodal checkpoints load their language tower and ignore the rest: LLaVA / LLaVA-NeXT (a
Llama, Mistral or Qwen2 tower under `language_model`) and Qwen2-VL / Qwen2.5-VL (a Qwen2 tower
with M-RoPE: for text-only input the temporal, height and width positions are all the token
index, so each rotary section turns by the same angle and M-RoPE is exactly 1-D RoPE).
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

FAMILIES = ("llama", "qwen2", "qwen3", "gemma3")
# Hugging Face config.json model_type -> family (of the text tower, for multimodal models).
SUPPORTED_HF_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2",
                            "qwen3": "qwen3", "gemma3_text": "gemma3",
                            "qwen2_vl_text": "qwen2", "qwen2_5_vl_text": "qwen2"}
# Multimodal model types whose config.json nests the language tower's config as text_config.
MULTIMODAL_HF_MODEL_TYPES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")
ACTIVATION_NAMES = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
                    "gelu_tanh": "gelu_tanh"}
LAYER_TYPES = ("full_attention", "sliding_attention")
ROPE_TYPES = ("default", "linear", "llama3")
ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}
_NO_WINDOW = np.iinfo(np.int32).max // 2  # Window of a global layer inside a windowed stack.


@dataclasses.dataclass(frozen=True)
class LLMConfig:
    """Architecture of one decoder-only LLM (hashable: it is a static jit argument).

    rope_scaling: None or a tuple of (key, value) pairs of the transformers rope parameters
      (rope_type "linear": factor; "llama3": factor, low_freq_factor, high_freq_factor,
      original_max_position_embeddings); applies to full-attention layers.
    rope_freq_factors: None or per-frequency divisors [head_dim / 2] (GGUF's rope_freqs tensor,
      how llama.cpp stores Llama 3 scaling); applies to full-attention layers.
    local_rope_theta: rope base of sliding-window layers (Gemma 3); None: rope_theta.
    layer_types: per layer, "full_attention" or "sliding_attention" (window `sliding_window`).
    """

    family: str
    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    layer_types: tuple
    rope_scaling: tuple = None
    rope_freq_factors: tuple = None
    local_rope_theta: float = None
    sliding_window: int = None
    attention_scale: float = None  # None: head_dim ** -0.5.
    qkv_bias: bool = False
    o_bias: bool = False
    activation: str = "silu"
    tie_word_embeddings: bool = False
    final_logit_softcapping: float = None

    has_final_norm = True  # hidden_states[-1] is the last layer after the final norm.

    def __post_init__(self):
        problems = []
        if self.family not in FAMILIES:
            problems.append(f"family {self.family!r} (known: {FAMILIES})")
        if self.num_heads % self.num_kv_heads:
            problems.append(f"num_heads {self.num_heads} not a multiple of num_kv_heads "
                            f"{self.num_kv_heads}")
        if len(self.layer_types) != self.num_layers or set(self.layer_types) - set(LAYER_TYPES):
            problems.append(f"layer_types {self.layer_types} (need {self.num_layers} entries of "
                            f"{LAYER_TYPES})")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            problems.append("sliding_attention layers without a sliding_window")
        if self.activation not in ACTIVATIONS:
            problems.append(f"activation {self.activation!r} (known: {sorted(ACTIVATIONS)})")
        rope_type = dict(self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            problems.append(f"rope_type {rope_type!r} (supported: {ROPE_TYPES})")
        if problems:
            raise ValueError(f"LLM config {self.name!r}: " + "; ".join(problems))

    @classmethod
    def from_hf(cls, raw, name="model", where="config.json"):
        """A Hugging Face config.json dict -> LLMConfig (`where` names the file in errors).

        transformers' own config class fills defaults and derived fields (rope_parameters,
        layer_types), so a config.json means exactly what it means to transformers.
        """
        model_type = raw.get("model_type")
        from transformers import CONFIG_MAPPING
        top = None
        if model_type in MULTIMODAL_HF_MODEL_TYPES:  # The language tower's config.
            top = CONFIG_MAPPING[model_type].from_dict(dict(raw))
            raw = top.text_config.to_dict()
            model_type = raw.get("model_type")
            where = f"{where} (text_config)"
        if model_type not in SUPPORTED_HF_MODEL_TYPES:
            raise ValueError(f"{where}: model_type {model_type!r} "
                             f"(architectures {raw.get('architectures')}) is not supported; "
                             f"supported model types: "
                             f"{sorted({*SUPPORTED_HF_MODEL_TYPES, *MULTIMODAL_HF_MODEL_TYPES})}")
        hf = CONFIG_MAPPING[model_type].from_dict(dict(raw))
        family = SUPPORTED_HF_MODEL_TYPES[model_type]
        unsupported = {key: getattr(hf, key, None) for key in
                       ("mlp_bias", "attn_logit_softcapping", "use_bidirectional_attention")}
        unsupported = {k: v for k, v in unsupported.items() if v}
        if unsupported:
            raise ValueError(f"{where}: {unsupported} not supported (set them false/null)")
        activation = getattr(hf, "hidden_activation", None) or hf.hidden_act
        if activation not in ACTIVATION_NAMES:
            raise ValueError(f"{where}: activation {activation!r}; supported: "
                             f"{sorted(ACTIVATION_NAMES)}")
        heads = hf.num_attention_heads
        layer_types = getattr(hf, "layer_types", None)
        if layer_types is None:  # Llama: all global; Mistral: one window for every layer.
            sliding = getattr(hf, "sliding_window", None) if model_type == "mistral" else None
            layer_types = ["sliding_attention" if sliding else "full_attention"] * \
                hf.num_hidden_layers
        rope = dict(hf.rope_parameters)
        local_theta = None
        if family == "gemma3":  # Per layer type: {"sliding_attention": ..., "full_attention": ...}.
            local = rope["sliding_attention"]
            if local.get("rope_type", "default") != "default":
                raise ValueError(f"{where}: rope_parameters.sliding_attention type "
                                 f"{local['rope_type']!r}; only 'default' is supported there")
            local_theta, rope = local["rope_theta"], dict(rope["full_attention"])
        theta = rope.pop("rope_theta")
        attention_bias = bool(getattr(hf, "attention_bias", False))
        tie = getattr(hf, "tie_word_embeddings", None)
        if tie is None and top is not None:  # Qwen2-VL keeps it on the outer config only.
            tie = getattr(top, "tie_word_embeddings", False)
        return cls(
            family=family,
            name=name,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
            head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads,
            rms_norm_eps=hf.rms_norm_eps,
            rope_theta=theta,
            rope_scaling=(None if rope.get("rope_type", "default") == "default"
                          else tuple(sorted(rope.items()))),
            local_rope_theta=local_theta,
            layer_types=tuple(layer_types),
            sliding_window=getattr(hf, "sliding_window", None),
            attention_scale=hf.query_pre_attn_scalar**-0.5 if family == "gemma3" else None,
            qkv_bias=family == "qwen2" or attention_bias,  # Qwen2 always has q/k/v biases.
            o_bias=family in ("llama", "qwen3") and attention_bias,
            activation=ACTIVATION_NAMES[activation],
            tie_word_embeddings=bool(tie),
            final_logit_softcapping=getattr(hf, "final_logit_softcapping", None),
        )

    @property
    def is_gemma(self):
        return self.family == "gemma3"

    @property
    def qk_norm(self):
        """RMSNorm of q and k over head_dim before RoPE (Gemma 3, Qwen3)."""
        return self.family in ("gemma3", "qwen3")

    @property
    def norm_offset(self):
        """Gemma stores norm weights as w and applies 1 + w; Llama and Qwen2 apply w."""
        return 1.0 if self.is_gemma else 0.0

    @property
    def scale(self):
        return self.head_dim**-0.5 if self.attention_scale is None else self.attention_scale

    @property
    def has_sliding_layers(self):
        return "sliding_attention" in self.layer_types


def rope_inv_freq(config, layer_type):
    """Inverse frequencies [head_dim / 2] (float32) of a layer type, as transformers builds them.

    Gemma's sliding layers have their own base and no scaling; Mistral's / Qwen2's sliding
    layers share the global rope.
    """
    local = layer_type == "sliding_attention" and config.local_rope_theta is not None
    theta = config.local_rope_theta if local else config.rope_theta
    dim = config.head_dim
    inv_freq = 1.0 / (np.float32(theta) ** (np.arange(0, dim, 2).astype(np.float32) / dim))
    if local:
        return inv_freq.astype(np.float32)
    if config.rope_freq_factors is not None:
        inv_freq = inv_freq / np.asarray(config.rope_freq_factors, np.float32)
    scaling = dict(config.rope_scaling or {})
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    return inv_freq.astype(np.float32)


def _llama3_inv_freq(inv_freq, scaling):
    """Llama 3.1 frequency-dependent rope scaling (transformers' _compute_llama3_parameters)."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_context / high) & ~(wavelen > old_context / low)
    return np.where(is_medium, smoothed, scaled)


def apply_rope(x, cos, sin):
    """x [batch, len, heads, head_dim] rotated by cos/sin [batch, len, head_dim] (rotate-half
    layout)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def _layer_params(config):
    """name -> (per-layer shape, logical axes) of one decoder layer's weights."""
    e, h, kv, d = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    params = transformer_layer_params(e, h, kv, d, config.intermediate_size, gated=True)
    if config.qkv_bias:
        params.update(q_bias=((h, d), ("heads", "head_dim")),
                      k_bias=((kv, d), ("kv_heads", "head_dim")),
                      v_bias=((kv, d), ("kv_heads", "head_dim")))
    if config.o_bias:
        params["o_bias"] = ((e,), ("embed",))
    if config.qk_norm:
        params.update(q_norm=((d,), ("norm",)), k_norm=((d,), ("norm",)))
    if config.is_gemma:
        params.update(attn_post_norm=((e,), ("norm",)), mlp_post_norm=((e,), ("norm",)))
    return params


class DecoderLM(FrozenTextModel):
    """The decoder-only transformer. Built under `nnx.eval_shape` and filled by `weights.load_llm`.

    Variables: embed [vocab, embed]; final_norm [norm]; lm_head [embed, vocab] (untied only);
    layers.<name> [layers, ...] (see `_layer_params`).
    """

    def __init__(self, config, dtype=jnp.float32, attention="xla"):
        super().__init__(config, dtype, attention)
        self.embed = self.param((config.vocab_size, config.hidden_size), ("vocab", "embed"))
        self.final_norm = self.param((config.hidden_size,), ("norm",))
        self.lm_head = (None if config.tie_word_embeddings else
                        self.param((config.hidden_size, config.vocab_size), ("embed", "vocab")))
        self.layers = self.stacked_layers(_layer_params(config))

    def __call__(self, input_ids, attention_mask):
        """input_ids, attention_mask [batch, len] -> (embeddings, stacked layer outputs, final).

        embeddings [batch, len, embed]; stacked [layers, batch, len, embed] (raw residual stream
        after each layer); final [batch, len, embed] (last layer after the final norm).
        """
        x, stacked, last, _ = self.residual_stream(input_ids, attention_mask)
        final = rms_norm(last, self.final_norm[...], self.config.rms_norm_eps,
                         self.config.norm_offset)
        return x, stacked, final.astype(self.dtype)

    def residual_stream(self, input_ids, attention_mask, keep_layer_outputs=True, prefix=None,
                        return_keys_values=False):
        """-> (embeddings, stacked layer outputs or None, last residual stream float32, keys and
        values or None).

        Runs as many layers as the stacked weights hold (`keep_layers` drops the ones a chosen
        state does not need). keep_layer_outputs=False returns no stack: a single chosen layer
        then keeps one [batch, len, embed] state, not one per layer.

        prefix: None, or the keys and values {"keys", "values": [layers, P, kv_heads, head_dim]}
        of P tokens every row starts with (`text.in_step.PrefixCache`): input_ids are then the
        tokens after them, at positions P, P+1, ..., right-padded, each attending to all P
        prefix keys and causally to its own row's keys, as in the forward over [prefix, ids].
        return_keys_values: also return each layer's (roped) keys and values
        [layers, batch, len, kv_heads, head_dim] (what `prefix` takes, computed once).
        """
        c = self.config
        x = jnp.take(self.embed[...], input_ids, axis=0)
        if c.is_gemma:
            x = x * jnp.asarray(math.sqrt(c.hidden_size), self.dtype)
        x = constrain(x, ("batch", "length", "embed"))
        key_mask = attention_mask.astype(bool)

        weights = {name: p[...] for name, p in self.layers.items()}
        layer_types = c.layer_types[:next(iter(weights.values())).shape[0]]
        inv_freq = np.array([rope_inv_freq(c, t) for t in layer_types],  # [layers, hd / 2]
                            np.float32).reshape(len(layer_types), c.head_dim // 2)
        windows = np.array([c.sliding_window if t == "sliding_attention" else _NO_WINDOW
                            for t in layer_types], np.int32)
        # Positions count real tokens (cumsum of the mask - 1, as transformers' generate), so a
        # left-padded row's tokens sit at 0..n-1 like the unpadded sequence's: [batch, len].
        # After a prefix of P tokens (all real) they start at P.
        offset = 0 if prefix is None else prefix["keys"].shape[1]
        positions = (offset + jnp.maximum(jnp.cumsum(key_mask, axis=1) - 1, 0)).astype(
            jnp.float32)
        # Without a prefix the scan carries no keys: an empty [layers, 0] stand-in.
        prefix_kv = ((prefix["keys"], prefix["values"]) if prefix is not None else
                     (jnp.zeros((len(layer_types), 0)),) * 2)

        def layer(x, per_layer):
            params, layer_inv_freq, window, layer_prefix = per_layer
            angles = positions[..., None] * layer_inv_freq
            angles = jnp.concatenate([angles, angles], axis=-1)
            rope = (jnp.cos(angles).astype(self.dtype), jnp.sin(angles).astype(self.dtype))
            x, keys_values = self._decoder_layer(
                params, x, key_mask, rope, window if c.has_sliding_layers else None,
                layer_prefix if prefix is not None else None)
            return x, (x.astype(self.dtype) if keep_layer_outputs else None,
                       keys_values if return_keys_values else None)

        # The residual stream is carried in float32 whatever the weights' dtype: bf16 LLMs grow
        # "massive activations" (~2e4 in SmolLM2) whose bf16 rounding otherwise reaches 20% of
        # the state; matmuls still run in the weights' dtype. A no-op for float32 models.
        last, (stacked, keys_values) = jax.lax.scan(
            layer, x.astype(jnp.float32), (weights, inv_freq, windows, prefix_kv))
        return x, stacked, last, keys_values

    def _attend(self, q, k, v, key_mask, window, prefix):
        """Causal attention of q [batch, len, heads, head_dim] over k, v [batch, len, kv_heads,
        head_dim], after the `prefix` (keys, values) [P, kv_heads, head_dim] if any: query i
        (at index P + i) sees every prefix key and its row's keys j <= i (and, in a window
        layer, only keys after index P + i - window)."""
        c = self.config
        if prefix is None:
            return dot_product_attention(q, k, v, key_mask=key_mask, causal=True,
                                         sliding_window=window, scale=c.scale,
                                         implementation=self.attention)
        batch, length = q.shape[:2]
        prefix_len = prefix[0].shape[0]
        k, v = (jnp.concatenate([jnp.broadcast_to(p[None], (batch, *p.shape)), x], axis=1)
                for p, x in zip(prefix, (k, v)))
        key_mask = jnp.concatenate([jnp.ones((batch, prefix_len), bool), key_mask], axis=1)
        q_index = prefix_len + jnp.arange(length)[:, None]
        k_index = jnp.arange(prefix_len + length)[None, :]
        visible = k_index <= q_index
        if window is not None:
            visible = visible & (k_index > q_index - window)
        # The offset causal mask as a bias: `causal` needs as many queries as keys.
        bias = jnp.where(visible, 0.0, jnp.finfo(jnp.float32).min)[None, None]
        return dot_product_attention(q, k, v, key_mask=key_mask, bias=bias, scale=c.scale,
                                     implementation=self.attention)

    def _decoder_layer(self, p, x, key_mask, rope, window, prefix=None):
        """One pre-norm block (Gemma: sandwich norms) on x [batch, len, embed], after the
        `prefix` (keys, values) if any -> (x, (keys, values) of x's tokens)."""
        c = self.config

        def norm(h, name):
            return rms_norm(h, p[name], c.rms_norm_eps, c.norm_offset).astype(self.dtype)

        h = norm(x, "attn_norm")
        q = dense("ble,ehd->blhd", h, p["q"])
        k = dense("ble,ehd->blhd", h, p["k"])
        v = dense("ble,ehd->blhd", h, p["v"])
        if c.qkv_bias:
            q, k, v = q + p["q_bias"], k + p["k_bias"], v + p["v_bias"]
        if c.qk_norm:
            q, k = norm(q, "q_norm"), norm(k, "k_norm")
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q = constrain(q, ("batch", "length", "heads", "head_dim"))
        k = constrain(k, ("batch", "length", "kv_heads", "head_dim"))
        attended = self._attend(q, k, v, key_mask, window, prefix)
        h = dense("blhd,hde->ble", attended, p["o"])
        if c.o_bias:
            h = h + p["o_bias"]
        if c.is_gemma:
            h = norm(h, "attn_post_norm")
        x = constrain(x + h, ("batch", "length", "embed"))

        h = norm(x, "mlp_norm")
        gate = ACTIVATIONS[c.activation](dense("ble,ef->blf", h, p["gate"]))
        h = constrain(gate * dense("ble,ef->blf", h, p["up"]), ("batch", "length", "mlp"))
        h = dense("blf,fe->ble", h, p["down"])
        if c.is_gemma:
            h = norm(h, "mlp_post_norm")
        return constrain(x + h, ("batch", "length", "embed")), (k, v)

    def logits(self, final):
        """final hidden state [batch, len, embed] -> logits [batch, len, vocab]."""
        head = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        logits = constrain(dense("ble,ev->blv", final, head), ("batch", "length", "vocab"))
        cap = self.config.final_logit_softcapping
        return logits if cap is None else jnp.tanh(logits / cap) * cap

    def apply_final_norm(self, states):
        """The final norm on any [..., embed] states (e.g. a middle hidden state)."""
        return rms_norm(states, self.final_norm[...], self.config.rms_norm_eps,
                        self.config.norm_offset)
