"""Text-only readout benchmark: which object sits in each slot, read from the text side alone?

  python -m lidit_jax.evaluate.readout --arms=raw,lidit,causal_refiner,minilm --seeds=5 \\
      --output=DIR [--steps=1500] [--set=key=value ...] [--configs_dir=configs/readout]

Isolates the encoder from the image model (docs/ablation.md: the toy DiT, not the text, was the
bottleneck there). Per arm (a config in configs/readout/, changing only its text side):
  the project's TextConditioner, unchanged (its gates see t_emb(t) for a random t in training,
  t = EVAL_T at test), then a small decoder: one learned query per slot of the 2x2 grid
  cross-attends to the conditioner's tokens (the prompt's own tokens, as the DiT sees them);
  per slot, heads for colour (8 + empty), shape (5) and size (2), trained with cross-entropy
  (shape and size on occupied slots only) on text states cached once per encoder setting under
  DIR/text_cache (shared by the seeds and arms that share a setting).
Captions come from readout_prompts.py (six constructions with every slot's truth; a disjoint,
scene-deduplicated test set). A test caption's unit score is its slots read fully right
(colour or empty, and shape and size where occupied) out of 4.

Statistics (readout_stats.py, statistics.py): every arm is scored on the same test captions,
so contrasts are paired by test group (a minimal pair is one group) with a hierarchical
bootstrap over groups and seeds; the contrasts are fixed below, before any run, and
Holm-corrected together. The positional bias is a logistic model of an object's correctness on
its mention rank with slot and object count as covariates.

Writes DIR/readout.json and DIR/runs/<arm>-<settings digest>/seed<k>.npz (per-seed test
predictions; a seed whose file exists is not retrained), and ends with the line
  readout arms=<int> seeds=<int> contrasts=<int> significant=<int>
"""
import hashlib
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
from absl import app, flags, logging
from flax import nnx

from lidit_jax import configuration
from lidit_jax.text import features
from lidit_jax.evaluate import ablation, readout_stats
from lidit_jax.evaluate import readout_prompts as prompts
from lidit_jax.nn.layers import MLP, Attention, RMSNorm, TimestepEmbedder, linear
from lidit_jax.text.refiner import TextConditioner

EVAL_T = 500.0  # Model time (0..1000) the refiner's gates see at test.
DECODER_DEPTH = 2
ENCODE_BATCH = 32
# Fixed before any run: (arm A, arm B, construction) for accuracy; (arm A, arm B, "rank_slope")
# for the positional bias. Only those whose two arms are run are tested (and Holm-corrected).
CONTRASTS = (
    ("minilm", "raw", "late_override"), ("minilm", "raw", "order_flip"),
    ("lidit", "raw", "late_override"), ("lidit", "raw", "order_flip"),
    ("lidit", "causal_refiner", "late_override"), ("lidit", "causal_refiner", "order_flip"),
    ("refiner", "raw", "late_override"), ("instruction", "raw", "all"),
    ("raw_m3", "raw", "all"),
    ("lidit", "raw", "rank_slope"), ("lidit", "causal_refiner", "rank_slope"),
)


