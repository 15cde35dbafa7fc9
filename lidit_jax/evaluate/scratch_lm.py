"""The readout's controlled pair: one small transformer trained here from scratch on the
readout's training captions, twice.

  causal  next-token prediction under a causal attention mask (what SmolLM2 is)
  mlm     masked-LM: MASK_RATE of the words replaced by [MASK] and predicted, bidirectional
          attention (what MiniLM / BERT is)
Same word-level tokenizer, size, data, steps, optimizer and seed: the objective with its
attention mask is the one switch, which SmolLM2 vs MiniLM cannot isolate (they also differ in
size, pre-training data and tokenizer). The readout reads the last block's normed output, as it
reads an LLM's last layer. Arms `scratch_causal` / `scratch_mlm` (configs/readout/).

Budget: STEPS steps of BATCH captions, a few minutes per objective on the shared 2-core machine.
"""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lidit_jax.evaluate.readout_model import fit
from lidit_jax.nn.layers import MLP, Attention, RMSNorm, linear

OBJECTIVES = ("causal", "mlm")
WIDTH, DEPTH, HEADS = 128, 4, 4
MAX_LENGTH = 64  # Words + commas of the longest readout caption: 37.
# Next-token loss flattens by step 500 (0.71 at 500, 0.68 at 1000 on 4000 captions).
STEPS, BATCH, LEARNING_RATE = 500, 64, 1e-3
MASK_RATE = 0.15
SPECIALS = ("[PAD]", "[MASK]", "[UNK]")
_WORD = re.compile(r"\w+|,")


def word_offsets(caption):
    """[tokens, 2] character [start, stop) of each token (word or comma) of the caption."""
    return np.array([m.span() for m in _WORD.finditer(caption)], np.int64).reshape(-1, 2)


class WordTokenizer:
    """Words and commas of a caption corpus -> ids (no BOS: position 0 is the first word)."""

    def __init__(self, corpus):
        words = sorted({m.group() for caption in corpus for m in _WORD.finditer(caption)})
        self.vocab = {w: i for i, w in enumerate((*SPECIALS, *words))}

    def encode(self, captions):
        """-> ids int32 [n, MAX_LENGTH] (0 = [PAD] after the words), mask bool [n, MAX_LENGTH]."""
        ids = np.zeros((len(captions), MAX_LENGTH), np.int32)
        for i, caption in enumerate(captions):
            words = [self.vocab.get(m.group(), self.vocab["[UNK]"])
                     for m in _WORD.finditer(caption)]
            if len(words) > MAX_LENGTH:
                raise ValueError(f"caption of {len(words)} words > scratch_lm.MAX_LENGTH="
                                 f"{MAX_LENGTH}: {caption!r}")
            ids[i, :len(words)] = words
        return ids, ids != self.vocab["[PAD]"]


class ScratchLM(nnx.Module):
    """Token + learned position embeddings, DEPTH pre-norm blocks (self-attention, causal or
    not, and an MLP), a final norm and a vocabulary head."""

    def __init__(self, vocab_size, causal, *, rngs):
        init = nnx.initializers.normal(0.02)
        self.causal = causal
        self.embed = nnx.Embed(vocab_size, WIDTH, embedding_init=init, rngs=rngs)
        self.positions = nnx.Param(init(rngs.params(), (MAX_LENGTH, WIDTH)))
        self.attn_norms = nnx.List([RMSNorm(WIDTH) for _ in range(DEPTH)])
        self.attentions = nnx.List([Attention(WIDTH, HEADS, rngs=rngs) for _ in range(DEPTH)])
        self.mlp_norms = nnx.List([RMSNorm(WIDTH) for _ in range(DEPTH)])
        self.mlps = nnx.List([MLP(WIDTH, 4 * WIDTH, rngs=rngs) for _ in range(DEPTH)])
        self.out_norm = RMSNorm(WIDTH)
        self.head = linear(WIDTH, vocab_size, ("embed", "vocab"), rngs=rngs)

    def states(self, ids, mask):
        """ids [batch, len] int, mask [batch, len] bool -> [batch, len, WIDTH] float32."""
        x = self.embed(ids) + self.positions[:ids.shape[1]]
        for attn_norm, attention, mlp_norm, mlp in zip(self.attn_norms, self.attentions,
                                                       self.mlp_norms, self.mlps):
            x = x + attention(attn_norm(x), key_mask=mask, causal=self.causal)
            x = x + mlp(mlp_norm(x))
        return self.out_norm(x)

    def __call__(self, ids, mask):
        return self.head(self.states(ids, mask))


def lm_loss(model, batch, key, mask_id):
    """batch: ids [batch, len] int, mask [batch, len] bool. causal: next-token cross-entropy
    over real tokens; mlm: cross-entropy on the MASK_RATE of real tokens (drawn from `key`)
    replaced by [MASK]."""
    ids, mask = batch["ids"], batch["mask"]
    if model.causal:
        logits = model(ids, mask)[:, :-1]
        labels, weight = ids[:, 1:], mask[:, 1:]
    else:
        chosen = (jax.random.uniform(key, ids.shape) < MASK_RATE) & mask
        logits = model(jnp.where(chosen, mask_id, ids), mask)
        labels, weight = ids, chosen
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.sum(ce * weight) / jnp.maximum(jnp.sum(weight), 1)


def train(objective, corpus, seed=0, steps=STEPS):
    """-> (trained ScratchLM, its WordTokenizer) for objective "causal" | "mlm" on `corpus`."""
    if objective not in OBJECTIVES:
        raise ValueError(f"scratch_lm objective {objective!r}; known: {OBJECTIVES}")
    tokenizer = WordTokenizer(corpus)
    ids, mask = tokenizer.encode(corpus)
    length = int(mask.sum(1).max())  # Cropped: CPU time ~ tokens.
    model = ScratchLM(len(tokenizer.vocab), objective == "causal", rngs=nnx.Rngs(seed))
    mask_id = tokenizer.vocab["[MASK]"]
    fit(model, functools.partial(lm_loss, mask_id=mask_id),
        {"ids": ids[:, :length], "mask": mask[:, :length]}, steps=steps, batch_size=BATCH,
        learning_rate=LEARNING_RATE, seed=seed, name=f"scratch_lm {objective}")
    return model, tokenizer


def encode(model, tokenizer, captions):
    """-> dict(states [n, L, WIDTH] float32, mask [n, L] bool, prompt_mask (= mask: no
    template), the readout cache's layout; L = the longest caption's words."""
    ids, mask = tokenizer.encode(captions)
    length = int(mask.sum(1).max())
    ids, mask = ids[:, :length], mask[:, :length]
    states = nnx.jit(ScratchLM.states)(model, jnp.asarray(ids), jnp.asarray(mask))
    return {"states": np.asarray(states), "mask": mask, "prompt_mask": mask.copy()}
