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
import ml_dtypes
import numpy as np
from absl import app, flags, logging

from lidit_jax import configuration
from lidit_jax.data import encode_order
from lidit_jax.text import features
from lidit_jax.evaluate import ablation, readout_stats, scratch_lm
from lidit_jax.evaluate import readout_prompts as prompts
from lidit_jax.evaluate.readout_model import EVAL_T, SPAN_TOKENS, train_and_predict

READOUTS = tuple(prompts.HEADS)  # --readout: "slots" | "mentions" (readout_model.py).
ENCODE_BATCH = 32
# Fixed before any run (the 5-seed runs of /work/notes/readout2.md), the same for both readouts:
# (arm A, arm B, construction) for accuracy; (arm A, arm B, "rank_slope") for the positional
# bias. Only those whose two arms are run are tested (and Holm-corrected together).
#   Does a raw causal LLM lose to a bidirectional encoder where binding needs later words?
#   Does a bidirectional refiner recover it, a causal one not (with the instruction: lidit vs
#   causal_refiner; without: refiner vs refiner_causal; pre_binding is the control, where the
#   slot comes first and the claim predicts no difference)? Does the objective with its mask
#   alone (the scratch pair: same model, data, tokenizer) make the difference? Does the
#   refiner change the positional bias (rank_slope)?
CONTRASTS = (
    ("minilm", "raw", "late_override"), ("minilm", "raw", "order_flip"),
    ("lidit", "raw", "late_override"), ("lidit", "raw", "order_flip"),
    ("lidit", "causal_refiner", "late_override"), ("lidit", "causal_refiner", "order_flip"),
    ("lidit", "causal_refiner", "pre_binding"),
    ("refiner", "raw", "late_override"), ("refiner", "raw", "order_flip"),
    ("refiner", "refiner_causal", "late_override"), ("refiner", "refiner_causal", "order_flip"),
    ("refiner", "refiner_causal", "pre_binding"),
    ("scratch_mlm", "scratch_causal", "late_override"),
    ("scratch_mlm", "scratch_causal", "order_flip"),
    ("instruction", "raw", "all"), ("raw_m3", "raw", "all"),
    ("lidit", "raw", "rank_slope"), ("lidit", "causal_refiner", "rank_slope"),
    ("refiner", "raw", "rank_slope"), ("refiner", "refiner_causal", "rank_slope"),
    # Added after the first 5-seed run showed the gates' whole-caption condition reaching early
    # tokens (docs/ablation.md), before any run of these arms: the mask alone, gates off.
    ("refiner_ungated", "refiner_causal_ungated", "late_override"),
    ("refiner_ungated", "refiner_causal_ungated", "order_flip"),
    ("refiner_causal_ungated", "raw", "late_override"),
    ("refiner_causal_ungated", "raw", "order_flip"),
)


# ---- Text states: encoded once per encoder setting --------------------------------------------
def _load(path):
    with np.load(path) as cached:
        return {"states": cached["states"].view(ml_dtypes.bfloat16), "mask": cached["mask"],
                "prompt_mask": cached["prompt_mask"]}


def _save(path, out):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = path + ".partial.npz"  # np.savez appends .npz; renamed when complete.
    np.savez(partial, states=np.asarray(out["states"], ml_dtypes.bfloat16).view(np.uint16),
             mask=out["mask"], prompt_mask=out["prompt_mask"])
    os.replace(partial, path)


def _digest(captions):
    return hashlib.sha1("\n".join(captions).encode()).hexdigest()[:8]


def encoded_states(config, captions, cache_dir):
    """The single encoder's states of `captions`, cached in CACHE_DIR/<setting>-<captions>.npz:
    dict(states [n, L, width] bfloat16, mask [n, L] bool, prompt_mask [n, L] bool), L the
    longest caption's tokens rounded up (PromptEncoder.encode(crop_padding=True))."""
    from lidit_jax.text.encoder import PromptEncoder  # Reads tokenizers: only when encoding.
    name, = features.encoder_names(config.text)
    path = os.path.join(cache_dir,
                        f"{ablation.encoder_setting(config, name)}-{_digest(captions)}.npz")
    if os.path.exists(path):
        return _load(path)
    encoder = PromptEncoder.from_config(config, name)
    # Length-sorted batches: each is cropped to its own longest caption (CPU time ~ tokens).
    row_batches = encode_order.length_batches(np.arange(len(captions)),
                                              [len(c) for c in captions], ENCODE_BATCH)
    start = time.time()
    batches = [jax.device_get(encoder.encode([captions[j] for j in rows], crop_padding=True))
               for rows in row_batches]
    length = max(b["states"].shape[1] for b in batches)
    out = {key: np.zeros((len(captions), length, *batches[0][key].shape[2:]),
                         batches[0][key].dtype) for key in ("states", "mask", "prompt_mask")}
    for rows, batch in zip(row_batches, batches):
        for key in out:
            out[key][rows, :batch[key].shape[1]] = batch[key]
    logging.info("readout: encoded %d captions with %s in %.0f s", len(captions), name,
                 time.time() - start)
    _save(path, out)
    return out


