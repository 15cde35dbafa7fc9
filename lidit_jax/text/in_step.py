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
    compiles per run.
Not done: the instruction / system prefix's keys and values are recomputed for every caption
(the same for every caption of a causal LLM; docs/pods.md has what it would save).
"""
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from lidit_jax.text import features
from lidit_jax.text.llm import DecoderLM

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


def chosen_states(model, choice, input_ids, attention_mask):
    """input_ids, attention_mask [batch, len] -> the states the denoiser receives, STATE_DTYPE:
    [batch, len, feature_width] ("attention_pool": [batch, len, L+1, width]).

    `model` holds the first `choice.depth` layers (or all of them). Hidden state k < L is the raw
    residual stream after k layers, state L the last one after the final norm (transformers'
    output_hidden_states).
    """
    depth, last_index = choice.depth, choice.num_layers
    if isinstance(model, DecoderLM) and isinstance(choice.layer, int):
        embeddings, _, last = model.residual_stream(input_ids, attention_mask,
                                                    keep_layer_outputs=False)
        if depth == 0:
            state = embeddings
        elif depth == last_index:
            state = model.apply_final_norm(last).astype(model.dtype)
        else:
            state = last.astype(model.dtype)
        hidden = {depth: state}
    else:  # Several states (or a BERT / T5 encoder): the stack of every layer run.
        embeddings, stacked, final = model(input_ids, attention_mask)
        hidden = {0: embeddings, **{k: stacked[k - 1] for k in range(1, depth + 1)}}
        if depth == last_index:
            hidden[last_index] = final
        if isinstance(choice.layer, str):
            hidden = [hidden[k] for k in range(last_index + 1)]
    final_norm = model.apply_final_norm if choice.final_norm else None
    states = features.select(hidden, choice.layer, choice.combine, final_norm)
    return jax.lax.stop_gradient(states.astype(STATE_DTYPE))


@dataclasses.dataclass(frozen=True)
class TextEncoders:
    """The frozen encoders a jitted function runs: graph definitions and state choices (static);
    the weights come in as arguments (`params`), one nnx.State per encoder.

    tokens: {"input_ids": [[batch, len_k] int32], "masks": [[batch, len_k] bool],
             "prompt_masks": [[batch, len_k] bool]}, one entry per encoder ->
    the denoiser's text inputs {"states": [[batch, len_k, width_k]], "masks", "prompt_masks"}.
    """

    graphdefs: tuple
    choices: tuple

    def __call__(self, params, tokens):
        states = [chosen_states(nnx.merge(graphdef, weights), choice, ids, mask)
                  for graphdef, choice, weights, ids, mask in zip(
                      self.graphdefs, self.choices, params, tokens["input_ids"],
                      tokens["masks"], strict=True)]
        return {"states": states, "masks": tokens["masks"],
                "prompt_masks": tokens["prompt_masks"]}
