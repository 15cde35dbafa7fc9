"""The readout benchmark's model and its training (readout.py runs it per arm and seed).

  t_emb(t) + the project's TextConditioner (config.text, unchanged; its gates see a random t in
  training, t = EVAL_T at test) + a QueryDecoder of four learned queries over its tokens.
Two readouts (readout_prompts.HEADS), the `--readout` flag of readout.py:
  slots     query k stands for slot k of the 2x2 grid and cross-attends to EVERY prompt token;
            heads: colour (8 + empty), shape, size. Whatever the encoder, the last tokens of a
            caption have read all of it, so this readout finds late-bound slots even in a
            causal LLM (/work/notes/readout.md: every arm 0.95-1.00).
  mentions  query k stands for the k-th mentioned object and attends ONLY to the tokens of that
            object's noun phrase ("a large red circle", Item.spans); heads: its slot, colour,
            shape, size. A causal encoder's noun-phrase tokens cannot have read a slot phrase
            that comes later, so this is where the paper's claim can show (as probes.py's
            per-token probe, with a trained nonlinear readout instead of a ridge one).
The queries never attend to each other, so query k reads nothing outside its own keys.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from lidit_jax.evaluate import readout_prompts as prompts
from lidit_jax.nn.layers import MLP, Attention, RMSNorm, TimestepEmbedder, linear
from lidit_jax.text.refiner import TextConditioner, keep_one_key

EVAL_T = 500.0  # Model time (0..1000) the refiner's gates see at test.
DECODER_DEPTH = 2
SPAN_TOKENS = 8  # Most tokens of one noun phrase ("a large purple triangle": 4-6 in any tokenizer).
PREDICT_BATCH = 256


class QueryDecoder(nnx.Module):
    """Learned queries cross-attending to text tokens -> logits {head: [batch, queries,
    classes]}. Either every query reads the same tokens: context [batch, len, embed], key_mask
    [batch, len]; or each query reads its own: context [batch, queries, len, embed], key_mask
    [batch, queries, len] (a query is then a batch row of its own)."""

    def __init__(self, width, heads, num_queries, classes, *, rngs):
        self.queries = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(),
                                                               (num_queries, width)))
        self.context_norm = RMSNorm(width)
        self.attn_norms = nnx.List([RMSNorm(width) for _ in range(DECODER_DEPTH)])
        self.attentions = nnx.List([Attention(width, heads, rngs=rngs)
                                    for _ in range(DECODER_DEPTH)])
        self.mlp_norms = nnx.List([RMSNorm(width) for _ in range(DECODER_DEPTH)])
        self.mlps = nnx.List([MLP(width, 4 * width, rngs=rngs) for _ in range(DECODER_DEPTH)])
        self.out_norm = RMSNorm(width)
        self.heads = nnx.Dict({name: linear(width, count, ("embed", "vocab"), rngs=rngs)
                               for name, count in classes.items()})

    def __call__(self, context, key_mask):
        batch, width = context.shape[0], context.shape[-1]
        num_queries = self.queries.shape[0]
        context = self.context_norm(context)
        x = jnp.broadcast_to(self.queries[...], (batch, num_queries, width))
        if key_mask.ndim == 3:
            context = context.reshape(batch * num_queries, *context.shape[2:])
            x = x.reshape(batch * num_queries, 1, width)
            # A query with no keys (no k-th mention) reads position 0; it is never scored.
            key_mask = keep_one_key(key_mask.reshape(batch * num_queries, -1))
        for attn_norm, attention, mlp_norm, mlp in zip(self.attn_norms, self.attentions,
                                                       self.mlp_norms, self.mlps):
            x = x + attention(attn_norm(x), context, key_mask=key_mask)
            x = x + mlp(mlp_norm(x))
        x = self.out_norm(x).reshape(batch, num_queries, width)
        return {name: head(x) for name, head in self.heads.items()}


def span_tokens(tokens, keys):
    """Each mention's own tokens: tokens [batch, len, embed], keys [batch, len, queries] bool ->
    context [batch, queries, SPAN_TOKENS, embed] (the span's tokens first, in order), key_mask
    [batch, queries, SPAN_TOKENS]. Gathering SPAN_TOKENS keys per query instead of masking the
    whole caption halves the readout's step time on CPU."""
    keys = jnp.swapaxes(keys, 1, 2)  # [batch, queries, len]
    order = jnp.argsort(~keys, axis=-1, stable=True)[..., :SPAN_TOKENS]
    context = jnp.take_along_axis(tokens[:, None], order[..., None], axis=2)
    return context, jnp.take_along_axis(keys, order, axis=2)


class ReadoutModel(nnx.Module):
    """t_emb + the project's TextConditioner (config.text, width config.model.width) + a
    QueryDecoder for `readout` ("slots" | "mentions")."""

    def __init__(self, config, llm_width, readout, *, rngs):
        width = config.model.width
        self.readout = readout
        self.time_embed = TimestepEmbedder(width, rngs=rngs)
        self.text = TextConditioner(config.text, [llm_width], width, rngs=rngs)
        self.decoder = QueryDecoder(width, config.text.refiner.heads, prompts.NUM_SLOTS,
                                    prompts.HEADS[readout], rngs=rngs)

    def __call__(self, states, mask, prompt_mask, t, mention_mask):
        """states [batch, L, width_k]; mask, prompt_mask [batch, L] bool; t [batch] (0..1000);
        mention_mask [batch, L, NUM_SLOTS] bool (token l is in mention k's noun phrase; read by
        the mentions readout only)."""
        tokens, token_mask, _ = self.text([states], [mask], [prompt_mask], self.time_embed(t))
        if self.readout == "slots":
            return self.decoder(tokens, token_mask)
        # The mention spans travel with the tokens the conditioner keeps (and moves).
        kept, _ = self.text.select(mention_mask.astype(jnp.float32), mask, prompt_mask)
        return self.decoder(*span_tokens(tokens, (kept > 0.5) & token_mask[..., None]))


def loss_fn(model, batch, key):
    """Cross-entropy per head over the queries that have a target (>= 0): slots readout:
    colour (incl. empty) on every slot, shape and size on occupied ones; mentions readout:
    every head on every mentioned object. The refiner's gates see a t drawn from `key`."""
    t = jax.random.uniform(key, batch["mask"].shape[:1], maxval=1000.0)
    logits = model(batch["states"].astype(jnp.float32), batch["mask"], batch["prompt_mask"], t,
                   batch["mention_mask"])
    total = 0.0
    for name, head_logits in logits.items():
        labels = batch[name]
        ce = optax.softmax_cross_entropy_with_integer_labels(head_logits, jnp.maximum(labels, 0))
        weight = (labels >= 0).astype(ce.dtype)
        total = total + jnp.sum(ce * weight) / jnp.maximum(jnp.sum(weight), 1.0)
    return total


INPUTS = ("states", "mask", "prompt_mask", "mention_mask")


def fit(model, loss, arrays, *, steps, batch_size, learning_rate, seed, name):
    """Trains `model` in place (the readout's and scratch_lm's one training loop): AdamW
    (weight decay 0.01), linear warmup over min(100, steps / 10) steps then cosine decay; each
    step draws batch_size rows of `arrays` ({key: [n, ...]}) with replacement and minimises
    loss(model, {key: [batch_size, ...]}, rng key) (the key: the loss's own randomness)."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(100, steps // 10 + 1),
                                                  steps)
    optimizer = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=0.01), wrt=nnx.Param)
    arrays = {k: jnp.asarray(v) for k, v in arrays.items()}
    rows_total = next(iter(arrays.values())).shape[0]

    # The arrays are arguments, not closed-over constants: XLA would otherwise fold the whole
    # training set into the program (seconds of compile per arm, a copy in memory).
    @nnx.jit
    def step(model, optimizer, arrays, key):
        rows_key, loss_key = jax.random.split(key)
        rows = jax.random.randint(rows_key, (batch_size,), 0, rows_total)
        value, grads = nnx.value_and_grad(loss)(model, {k: v[rows] for k, v in arrays.items()},
                                                loss_key)
        optimizer.update(model, grads)
        return value

    key = jax.random.key(seed)
    for i in range(steps):
        value = step(model, optimizer, arrays, jax.random.fold_in(key, i))
        if i % 250 == 0 or i == steps - 1:
            logging.info("%s: step %d loss %.4f", name, i, float(value))


def train_and_predict(config, readout, train_data, test_data, seed, steps, batch_size,
                      learning_rate):
    """Trains one readout model on train_data (INPUTS + one target [n, NUM_SLOTS] per head);
    -> {head: [num_test, NUM_SLOTS] predicted class} at t = EVAL_T."""
    model = ReadoutModel(config, train_data["states"].shape[-1], readout, rngs=nnx.Rngs(seed))
    fit(model, loss_fn, train_data, steps=steps, batch_size=batch_size,
        learning_rate=learning_rate, seed=seed, name="readout")

    @nnx.jit
    def predict(model, states, mask, prompt_mask, mention_mask):
        t = jnp.full((states.shape[0],), EVAL_T)
        logits = model(states.astype(jnp.float32), mask, prompt_mask, t, mention_mask)
        return {name: jnp.argmax(v, axis=-1) for name, v in logits.items()}

    out = [predict(model, *(jnp.asarray(test_data[k][i:i + PREDICT_BATCH]) for k in INPUTS))
           for i in range(0, len(test_data["mask"]), PREDICT_BATCH)]
    return {name: np.concatenate([np.asarray(o[name]) for o in out])
            for name in prompts.HEADS[readout]}