def scratch_states(objective, splits, cache_dir):
    """{split: captions} -> {split: states as encoded_states returns} of a scratch_lm model
    trained (once, seed 0, scratch_lm.STEPS steps) with `objective` on splits["train"], cached
    in CACHE_DIR/scratch_<objective>-<steps>-<corpus>-<captions>.npz."""
    setting = f"scratch_{objective}-{scratch_lm.STEPS}-{_digest(splits['train'])}"
    paths = {split: os.path.join(cache_dir, f"{setting}-{_digest(c)}.npz")
             for split, c in splits.items()}
    if all(os.path.exists(p) for p in paths.values()):
        return {split: _load(p) for split, p in paths.items()}
    start = time.time()
    model, tokenizer = scratch_lm.train(objective, splits["train"])
    logging.info("readout: trained scratch_lm %s in %.0f s", objective, time.time() - start)
    out = {}
    for split, captions in splits.items():
        out[split] = scratch_lm.encode(model, tokenizer, captions)
        _save(paths[split], out[split])
        out[split] = _load(paths[split])  # The same bfloat16 states as a later cached run.
    return out


def text_states(config, splits, cache_dir):
    """{split: captions} -> {split: dict(states, mask, prompt_mask)} of the arm's encoder: the
    configured LLM, or the scratch_lm model of config.scratch_lm (scratch arms only)."""
    if config.get("scratch_lm"):
        return scratch_states(config.scratch_lm, splits, cache_dir)
    return {split: encoded_states(config, captions, cache_dir)
            for split, captions in splits.items()}


def token_offsets(config, captions):
    """Per caption: [tokens, 2] character [start, stop) in the caption of each position of the
    arm's encoded states (template and special tokens: empty or outside the caption)."""
    if config.get("scratch_lm"):
        return [scratch_lm.word_offsets(c) for c in captions]
    from lidit_jax.text.encoder import PromptEncoder  # Reads the tokenizer, not the weights.
    name, = features.encoder_names(config.text)
    template = PromptEncoder.from_config(config, name).template
    return [offsets - len(template.prefix) for _, offsets, _ in template._tokenize(captions)]


def mention_masks(items, offsets, length):
    """-> bool [n, length, NUM_SLOTS]: position l holds a token of mention k's noun phrase
    (Item.spans; a token overlapping the phrase's characters counts)."""
    out = np.zeros((len(items), length, prompts.NUM_SLOTS), bool)
    for i, (item, offset) in enumerate(zip(items, offsets)):
        real = offset[:, 1] > offset[:, 0]
        for k, (start, stop) in enumerate(item.spans()):
            inside = np.flatnonzero(real & (offset[:, 0] < stop) & (offset[:, 1] > start))
            if not inside.size or inside[-1] >= length:
                raise ValueError(f"mention {k} of {item.caption!r} is not among the encoded "
                                 f"tokens (text.max_length too small?)")
            if inside.size > SPAN_TOKENS:
                raise ValueError(f"mention {k} of {item.caption!r} takes {inside.size} tokens, "
                                 f"more than readout_model.SPAN_TOKENS={SPAN_TOKENS}")
            out[i, inside, k] = True
    return out