# ---- Text states: encoded once per encoder setting --------------------------------------------
def encoded_states(config, captions, cache_dir):
    """The single encoder's states of `captions`, cached in CACHE_DIR/<setting>-<captions>.npz:
    dict(states [n, L, width] bfloat16, mask [n, L] bool, prompt_mask [n, L] bool), L the
    longest caption's tokens rounded up (PromptEncoder.encode(crop_padding=True))."""
    from lidit_jax.text.encoder import PromptEncoder  # Reads tokenizers: only when encoding.
    name, = features.encoder_names(config.text)
    digest = hashlib.sha1("\n".join(captions).encode()).hexdigest()[:8]
    path = os.path.join(cache_dir, f"{ablation.encoder_setting(config, name)}-{digest}.npz")
    if os.path.exists(path):
        with np.load(path) as cached:
            return {"states": cached["states"].view(ml_dtypes.bfloat16), "mask": cached["mask"],
                    "prompt_mask": cached["prompt_mask"]}
    encoder = PromptEncoder.from_config(config, name)
    # Length-sorted batches: each is cropped to its own longest caption (CPU time ~ tokens).
    order = np.argsort([len(c) for c in captions], kind="stable")
    batches, start = [], time.time()
    for i in range(0, len(captions), ENCODE_BATCH):
        batch = [captions[j] for j in order[i:i + ENCODE_BATCH]]
        batches.append(jax.device_get(encoder.encode(batch, crop_padding=True)))
    length = max(b["states"].shape[1] for b in batches)
    out = {key: np.zeros((len(captions), length, *batches[0][key].shape[2:]),
                         batches[0][key].dtype) for key in ("states", "mask", "prompt_mask")}
    for i, batch in enumerate(batches):
        rows = order[i * ENCODE_BATCH:(i + 1) * ENCODE_BATCH]
        for key in out:
            out[key][rows, :batch[key].shape[1]] = batch[key]
    logging.info("readout: encoded %d captions with %s in %.0f s", len(captions), name,
                 time.time() - start)
    os.makedirs(cache_dir, exist_ok=True)
    partial = path + ".partial.npz"  # np.savez appends .npz; renamed when complete.
    np.savez(partial, states=out["states"].view(np.uint16), mask=out["mask"],
             prompt_mask=out["prompt_mask"])
    os.replace(partial, path)
    return out


# ---- The readout model ------------------------------------------------------------------------
class SlotDecoder(nnx.Module):
    """Learned slot queries cross-attending to text tokens: [batch, len, embed] -> per-slot
    logits {head: [batch, slots, classes]}."""

    def __init__(self, width, heads, num_slots, *, rngs):
        self.queries = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(),
                                                               (num_slots, width)))
        self.context_norm = RMSNorm(width)
        self.attn_norms = nnx.List([RMSNorm(width) for _ in range(DECODER_DEPTH)])
        self.attentions = nnx.List([Attention(width, heads, rngs=rngs)
                                    for _ in range(DECODER_DEPTH)])
        self.mlp_norms = nnx.List([RMSNorm(width) for _ in range(DECODER_DEPTH)])
        self.mlps = nnx.List([MLP(width, 4 * width, rngs=rngs) for _ in range(DECODER_DEPTH)])
        self.out_norm = RMSNorm(width)
        self.heads = nnx.Dict({name: linear(width, classes, ("embed", "vocab"), rngs=rngs)
                               for name, classes in prompts.CLASSES.items()})

    def __call__(self, tokens, token_mask):
        context = self.context_norm(tokens)
        x = jnp.broadcast_to(self.queries[...], (tokens.shape[0], *self.queries.shape))
        for attn_norm, attention, mlp_norm, mlp in zip(self.attn_norms, self.attentions,
                                                       self.mlp_norms, self.mlps):
            x = x + attention(attn_norm(x), context, key_mask=token_mask)
            x = x + mlp(mlp_norm(x))
        x = self.out_norm(x)
        return {name: head(x) for name, head in self.heads.items()}


class ReadoutModel(nnx.Module):
    """t_emb + the project's TextConditioner (config.text, width config.model.width) + a
    SlotDecoder over its tokens."""

    def __init__(self, config, llm_width, *, rngs):
        width = config.model.width
        self.time_embed = TimestepEmbedder(width, rngs=rngs)
        self.text = TextConditioner(config.text, [llm_width], width, rngs=rngs)
        self.decoder = SlotDecoder(width, config.text.refiner.heads, prompts.NUM_SLOTS,
                                   rngs=rngs)

    def __call__(self, states, mask, prompt_mask, t):
        """states [batch, L, width_k]; mask, prompt_mask [batch, L] bool; t [batch] (0..1000)."""
        tokens, token_mask, _ = self.text([states], [mask], [prompt_mask], self.time_embed(t))
        return self.decoder(tokens, token_mask)


