"""Captions -> the refiners' inputs: one frozen LLM plus its prompt template per branch.

`PromptEncoder` runs one LLM; training reads its states from the text-state cache
(`--mode=encode`, `text/cache.py`) when `text.cache_dir` is set, else runs the LLMs inside the
train step on token ids (`text/in_step.py`, the function `encode` calls too). Either way a batch
of captions becomes
  {"states": [[batch, max_length, width_k] per LLM], "masks": [...], "prompt_masks": [...]}
with states chosen by `text.llms.<name>.layer` (one layer, several, all of them averaged or
all of them for a learned pool: `text/features.py`), optionally through the LLM's final norm.

What identifies an encoder and shapes its states (name, widths, the weights' fingerprint, the
template) comes from the model's metadata (config.json or the GGUF header) and its tokenizer;
the weights load on the first `encode`, so training from the text cache never reads them, and
only the layers the chosen states need stay loaded (`in_step.StateChoice.depth`).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from lidit_jax.errors import ConfigError
from lidit_jax.fingerprint import file_fingerprint
from lidit_jax.parallel import mesh as mesh_lib
from lidit_jax.parallel.sharding import axis_rules
from lidit_jax.text import architectures, features
from lidit_jax.text.in_step import StateChoice, chosen_states, length_bucket
from lidit_jax.text.models import resolve_model_path
from lidit_jax.text.tokenizer import PromptTemplate
from lidit_jax.text.weights import load_llm, model_name, open_source


class PromptEncoder:
    """One frozen LLM and its prompt template: captions -> hidden states of the chosen layer."""

    def __init__(self, name, llm_config, text_config, mesh=None, rules=None):
        self.name = name
        self.mesh, self.rules = mesh, rules
        key = f"text.llms.{name}"
        try:
            self.layer = features.parse(llm_config.layer, llm_config.layer_combine, key)
        except features.LayerChoiceError as e:
            raise ConfigError(str(e)) from None
        self.layer_combine = llm_config.layer_combine
        self.apply_final_norm = llm_config.final_norm
        self.path = resolve_model_path(llm_config.path, key=f"{key}.path")
        self._load_options = dict(dtype=jnp.dtype(llm_config.dtype), mesh=mesh, rules=rules,
                                  attention=text_config.attention)
        self._llm = None
        self._source = open_source(self.path)  # Metadata, tensor table, tokenizer: no weights.
        self.llm_config = self._source.config
        self.llm_name = model_name(self.llm_config)
        try:
            features.check_range(self.layer, self.llm_config.num_layers + 1, key, self.llm_name)
        except features.LayerChoiceError as e:
            raise ConfigError(str(e)) from None
        self._check_configured_shape(llm_config, key)
        if self.apply_final_norm and not self.llm_config.has_final_norm:
            raise ConfigError(
                f"text.llms.{name}.final_norm=True, but {self.llm_name} has no final norm (its "
                "last hidden state is already normalised); set it to False")
        self.template = PromptTemplate.from_config(text_config, self._source.tokenizer())
        self.choice = StateChoice.of(self.layer, self.layer_combine, self.apply_final_norm,
                                     self.llm_config.num_layers)

    @classmethod
    def from_config(cls, config, name, mesh=None):
        """Encoder `name` of config.text, its weights sharded over `mesh` (default: this
        process's devices; the train step's encoders: the global mesh)."""
        return cls(name, config.text.llms[name], config.text,
                   mesh=mesh_lib.local_mesh() if mesh is None else mesh, rules=config.mesh.rules)

    @property
    def llm(self):
        """The `LLM`, its weights read on first use (`encode`), not before."""
        return self.load()

    def load(self):
        """Reads the weights now, unless loaded already; returns the `LLM`, cut to the layers
        the chosen states need (`LLM.truncated`)."""
        if self._llm is None:
            logging.info("loading the weights of %s (text.llms.%s) from %s (%d of %d layers "
                         "used)", self.llm_name, self.name, self.path, self.choice.depth,
                         self.llm_config.num_layers)
            self._llm = load_llm(self.path, **self._load_options).truncated(self.choice.depth)
        return self._llm

    def release(self):
        """Drops the loaded weights (their device memory); a later `encode` loads them again."""
        self._llm = None

    def _check_configured_shape(self, llm_config, key):
        """The config's width / architecture (used while no weights are known: describe,
        compile) must be the loaded model's, or those reports described another model."""
        hidden = self.llm_config.hidden_size
        if llm_config.width and llm_config.width != hidden:
            raise ConfigError(
                f"{key}.width={llm_config.width}, but {self.llm_name} at {self.path} has hidden "
                f"size {hidden}; set {key}.width={hidden} (or 0 to read it from the weights)")
        if llm_config.get("architecture"):
            try:
                architectures.check_matches(llm_config.architecture, self.llm_config,
                                            f"{key}.architecture")
            except ValueError as e:
                raise ConfigError(f"{e} ({self.path}); set {key}.architecture "
                                  "to match or to ''") from None

    @property
    def width(self):
        """Channels of the states this encoder feeds the denoiser (features.feature_width)."""
        return features.feature_width(self.layer, self.layer_combine, self.llm_config.hidden_size)

    @property
    def state_shape(self):
        """Trailing shape of the states after [batch, L]: (width,), or (num_layers + 1, width)
        for layer="attention_pool" (all hidden states are kept)."""
        if self.layer == "attention_pool":
            return (self.llm_config.num_layers + 1, self.width)
        return (self.width,)

    @functools.cached_property
    def fingerprint(self):
        """Of the weight files (lidit_jax.fingerprint: a stat per file after the first time)."""
        return file_fingerprint(self._source.fingerprint_files)

    def metadata(self):
        """What identifies these states: the cache and checkpoints record and compare it."""
        return {"llm": self.llm_name, "fingerprint": self.fingerprint,
                "layer": features.describe(self.layer, self.layer_combine),
                "final_norm": bool(self.apply_final_norm), "template": self.template.description()}

    def tokenize(self, captions):
        """list of str -> {"input_ids" int32, "mask" bool, "prompt_mask" bool} [b, max_length]
        (host numpy)."""
        tokens = self.template.encode_batch(list(captions))
        return {"input_ids": tokens["input_ids"], "mask": tokens["attention_mask"],
                "prompt_mask": tokens["prompt_mask"]}

    def crop(self, tokens, length):
        """`tokenize`'s output cut to `length` tokens, real tokens kept on either padding side
        (`length` >= `longest_sequence(tokens)`)."""
        if self.template.padding_side == "right":
            return {k: v[:, :length] for k, v in tokens.items()}
        return {k: v[:, v.shape[1] - length:] for k, v in tokens.items()}

    @staticmethod
    def longest_sequence(tokens):
        """Real tokens of the longest sequence of `tokenize`'s output."""
        return int(tokens["mask"].sum(axis=1).max())

    def encode(self, captions, crop_padding=False):
        """list of str -> dict(states [b, L, width] bf16 (layer="attention_pool": [b, L,
        num_layers + 1, width]), mask [b, L] bool, prompt_mask [b, L] bool), replicated.

        L is text.max_length, or with `crop_padding` the bucket of the batch's longest sequence
        (`in_step.length_bucket`): what the text cache uses, since it keeps real tokens only.
        Short captions under a long max_length then skip most of the LLM's work; the buckets
        bound the number of shapes to compile. The states come from `in_step.chosen_states`,
        as inside the train step.
        """
        tokens = self.tokenize(captions)
        if crop_padding:
            tokens = self.crop(tokens, length_bucket(self.longest_sequence(tokens),
                                                     self.template.max_length))
        llm = self.llm
        ids, mask = (self._place(tokens[k]) for k in ("input_ids", "mask"))
        if self.mesh is None:
            states = _encode(llm.graphdef, self.choice, llm.state, ids, mask)
        else:  # The activation constraints inside need the mesh and the rules in context.
            with jax.set_mesh(self.mesh), axis_rules(self.rules):
                states = _encode(llm.graphdef, self.choice, llm.state, ids, mask)
        return {"states": states, "mask": jnp.asarray(tokens["mask"]),
                "prompt_mask": jnp.asarray(tokens["prompt_mask"])}

    def _place(self, array):
        """Host array -> replicated on the encoder's mesh: the same on every process, so a
        mesh over several hosts (the train step's) encodes fixed prompts too."""
        if self.mesh is None:
            return jnp.asarray(array)
        return jax.make_array_from_process_local_data(
            NamedSharding(self.mesh, PartitionSpec()), array)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _encode(graphdef, choice, state, input_ids, attention_mask):
    """`in_step.chosen_states` as its own program, states replicated (readable on every host)."""
    states = chosen_states(nnx.merge(graphdef, state), choice, input_ids, attention_mask)
    return jax.lax.with_sharding_constraint(states, PartitionSpec()) if _has_mesh() else states


