"""Captions -> the refiners' inputs: one frozen LLM plus its prompt template per branch.

`PromptEncoder` runs one LLM; training reads its states from the text-state cache
(`--mode=encode`, `text/cache.py`) when `text.cache_dir` is set, else runs the LLMs inside the
train step on token ids (`text/in_step.py`, the function `encode` calls too). Either way a batch
of captions becomes, per LLM, {"states", "mask", "prompt_mask"} (the text-state convention of
train/inputs.py; a batch's "text" is the list of these, one per LLM), with states chosen by
`text.llms.<name>.layer` (one layer, several, all of them averaged or
all of them for a learned pool: `text/features.py`), optionally through the LLM's final norm.

What identifies an encoder and shapes its states (name, widths, the weights' fingerprint, the
template) comes from the model's metadata (config.json or the GGUF header) and its tokenizer;
the weights load on the first `encode`, so training from the text cache never reads them, and
only the layers the chosen states need stay loaded (`in_step.StateChoice.depth`). The template
tokens every caption starts with are run once at load (`shared_prefix`, `in_step.prefix_cache`).
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
from lidit_jax.parallel import sharding
from lidit_jax.parallel.sharding import axis_rules
from lidit_jax.text import architectures, features
from lidit_jax.text.decoder import LLMConfig
from lidit_jax.text.in_step import StateChoice, chosen_states, length_bucket, prefix_cache
from lidit_jax.text.models import resolve_model_path
from lidit_jax.text.tokenizer import PromptTemplate
from lidit_jax.text.weights import load_llm, model_name, open_source


# Captions whose first characters differ in kind (letters, digits, punctuation, spaces, CJK,
# emoji, empty): the tokens every one of them starts with are the shared prefix.
_PROBE_CAPTIONS = ("a", "A photo of a cat", "1 2 3", "(x)", " leading space", "\nnew line",
                   "-dash", '"quoted"', "'s", "日本語の文", "🙂 emoji", ".", "")


def shared_prefix(template, llm_config):
    """(prefix ids [P] int32 or None, why not): the template tokens every caption starts with,
    whose states, keys and values `in_step.prefix_cache` computes once.

    P is the longest token prefix that the template's tokenization of every probe caption
    shares, before any caption token, and that tokenizing the prefix text alone gives too:
    BPE merges can join the template's last characters with a caption's first (the
    instruction's trailing space and "a" make one token), so the prefix ends before them.
    None (full forward) for a model that is not causal, left padding, or no such prefix.
    """
    if not isinstance(llm_config, LLMConfig):
        return None, "not a causal LLM: every token's state depends on the caption"
    if template.padding_side != "right":
        return None, "text.padding_side='left' puts padding before the prefix"
    tokenized = template._tokenize(list(_PROBE_CAPTIONS))
    first = tokenized[0][0]
    length = min(span[0] for _, _, span in tokenized)
    for ids, _, _ in tokenized:
        same = [a == b for a, b in zip(first[:length], ids[:length])] + [False]
        length = min(length, same.index(False))
    offsets = tokenized[0][1]
    text = template.prefix
    while length > 0:  # Tokenized alone, the prefix text up to the boundary must give the same.
        end = int(offsets[:length, 1].max())
        alone = template.tokenizer(text[:end], add_special_tokens=template.chat_template is None)
        if list(alone["input_ids"]) == first[:length]:
            return np.asarray(first[:length], np.int32), ""
        length -= 1
    return None, "the template and the captions share no token prefix"


def prefix_shardings(mesh, rules, keys_shape):
    """Where a prefix cache lives on `mesh`: keys and values [depth, P, kv_heads, head_dim]
    with their kv heads over the mesh axis of `kv_heads` (like the k / v weights; replicated
    where it does not divide them), the prefix's states replicated."""
    kv = NamedSharding(mesh, sharding.logical_to_mesh_spec(
        (None, None, "kv_heads", "head_dim"), rules, mesh, keys_shape))
    return {"keys": kv, "values": kv, "states": NamedSharding(mesh, PartitionSpec())}


def configured_prefix(text_config, name, llm_config):
    """The shared prefix ids of encoder `name`'s template, read from its tokenizer (no weights;
    `--mode=compile`), or None: no prefix, or no tokenizer at text.llms.<name>.path (logged:
    the caller then counts the full forward)."""
    path = text_config.llms[name].path
    try:
        tokenizer = open_source(resolve_model_path(path, key=f"text.llms.{name}.path")
                                ).tokenizer() if path else None
    except (OSError, ValueError) as e:
        logging.warning("text.llms.%s: no tokenizer at %s (%s): counted without the template "
                        "prefix's reuse", name, path, e)
        return None
    if tokenizer is None:
        return None
    ids, _ = shared_prefix(PromptTemplate.from_config(text_config, tokenizer), llm_config)
    return ids


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
        self.prefix_ids, why_not = shared_prefix(self.template, self.llm_config)
        if self.prefix_ids is None:
            logging.info("text.llms.%s (%s): every caption runs the full forward (%s)", name,
                         self.llm_name, why_not)
        self._prefix = None
        self.prefix_mismatches = 0

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
            self._prefix = {} if self.prefix_ids is None else self._prefix_cache(self._llm)
        return self._llm

    def _prefix_cache(self, llm):
        """`in_step.prefix_cache` of `prefix_ids`, beside the weights on their mesh: keys and
        values with their kv heads over `tensor` (like the k / v weights), the rest replicated.
        Derived from the frozen weights and the template: never checkpointed."""
        logging.info("text.llms.%s: the %d template tokens every caption starts with run once "
                     "(their keys and values are reused)", self.name, len(self.prefix_ids))
        if self.mesh is None:
            return _prefix_cache(llm.graphdef, self.choice, llm.state,
                                 jnp.asarray(self.prefix_ids))
        ids = self._place(self.prefix_ids)
        keys = jax.eval_shape(functools.partial(_prefix_cache, llm.graphdef, self.choice),
                              llm.state, ids)["keys"]
        with jax.set_mesh(self.mesh), axis_rules(self.rules):
            return jax.jit(_prefix_cache, static_argnums=(0, 1), out_shardings=prefix_shardings(
                self.mesh, self.rules, keys.shape))(llm.graphdef, self.choice, llm.state, ids)

    @property
    def params(self):
        """What `in_step.TextEncoders` takes for this encoder (loads the weights if needed):
        {"weights": nnx.State, "prefix": the prefix cache or {} (full forward)}."""
        llm = self.load()
        return {"weights": llm.state, "prefix": self._prefix}

    def release(self):
        """Drops the loaded weights (their device memory); a later `encode` loads them again."""
        self._llm = self._prefix = None

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
        (host numpy; `PromptTemplate.encode_batch`)."""
        tokens = self.template.encode_batch(list(captions))
        if self.prefix_ids is not None:
            self._check_prefix(tokens["input_ids"], captions)
        return tokens

    def _check_prefix(self, input_ids, captions):
        """Rows that do not start with `prefix_ids` (a caption whose first characters merge
        further into the template than any of `shared_prefix`'s probes) get the shared
        prefix's states for those tokens: counted and logged (at counts 1, 2, 4, ...)."""
        prefix = self.prefix_ids
        rows = np.flatnonzero((input_ids[:, :len(prefix)] != prefix).any(axis=1))
        for row in rows:
            self.prefix_mismatches += 1
            if self.prefix_mismatches & (self.prefix_mismatches - 1) == 0:
                logging.warning("text.llms.%s: caption %.80r changes the template's tokens "
                                "before it; its first %d states are the shared prefix's (%d "
                                "such captions so far)", self.name, captions[row], len(prefix),
                                self.prefix_mismatches)

    def bucket(self, tokens):
        """Tokens per sequence for `tokenize`'s output: the shared prefix, if any, plus the
        `length_bucket` of the longest row's tokens after it, at most text.max_length (the
        blocks run over the part after the prefix only)."""
        prefix = 0 if self.prefix_ids is None else len(self.prefix_ids)
        max_length = self.template.max_length
        return prefix + length_bucket(self.longest_sequence(tokens) - prefix,
                                      max_length - prefix)

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
        (`bucket`): what the text cache uses, since it keeps real tokens only.
        Short captions under a long max_length then skip most of the LLM's work; the buckets
        bound the number of shapes to compile. The states come from `in_step.chosen_states`,
        as inside the train step.
        """
        tokens = self.tokenize(captions)
        if crop_padding:
            tokens = self.crop(tokens, self.bucket(tokens))
        graphdef, params = self.llm.graphdef, self.params
        ids, mask = (self._place(tokens[k]) for k in ("input_ids", "mask"))
        if self.mesh is None:
            states = _encode(graphdef, self.choice, params, ids, mask)
        else:  # The activation constraints inside need the mesh and the rules in context.
            with jax.set_mesh(self.mesh), axis_rules(self.rules):
                states = _encode(graphdef, self.choice, params, ids, mask)
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
def _encode(graphdef, choice, params, input_ids, attention_mask):
    """`in_step.chosen_states` as its own program, states replicated (readable on every host)."""
    states = chosen_states(nnx.merge(graphdef, params["weights"]), choice, input_ids,
                           attention_mask, params["prefix"])
    return jax.lax.with_sharding_constraint(states, PartitionSpec()) if _has_mesh() else states


def _prefix_cache(graphdef, choice, state, prefix_ids):
    return prefix_cache(nnx.merge(graphdef, state), choice, prefix_ids)


def abstract_prefix_cache(graphdef, choice, abstract_state, prefix_ids, mesh, rules):
    """ShapeDtypeStructs, with their shardings, of the prefix cache (`--mode=compile`)."""
    shapes = jax.eval_shape(functools.partial(_prefix_cache, graphdef, choice), abstract_state,
                            jax.ShapeDtypeStruct((len(prefix_ids),), jnp.int32))
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        shapes, prefix_shardings(mesh, rules, shapes["keys"].shape))


def _has_mesh():
    return not jax.sharding.get_abstract_mesh().empty
