"""A loaded frozen text model at run time (`LLM`): config, tokenizer, jitted forward passes and
the identity of its weights, for any family (`decoder.DecoderLM`, `bert.BertEncoder`,
`t5.T5Encoder`); `keep_layers` cuts its weights to the layers a chosen state needs.

`weights.load_llm` builds it; the forward passes are jitted once per (graphdef, shapes) and shared
by every loaded model.
"""
import copy

import jax
import jax.numpy as jnp
from flax import nnx

from lidit_jax.parallel.sharding import axis_rules


def _hidden_states(graphdef, state, input_ids, attention_mask):
    model = nnx.merge(graphdef, state)
    embeddings, stacked, final = model(input_ids, attention_mask)
    layers = stacked.shape[0]
    return (embeddings, *(stacked[i] for i in range(layers - 1)), final)


def _logits(graphdef, state, input_ids, attention_mask):
    model = nnx.merge(graphdef, state)
    return model.logits(model(input_ids, attention_mask)[2])


def _final_norm(graphdef, state, states):
    return nnx.merge(graphdef, state).apply_final_norm(states)


def keep_layers(state, depth):
    """A frozen text model's nnx.State with only its first `depth` layers (and no LM head).

    What a chosen hidden state needs (`text.in_step`): layer -3 of L reads L-2 blocks, so the
    other two never take memory. The LM head (logits only, 0.5e9 parameters in Llama 3 8B) keeps
    its place in the graph as an empty [embed, 0] placeholder.
    """
    def cut(path, x):
        name = path[0].key
        if name == "layers":
            return x[:depth]
        return x[:, :0] if name == "lm_head" else x
    return jax.tree_util.tree_map_with_path(cut, state)


# One compiled function per (graphdef, shapes): shared by every LLM, cached by jax.jit.
_jitted = {fn: jax.jit(fn, static_argnums=0) for fn in (_hidden_states, _logits, _final_norm)}


class LLM:
    """A loaded frozen LLM: config, tokenizer, jitted forward passes, identity of its weights.

    `name` is "<family>:<file or folder name>" (e.g. "llama:SmolLM2-135M-Instruct.Q4_1.gguf");
    `fingerprint` the sha256 of the weight files (`lidit_jax.fingerprint`, computed on first use);
    both are recorded by the text-state cache and checkpoints.
    """

    def __init__(self, model, *, name, fingerprint_fn, tokenizer_fn, mesh=None, rules=None):
        self.config = model.config
        self.name = name
        self.mesh, self.rules = mesh, rules
        self._graphdef, self._state = nnx.split(model)
        self._fingerprint_fn, self._fingerprint = fingerprint_fn, None
        self._tokenizer_fn, self._tokenizer = tokenizer_fn, None

    @property
    def tokenizer(self):
        """transformers tokenizer of the same folder / GGUF file (loaded on first use)."""
        if self._tokenizer is None:
            self._tokenizer = self._tokenizer_fn()
        return self._tokenizer

    @property
    def fingerprint(self):
        if self._fingerprint is None:
            self._fingerprint = self._fingerprint_fn()
        return self._fingerprint

    @property
    def model(self):
        return nnx.merge(self._graphdef, self._state)

    @property
    def graphdef(self):
        return self._graphdef

    @property
    def state(self):
        """The weights (nnx.State): `text.in_step` takes them as arguments of the caller's jit."""
        return self._state

    def truncated(self, depth):
        """This LLM with its first `depth` layers only and no LM head (`keep_layers`); its
        `hidden_states` then ends at layer `depth` (after the final norm), and it has no
        `logits`. The full weights are freed once the caller drops this LLM."""
        out = copy.copy(self)
        # In a jit that keeps each weight's sharding (eager slices may land on one device).
        shardings = jax.tree.map(lambda x: x.sharding, self._state)
        out._state = jax.jit(keep_layers, static_argnums=1, out_shardings=shardings)(
            self._state, depth)
        return out

    def _run(self, fn, *args):
        if self.mesh is None:
            return _jitted[fn](self._graphdef, self._state, *args)
        # The activation constraints inside need the mesh and the rules table in context.
        with jax.set_mesh(self.mesh), axis_rules(self.rules):
            return _jitted[fn](self._graphdef, self._state, *args)

    def hidden_states(self, input_ids, attention_mask):
        """input_ids, attention_mask [batch, len] -> L + 1 arrays [batch, len, embed].

        As transformers' output_hidden_states: entry 0 the (Gemma: scaled) embeddings, entries
        1..L-1 the residual stream after each layer, entry L the last layer after the final norm.
        """
        return self._run(_hidden_states, jnp.asarray(input_ids), jnp.asarray(attention_mask))

    def logits(self, input_ids, attention_mask):
        """input_ids, attention_mask [batch, len] -> next-token logits [batch, len, vocab]."""
        return self._run(_logits, jnp.asarray(input_ids), jnp.asarray(attention_mask))

    def final_norm(self, states):
        """The LLM's final norm applied to states [..., embed] (jitted; also callable inside
        the caller's jit: it sets no mesh context, as it has no sharding constraints)."""
        return _jitted[_final_norm](self._graphdef, self._state, states)
