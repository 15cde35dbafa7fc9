"""The frozen text encoders as one function of (weights, token ids), traced inside the caller's jit.

With `text.cache_dir=""` the train step runs the LLMs itself (train/step.py): the batch carries
token ids, the weights are frozen arguments of the step, sharded over the global mesh by the same
logical-axis rules as the DiT (FSDP, in `text.llms.<name>.dtype`), never in the optimizer state,
and the states leave through `stop_gradient`. `PromptEncoder.encode` (`--mode=encode`, sampling,
evaluation) calls the same `chosen_states`, so every path makes the same states.

Less work than transformers' forward for the same states:
  - depth: only the layers up to the deepest chosen state run (`StateChoice.depth`, weights cut
    by `llm.keep_layers`): layer -3 of L runs L-2 blocks;
  - one state: a single chosen layer of a decoder LLM keeps one [batch, len, embed] state, not
    a stack of L+1;
  - length: token ids are cut to a bucket of the batch's longest sequence (`length_bucket`: 16,
    32, 64, ... up to text.max_length), so short captions do not pay for max_length, at a few
    compiles per run;
  - prefix: every caption of a run starts with the same template tokens (chat template system
    part + the paper's instruction). For a causal LLM their states, keys and values are the
    same for every caption, so they are computed once per LLM at load (`prefix_cache`, from
    the frozen weights and the template only) and the blocks run over the caption part alone,
    its positions starting at the prefix's length and its queries attending to the prefix's
    keys (`DecoderLM.residual_stream`'s prefix). The output is the full forward's, prefix
    rows included. BERT / T5 (not causal), templates without a shared token prefix and left
    padding keep the full forward (`encoder.shared_prefix` says why, logged).
"""
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from lidit_jax.text import features
from lidit_jax.text.decoder import DecoderLM

STATE_DTYPE = jnp.bfloat16  # What the cache stores and the denoiser receives.
SMALLEST_BUCKET = 16


def length_bucket(longest, max_length):
    """Tokens per sequence for a batch whose longest has `longest` real tokens: the smallest of
    16, 32, 64, ... that holds it, at most max_length (log2(max_length / 16) + 1 shapes)."""
    bucket = SMALLEST_BUCKET
    while bucket < longest:
        bucket *= 2
    return min(bucket, max_length)


@dataclasses.dataclass(frozen=True)
class StateChoice:
    """Which of an encoder's L+1 hidden states the denoiser receives (hashable: static in jit).

    layer: an index in 0..L, a tuple of them, or a `features.STRATEGIES` name; combine and
    final_norm as `text.llms.<name>.layer_combine` / `.final_norm`; num_layers: L.
    """

    layer: object
    combine: str
    final_norm: bool
    num_layers: int

    @classmethod
    def of(cls, layer, combine, final_norm, num_layers):
        """From a parsed `text.llms.<name>.layer` (negative indices count from the end)."""
        if isinstance(layer, int):
            layer = layer % (num_layers + 1)
        elif isinstance(layer, tuple):
            layer = tuple(i % (num_layers + 1) for i in layer)
        return cls(layer, combine, bool(final_norm), num_layers)

    @property
    def depth(self):
        """Layers to run: the deepest chosen state's index (all L for a strategy)."""
        if isinstance(self.layer, int):
            return self.layer
        return max(self.layer) if isinstance(self.layer, tuple) else self.num_layers


def chosen_states(model, choice, input_ids, attention_mask, prefix=None):
    """input_ids, attention_mask [batch, len] -> the states the denoiser receives, STATE_DTYPE:
    [batch, len, feature_width] ("attention_pool": [batch, len, L+1, width]).

    `model` holds the first `choice.depth` layers (or all of them). Hidden state k < L is the raw
    residual stream after k layers, state L the last one after the final norm (transformers'
    output_hidden_states). prefix: None, or the `prefix_cache` of the P tokens every row starts
    with (right padding): the blocks then run over input_ids[:, P:] only, and the first P rows
    of the output are the cached prefix states (the same values as without the cache).
    """
    if not prefix:
        return _states(model, choice, input_ids, attention_mask)
    prefix_states = prefix["states"]  # [P, ...]
    length = prefix_states.shape[0]
    caption = _states(model, choice, input_ids[:, length:], attention_mask[:, length:], prefix)
    head = jnp.broadcast_to(prefix_states[None], (input_ids.shape[0], *prefix_states.shape))
    return jnp.concatenate([head, caption], axis=1)