def loss_fn(model, states, mask, prompt_mask, t, targets):
    """Cross-entropy: colour (incl. empty) on every slot, shape and size on occupied ones."""
    logits = model(states.astype(jnp.float32), mask, prompt_mask, t)
    occupied = targets["shape"] >= 0
    total = 0.0
    for name, head_logits in logits.items():
        labels = jnp.maximum(targets[name], 0)
        ce = optax.softmax_cross_entropy_with_integer_labels(head_logits, labels)
        weight = jnp.ones_like(ce) if name == "colour" else occupied.astype(ce.dtype)
        total = total + jnp.sum(ce * weight) / jnp.maximum(jnp.sum(weight), 1.0)
    return total


def train_and_predict(config, train_data, test_data, seed, steps, batch_size, learning_rate):
    """Trains one readout model; -> {head: [num_test, slots] predicted class} at t = EVAL_T."""
    model = ReadoutModel(config, train_data["states"].shape[-1], rngs=nnx.Rngs(seed))
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(100, steps // 10 + 1),
                                                  steps)
    optimizer = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=0.01), wrt=nnx.Param)
    arrays = {k: jnp.asarray(v) for k, v in train_data.items()}

    @nnx.jit
    def step(model, optimizer, key):
        rows_key, t_key = jax.random.split(key)
        rows = jax.random.randint(rows_key, (batch_size,), 0, arrays["mask"].shape[0])
        t = jax.random.uniform(t_key, (batch_size,), maxval=1000.0)
        batch = {k: v[rows] for k, v in arrays.items()}
        loss, grads = nnx.value_and_grad(loss_fn)(
            model, batch["states"], batch["mask"], batch["prompt_mask"], t,
            {name: batch[name] for name in prompts.CLASSES})
        optimizer.update(model, grads)
        return loss

    key = jax.random.key(seed)
    for i in range(steps):
        loss = step(model, optimizer, jax.random.fold_in(key, i))
        if i % 250 == 0 or i == steps - 1:
            logging.info("readout: step %d loss %.4f", i, float(loss))

    @nnx.jit
    def predict(model, states, mask, prompt_mask):
        t = jnp.full((states.shape[0],), EVAL_T)
        logits = model(states.astype(jnp.float32), mask, prompt_mask, t)
        return {name: jnp.argmax(v, axis=-1) for name, v in logits.items()}

    out = [predict(model, *(jnp.asarray(test_data[k][i:i + 256])
                            for k in ("states", "mask", "prompt_mask")))
           for i in range(0, len(test_data["mask"]), 256)]
    return {name: np.concatenate([np.asarray(o[name]) for o in out]) for name in prompts.CLASSES}