def _has_mesh():
    return not jax.sharding.get_abstract_mesh().empty


def as_text_inputs(per_llm):
    """[per-LLM dicts] -> the denoiser's text pytree {'states': [...], 'masks': [...], ...}."""
    return {"states": [e["states"] for e in per_llm], "masks": [e["mask"] for e in per_llm],
            "prompt_masks": [e["prompt_mask"] for e in per_llm]}


def pad_entry(entry, max_length):
    """A cached entry (trimmed to its real tokens) -> fixed [max_length] arrays (host numpy)."""
    states = entry["states"]  # [length, width] or [length, states, width] (attention_pool).
    length = states.shape[0]
    padded = np.zeros((max_length, *states.shape[1:]), states.dtype)
    padded[:length] = states
    mask = np.zeros((max_length,), bool)
    mask[:length] = True
    prompt_mask = np.zeros((max_length,), bool)
    start, stop = entry["prompt_span"]
    prompt_mask[start:stop] = True
    return {"states": padded, "mask": mask, "prompt_mask": prompt_mask}


def trim_entry(states, mask, prompt_mask):
    """One example's fixed-length arrays -> the cache's compact form (real tokens only).

    Right padding is assumed (text.padding_side='right' for caching): real tokens come first.
    """
    length = int(np.sum(mask))
    span = np.flatnonzero(prompt_mask)
    start, stop = (int(span[0]), int(span[-1]) + 1) if span.size else (length, length)
    return {"states": np.asarray(states[:length]), "prompt_span": np.array([start, stop], np.int32)}
