"""Captions -> the refiners' inputs: one frozen LLM plus its prompt template per branch.

`PromptEncoder` runs one LLM; training reads its states from the text-state cache
(`--mode=encode`, `text/cache.py`) when `text.cache_dir` is set, else encodes online
(`train/inputs.py`). Either way a batch of captions becomes
  {"states": [[batch, max_length, width_k] per LLM], "masks": [...], "prompt_masks": [...]}
with states taken from hidden layer `text.llms.<name>.layer` (optionally through the LLM's
final norm).
"""
import jax
import jax.numpy as jnp
import numpy as np

from lidit_jax import configuration
from lidit_jax.parallel import mesh as mesh_lib
from lidit_jax.text.models import resolve_model_path
from lidit_jax.text.tokenizer import PromptTemplate
from lidit_jax.text.weights import load_llm

STATE_DTYPE = jnp.bfloat16  # What the cache stores and the denoiser receives.
CROP_MULTIPLE = 16  # encode(crop_padding=True) pads to a multiple of this many tokens.


class PromptEncoder:
    """One frozen LLM and its prompt template: captions -> hidden states of the chosen layer."""

    def __init__(self, name, llm_config, text_config, mesh=None, rules=None):
        self.name = name
        self.layer = llm_config.layer
        self.apply_final_norm = llm_config.final_norm
        self.llm = load_llm(resolve_model_path(llm_config.path, key=f"text.llms.{name}.path"),
                            dtype=jnp.dtype(llm_config.dtype), mesh=mesh, rules=rules,
                            attention=text_config.attention)
        num_states = self.llm.config.num_layers + 1
        if not -num_states <= self.layer < num_states:
            raise configuration.ConfigError(
                f"text.llms.{name}.layer={self.layer} is outside the {num_states} hidden states "
                f"of {self.llm.name}")
        self.template = PromptTemplate.from_config(text_config, self.llm.tokenizer)
        self._select = jax.jit(self._select_layer)

    @classmethod
    def from_config(cls, config, name):
        """Encoder `name` of config.text, its weights sharded over this process's devices."""
        return cls(name, config.text.llms[name], config.text, mesh=mesh_lib.local_mesh(),
                   rules=config.mesh.rules)

    @property
    def width(self):
        return self.llm.config.hidden_size

    def _select_layer(self, hidden_states):
        states = hidden_states[self.layer]
        if self.apply_final_norm:
            states = self.llm.final_norm(states)
        return states.astype(STATE_DTYPE)

    def metadata(self):
        """What identifies these states: the cache and checkpoints record and compare it."""
        return {"llm": self.llm.name, "fingerprint": self.llm.fingerprint, "layer": self.layer,
                "final_norm": bool(self.apply_final_norm), "template": self.template.description()}

    def encode(self, captions, crop_padding=False):
        """list of str -> dict(states [b, L, width] bf16, mask [b, L] bool, prompt_mask [b, L]).

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
    states = entry["states"]
    length = states.shape[0]
    padded = np.zeros((max_length, states.shape[1]), states.dtype)
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
