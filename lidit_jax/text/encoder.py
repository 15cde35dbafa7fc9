"""Captions -> the refiners' inputs: one frozen LLM plus its prompt template per branch.

`PromptEncoder` runs one LLM; training reads its states from the text-state cache
(`--mode=encode`, `text/cache.py`) when `text.cache_dir` is set, else encodes online
(`train/inputs.py`). Either way a batch of captions becomes
  {"states": [[batch, max_length, width_k] per LLM], "masks": [...], "prompt_masks": [...]}
with states chosen by `text.llms.<name>.layer` (one layer, several, all of them averaged or
all of them for a learned pool: `text/features.py`), optionally through the LLM's final norm.

What identifies an encoder and shapes its states (name, widths, the weights' fingerprint, the
template) comes from the model's metadata (config.json or the GGUF header) and its tokenizer;
the weights load on the first `encode`, so training from the text cache never reads them.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from lidit_jax import configuration
from lidit_jax.fingerprint import file_fingerprint
from lidit_jax.parallel import mesh as mesh_lib
from lidit_jax.text import features
from lidit_jax.text.models import resolve_model_path
from lidit_jax.text.tokenizer import PromptTemplate
from lidit_jax.text.weights import load_llm, model_name, open_source

STATE_DTYPE = jnp.bfloat16  # What the cache stores and the denoiser receives.
CROP_MULTIPLE = 16  # encode(crop_padding=True) pads to a multiple of this many tokens.


class PromptEncoder:
    """One frozen LLM and its prompt template: captions -> hidden states of the chosen layer."""

    def __init__(self, name, llm_config, text_config, mesh=None, rules=None):
        self.name = name
        key = f"text.llms.{name}"
        try:
            self.layer = features.parse(llm_config.layer, llm_config.layer_combine, key)
        except features.LayerChoiceError as e:
            raise configuration.ConfigError(str(e)) from None
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
            raise configuration.ConfigError(str(e)) from None
        if self.apply_final_norm and not self.llm_config.has_final_norm:
            raise configuration.ConfigError(
                f"text.llms.{name}.final_norm=True, but {self.llm_name} has no final norm (its "
                "last hidden state is already normalised); set it to False")
        self.template = PromptTemplate.from_config(text_config, self._source.tokenizer())
        self._select = jax.jit(self._select_layer)

    @classmethod
    def from_config(cls, config, name):
        """Encoder `name` of config.text, its weights sharded over this process's devices."""
        return cls(name, config.text.llms[name], config.text, mesh=mesh_lib.local_mesh(),
                   rules=config.mesh.rules)

    @property
    def llm(self):
        """The `LLM`, its weights read on first use (`encode`), not before."""
        return self.load()

    def load(self):
        """Reads the weights now, unless loaded already; returns the `LLM`."""
        if self._llm is None:
            logging.info("loading the weights of %s (text.llms.%s) from %s", self.llm_name,
                         self.name, self.path)
            self._llm = load_llm(self.path, **self._load_options)
        return self._llm

    def release(self):
        """Drops the loaded weights (their device memory); a later `encode` loads them again."""
        self._llm = None
        self._select = jax.jit(self._select_layer)  # The old trace holds the final norm's weights.

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

    def _select_layer(self, hidden_states):
        final_norm = self.llm.final_norm if self.apply_final_norm else None
        states = features.select(hidden_states, self.layer, self.layer_combine, final_norm)
        return states.astype(STATE_DTYPE)

    def metadata(self):
        """What identifies these states: the cache and checkpoints record and compare it."""
        return {"llm": self.llm_name, "fingerprint": self.fingerprint,
                "layer": features.describe(self.layer, self.layer_combine),
                "final_norm": bool(self.apply_final_norm), "template": self.template.description()}

    def encode(self, captions, crop_padding=False):
        """list of str -> dict(states [b, L, width] bf16 (layer="attention_pool": [b, L,
        num_layers + 1, width]), mask [b, L] bool, prompt_mask [b, L] bool).

        L is text.max_length, or with `crop_padding` (right padding only) the batch's longest
        sequence rounded up to a multiple of CROP_MULTIPLE: what the text cache uses, since it
        keeps real tokens only. Short captions under a long max_length then skip most of the
        LLM's work; the rounding bounds the number of shapes to compile.
        """
        tokens = self.template.encode_batch(list(captions))
        if crop_padding:
            if self.template.padding_side != "right":
                raise ValueError("crop_padding needs text.padding_side=right")
            longest = int(tokens["attention_mask"].sum(axis=1).max())
            length = min(-(-longest // CROP_MULTIPLE) * CROP_MULTIPLE, self.template.max_length)
            tokens = {k: v[:, :length] for k, v in tokens.items() if k != "prompt_span"}
        states = self._select(self.llm.hidden_states(jnp.asarray(tokens["input_ids"]),
                                                     jnp.asarray(tokens["attention_mask"])))
        return {"states": states, "mask": jnp.asarray(tokens["attention_mask"]),
                "prompt_mask": jnp.asarray(tokens["prompt_mask"])}


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