# ---- Runner -----------------------------------------------------------------------------------
def run_readout(arms, seeds, output, *, steps=1500, num_train=1500, test_groups=40,
                batch_size=64, learning_rate=1e-3, overrides=(), configs_dir="configs/readout",
                samples=readout_stats.SAMPLES):
    """Trains and scores every arm x seed not done yet (resumable), writes OUTPUT/readout.json
    and returns it."""
    configs = {arm: ablation.load_arm(configs_dir, arm, overrides) for arm in arms}  # Fail early.
    for arm, config in configs.items():
        if len(features.encoder_names(config.text)) != 1:
            raise ValueError(f"readout arm {arm!r}: text.encoders={config.text.encoders!r}; the "
                             "readout takes one encoder per arm")
        configuration.validate(config)
    train_items, test_items = prompts.make_split(num_train, test_groups)
    targets = {"train": prompts.targets_of(train_items), "test": prompts.targets_of(test_items)}
    cache_dir = os.path.join(output, "text_cache")
    training = dict(steps=steps, num_train=num_train, test_groups=test_groups,
                    batch_size=batch_size, learning_rate=learning_rate, eval_t=EVAL_T)
    right, predictions = {}, {}
    with ablation.llms_kept_loaded():
        for arm, config in configs.items():
            # Runs of other settings (another --steps, --set, ...) keep their own folder.
            settings = json.dumps([config.to_dict(), training], sort_keys=True, default=str)
            run_dir = os.path.join(output, "runs",
                                   f"{arm}-{hashlib.sha1(settings.encode()).hexdigest()[:8]}")
            per_seed = []
            for seed in range(seeds):
                path = os.path.join(run_dir, f"seed{seed}.npz")
                if not os.path.exists(path):
                    data = {split: encoded_states(config, [i.caption for i in items], cache_dir)
                            for split, items in (("train", train_items), ("test", test_items))}
                    start = time.time()
                    predicted = train_and_predict(
                        config, dict(data["train"], **targets["train"]), data["test"], seed,
                        steps, batch_size, learning_rate)
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    np.savez(path, **predicted)
                    logging.info("readout: arm %s seed %d trained in %.0f s", arm, seed,
                                 time.time() - start)
                with np.load(path) as saved:
                    per_seed.append({name: saved[name] for name in prompts.CLASSES})
            predictions[arm] = {name: np.stack([p[name] for p in per_seed])
                                for name in prompts.CLASSES}
            right[arm] = np.stack([readout_stats.slots_right(p, targets["test"])
                                   for p in per_seed])
            print(f"readout arm={arm} slot_accuracy={right[arm].mean():.4f}", flush=True)
    result = dict(arms=list(arms), seeds=seeds, steps=steps, num_train=len(train_items),
                  num_test=len(test_items), eval_t=EVAL_T,
                  metric="slot_accuracy: test slots read fully right (colour or empty; shape "
                         "and size where occupied) over all slots; ci95: hierarchical bootstrap "
                         "over test groups and seeds",
                  **readout_stats.summarise(test_items, right, predictions, CONTRASTS,
                                             samples=samples))
    with open(os.path.join(output, "readout.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def main(argv):
    del argv
    f = flags.FLAGS
    if not f.arms or not f.output:
        raise SystemExit("error: --arms=a,b,... and --output=DIR are required")
    result = run_readout(f.arms, f.seeds, f.output, steps=f.steps, num_train=f.num_train,
                         test_groups=f.test_groups, overrides=f.set, configs_dir=f.configs_dir)
    for arm in result["arms"]:
        cells = " ".join(f"{c}={result['accuracy'][arm][c]['slot_accuracy']:.3f}"
                         for c in (*prompts.CONSTRUCTIONS, "all"))
        print(f"readout arm={arm} {cells} rank_slope="
              f"{result['positional'][arm]['rank_slope']:+.3f}")
    for c in result["contrasts"]:
        print(f"readout contrast {c['name']}: effect={c['effect']:+.4f} "
              f"ci95=[{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}] p_holm={c['p_holm']:.4f}")
    significant = sum(c["significant"] for c in result["contrasts"])
    print(f"readout arms={len(result['arms'])} seeds={result['seeds']} "
          f"contrasts={len(result['contrasts'])} significant={significant}")


if __name__ == "__main__":
    flags.DEFINE_list("arms", None, "Arms: config names in --configs_dir.")
    flags.DEFINE_integer("seeds", 3, "Seeds per arm (0..seeds-1).")
    flags.DEFINE_string("output", None, "Where text states, runs and readout.json go.")
    flags.DEFINE_integer("steps", 1500, "Training steps per arm and seed.")
    flags.DEFINE_integer("num_train", 1500, "Training captions.")
    flags.DEFINE_integer("test_groups", 40, "Test draws per construction (pairs: 2 captions).")
    flags.DEFINE_multi_string("set", [], "key=value config override for every arm.")
    flags.DEFINE_string("configs_dir", "configs/readout", "Folder of arm configs.")
    app.run(main)