# ---- Runner -----------------------------------------------------------------------------------
def run_readout(arms, seeds, output, *, readout="slots", steps=1500, num_train=1500,
                test_groups=40, batch_size=64, learning_rate=1e-3, overrides=(),
                configs_dir="configs/readout", samples=readout_stats.SAMPLES):
    """Trains and scores every arm x seed not done yet (resumable), writes OUTPUT/readout.json
    and returns it. readout: "slots" | "mentions" (readout_model.py)."""
    if readout not in READOUTS:
        raise ValueError(f"--readout={readout!r}; known: {READOUTS}")
    configs = {arm: ablation.load_arm(configs_dir, arm, overrides) for arm in arms}  # Fail early.
    for arm, config in configs.items():
        if len(features.encoder_names(config.text)) != 1:
            raise ValueError(f"readout arm {arm!r}: text.encoders={config.text.encoders!r}; the "
                             "readout takes one encoder per arm")
        if config.get("scratch_lm", "") not in ("", *scratch_lm.OBJECTIVES):
            raise ValueError(f"readout arm {arm!r}: scratch_lm={config.scratch_lm!r}; known: "
                             f"'' (the configured LLM) or {scratch_lm.OBJECTIVES}")
        configuration.validate(config)
    items = dict(zip(("train", "test"), prompts.make_split(num_train, test_groups)))
    targets = {split: prompts.targets_of(i, readout) for split, i in items.items()}
    cache_dir = os.path.join(output, "text_cache")
    training = dict(steps=steps, num_train=num_train, test_groups=test_groups,
                    batch_size=batch_size, learning_rate=learning_rate, eval_t=EVAL_T)
    if readout != "slots":  # Slots runs keep the folders they had before --readout existed.
        training["readout"] = readout
    right, predictions = {}, {}
    with ablation.llms_kept_loaded():
        for arm, config in configs.items():
            # Runs of other settings (another --steps, --set, ...) keep their own folder.
            settings = json.dumps([config.to_dict(), training], sort_keys=True, default=str)
            run_dir = os.path.join(output, "runs",
                                   f"{arm}-{hashlib.sha1(settings.encode()).hexdigest()[:8]}")
            per_seed, data = [], None
            for seed in range(seeds):
                path = os.path.join(run_dir, f"seed{seed}.npz")
                if not os.path.exists(path):
                    data = data or arm_data(config, items, targets, cache_dir)
                    start = time.time()
                    predicted = train_and_predict(config, readout, data["train"], data["test"],
                                                  seed, steps, batch_size, learning_rate)
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    np.savez(path, **predicted)
                    logging.info("readout: arm %s seed %d trained in %.0f s", arm, seed,
                                 time.time() - start)
                with np.load(path) as saved:
                    per_seed.append({name: saved[name] for name in prompts.HEADS[readout]})
            predictions[arm] = {name: np.stack([p[name] for p in per_seed])
                                for name in prompts.HEADS[readout]}
            right[arm] = np.stack([readout_stats.units_right(p, targets["test"], readout)
                                   for p in per_seed])
            units = readout_stats.valid_units(targets["test"], readout).sum() * seeds
            print(f"readout arm={arm} accuracy={right[arm].sum() / units:.4f}", flush=True)
    result = dict(arms=list(arms), seeds=seeds, readout=readout, steps=steps,
                  num_train=len(items["train"]), num_test=len(items["test"]), eval_t=EVAL_T,
                  metric=readout_stats.METRICS[readout],
                  **readout_stats.summarise(items["test"], right, predictions, CONTRASTS,
                                             readout, samples=samples))
    with open(os.path.join(output, "readout.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def arm_data(config, items, targets, cache_dir):
    """{split: INPUTS of readout_model + targets}: the arm's text states and, per caption, its
    mention spans on those states' positions."""
    states = text_states(config, {split: [i.caption for i in its] for split, its in items.items()},
                         cache_dir)
    data = {}
    for split, its in items.items():
        offsets = token_offsets(config, [i.caption for i in its])
        masks = mention_masks(its, offsets, states[split]["mask"].shape[1])
        data[split] = dict(states[split], mention_mask=masks, **targets[split])
    return data


def main(argv):
    del argv
    f = flags.FLAGS
    if not f.arms or not f.output:
        raise SystemExit("error: --arms=a,b,... and --output=DIR are required")
    result = run_readout(f.arms, f.seeds, f.output, readout=f.readout, steps=f.steps,
                         num_train=f.num_train, test_groups=f.test_groups, overrides=f.set,
                         configs_dir=f.configs_dir)
    for arm in result["arms"]:
        cells = " ".join(f"{c}={result['accuracy'][arm][c]['accuracy']:.3f}"
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
    flags.DEFINE_enum("readout", "slots", READOUTS, "slots: a query per slot over every prompt "
                      "token; mentions: a query per mentioned object over its own noun phrase.")
    flags.DEFINE_string("output", None, "Where text states, runs and readout.json go.")
    flags.DEFINE_integer("steps", 1500, "Training steps per arm and seed.")
    flags.DEFINE_integer("num_train", 1500, "Training captions.")
    flags.DEFINE_integer("test_groups", 40, "Test draws per construction (pairs: 2 captions).")
    flags.DEFINE_multi_string("set", [], "key=value config override for every arm.")
    flags.DEFINE_string("configs_dir", "configs/readout", "Folder of arm configs.")
    app.run(main)