def prefix_cache(model, choice, prefix_ids):
    """What the prefix's tokens contribute, computed once: prefix_ids [P] int32 ->
    {"keys", "values": [depth, P, kv_heads, head_dim] (the model's dtype, roped, per layer
    run), "states": [P, ...] STATE_DTYPE (`chosen_states` of the prefix alone; causal: the
    same in every caption)}. `model` is a DecoderLM cut to `choice.depth` layers."""
    ids = prefix_ids[None]
    mask = jnp.ones(ids.shape, bool)
    hidden, keys_values = _hidden_states(model, choice, ids, mask, None, keep_keys_values=True)
    keys, values = keys_values
    return {"keys": keys[:, 0], "values": values[:, 0],
            "states": _select(model, choice, hidden)[0]}


def _hidden_states(model, choice, input_ids, attention_mask, prefix, keep_keys_values=False):
    """-> ({index: [batch, len, embed]} of the hidden states the choice reads (a list of all
    L+1 for a strategy), the layers' keys and values or None)."""
    depth, last_index = choice.depth, choice.num_layers
    keys_values = None
    if isinstance(model, DecoderLM):
        single = isinstance(choice.layer, int)
        embeddings, stacked, last, keys_values = model.residual_stream(
            input_ids, attention_mask, keep_layer_outputs=not single, prefix=prefix,
            return_keys_values=keep_keys_values)
        hidden = {0: embeddings}
        if not single:  # Several states: the stack of every layer run.
            hidden.update({k: stacked[k - 1] for k in range(1, depth + 1)})
        if depth == last_index and depth:
            hidden[depth] = model.apply_final_norm(last).astype(model.dtype)
        elif depth:
            hidden[depth] = last.astype(model.dtype)
    else:  # A BERT / T5 encoder (not causal: no prefix).
        embeddings, stacked, final = model(input_ids, attention_mask)
        hidden = {0: embeddings, **{k: stacked[k - 1] for k in range(1, depth + 1)}}
        if depth == last_index:
            hidden[last_index] = final
    if isinstance(choice.layer, str):
        hidden = [hidden[k] for k in range(last_index + 1)]
    return hidden, keys_values


def _select(model, choice, hidden):
    final_norm = model.apply_final_norm if choice.final_norm else None
    states = features.select(hidden, choice.layer, choice.combine, final_norm)
    return jax.lax.stop_gradient(states.astype(STATE_DTYPE))


def _states(model, choice, input_ids, attention_mask, prefix=None):
    return _select(model, choice, _hidden_states(model, choice, input_ids, attention_mask,
                                                 prefix)[0])


# Every family's per-layer matmul weights (transformer.transformer_layer_params); norms and
# biases are element-wise.
_MATMUL_WEIGHTS = ("q", "k", "v", "o", "gate", "up", "down")


def encoder_flops(params, batch, length):
    """Model FLOPs of the frozen encoders' forward over `batch` rows of `length` tokens (the
    prefix's included), from their weights' and prefix caches' shapes (concrete or abstract
    `TextEncoders` params): per layer run, 2 x matmul weights x tokens run plus attention's
    4 n (P + n) heads head_dim per row, where n = length - P tokens run after a cached prefix of
    P (P = 0 without one; the logits are dense, as XLA computes them). The trainer's logged MFU
    and `--mode=compile`'s check of the compiler's encoder count use it."""
    total = 0
    for p in params:
        layers = p["weights"]["layers"]
        prefix = p["prefix"]["keys"].shape[1] if p["prefix"] else 0
        tokens = length - prefix
        q = jax.tree.leaves(layers["q"])[0]  # [depth, embed, heads, head_dim]
        depth, attention_width = q.shape[0], q.shape[2] * q.shape[3]
        matmul = sum(leaf.size for name in _MATMUL_WEIGHTS if name in layers
                     for leaf in jax.tree.leaves(layers[name]))
        total += batch * (2 * matmul * tokens
                          + depth * 4 * tokens * (prefix + tokens) * attention_width)
    return float(total)


@dataclasses.dataclass(frozen=True)
class TextEncoders:
    """The frozen encoders a jitted function runs: graph definitions and state choices (static);
    the weights come in as arguments (`params`), per encoder {"weights": nnx.State, "prefix":
    its `prefix_cache` or {} (full forward)}.

    tokens: per encoder {"input_ids": [batch, len_k] int32, "mask": [batch, len_k] bool,
    "prompt_mask": [batch, len_k] bool} -> the denoiser's text inputs, per encoder the same dict
    with "states" [batch, len_k, width_k] in place of "input_ids" (train/inputs.py).
    """

    graphdefs: tuple
    choices: tuple

    def __call__(self, params, tokens):
        return [{"states": chosen_states(nnx.merge(graphdef, p["weights"]), choice,
                                         t["input_ids"], t["mask"], p["prefix"]),
                 "mask": t["mask"], "prompt_mask": t["prompt_mask"]}
                for graphdef, choice, p, t in zip(self.graphdefs, self.choices, params, tokens,
                                                  strict=True)]
