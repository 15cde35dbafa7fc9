"""Text-only linear probe: can a linear read-out find the k-th object's colour, or its slot, in
the text features at that object's tokens, before and after the linguistic token refiner?

For shapes captions ("a large red circle in the top left, a small blue ..."), per object and
per probed token (`article`: the object's first word, which a causal LLM reads before the
colour and the slot; `noun`: its shape noun, after the colour and before the slot phrase;
`slot`: the last word of its slot phrase, e.g. "left"; slot targets only for captions that name
slots), the features are
  raw      the frozen LLM's chosen layer (what the cache stores), input-normed as the refiner
           sees it
  refined  the trained refiner's output (EMA weights of a run, at model time eval t)
and a ridge-regression one-vs-rest probe (fit on half the captions, scored on the other half)
predicts the colour (8 classes, chance 1/8) or the slot (3 in the row layout, 4 in the grid). A causal LLM cannot put the colour into the article
token's state; a bidirectional refiner can, so `article` accuracy measures the paper's
"causal attention hides later tokens" problem directly, without any image.

  python -m lidit_jax.evaluate.probes --config=configs/ablations/lidit.py \\
      --workdir=RUN --num=512 [--t=500]
prints one line per (attribute, features, token) and writes RUN/probe.json.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lidit_jax.data import shapes
from lidit_jax.evaluate.scorer import placement

ATTRIBUTES = ("colour", "slot")


def word_token(template, caption, word_index):
    """Index (in the template's token sequence, before padding) of the last token of word
    `word_index` of caption.split()."""
    words = caption.split()
    start = len(" ".join(words[:word_index])) + (1 if word_index else 0)
    stop = start + len(words[word_index].rstrip(","))  # "circle," ends at its last letter.
    (_, offsets, _), = template._tokenize([caption])
    lo, hi = len(template.prefix) + start, len(template.prefix) + stop
    inside = np.flatnonzero((offsets[:, 0] < hi) & (offsets[:, 1] > lo))
    if not inside.size:
        raise ValueError(f"no token for word {word_index} of {caption!r}")
    return int(inside[-1])


def probe_targets(template, records, attribute="colour"):
    """-> list of (record index, token index, label, kind) for every object and kind; label is
    the colour id, or the slot index (objects of slot-listing captions only)."""
    out = []
    for i, record in enumerate(records):
        caption, metadata = record["caption"], record["metadata"]
        layout = shapes.layout_of(metadata.get("layout", "row"))
        if attribute == "slot" and placement(metadata) != "slots":
            continue
        for obj in metadata["objects"]:
            noun = obj["word_index"]
            # "a large red circle": the article is 3 words before the noun ("two" for counts).
            words = [("article", noun - 3), ("noun", noun)]
            if attribute == "colour":
                label = shapes.COLOUR_NAMES.index(obj["colour"])
            else:
                label = layout.slots.index(obj["slot"])
                words.append(("slot", noun + len(layout.phrases[label].split())))
            out.extend((i, word_token(template, caption, word), label, kind)
                       for kind, word in words)
    return out


def ridge_probe_accuracy(features, labels, train, num_classes, alpha=1.0):
    """One-vs-rest ridge regression on rows `train`, accuracy on the others."""
    x = (features - features[train].mean(0)) / (features[train].std(0) + 1e-6)
    x = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    y = np.eye(num_classes)[labels]
    a = x[train]
    weights = np.linalg.solve(a.T @ a + alpha * np.eye(a.shape[1]), a.T @ y[train])
    test = ~train
    return float(np.mean(np.argmax(x[test] @ weights, axis=1) == labels[test]))


def features_at(states, targets):
    """states [n, len, width] -> [num_targets, width] at each target's (record, token)."""
    rows = np.array([t[0] for t in targets])
    tokens = np.array([t[1] for t in targets])
    return np.asarray(states, np.float32)[rows, tokens]


def refined_states(model, states, mask, t):
    """The trained single-branch refiner's output [n, len, embed] (gates conditioned on
    t_emb(t) + pooled, as in the denoiser)."""
    refiner = model.text.refiners[0]
    t_emb = model.time_embed(jnp.full((states.shape[0],), t, jnp.float32))
    c = t_emb.astype(jnp.float32) + refiner.pooled(states, mask)
    return refiner(states, mask, c)


def run_probe(model, encoder, records, t=500.0, seed=0):
    """-> {f"{attribute}/{features}/{kind}": accuracy} for attribute colour / slot, features
    raw / refined, kind article / noun (/ slot)."""
    captions = [r["caption"] for r in records]
    encoded = jax.device_get(encoder.encode(captions))
    states = jnp.asarray(encoded["states"], jnp.float32)
    mask = jnp.asarray(encoded["mask"])
    refiner = model.text.refiners[0]
    raw = states if refiner.input_norm is None else refiner.input_norm(states)
    refined = nnx.jit(refined_states)(model, states, mask, t)
    rng = np.random.default_rng(seed)
    train_records = rng.permutation(len(records))[:len(records) // 2]
    out = {}
    for attribute in ATTRIBUTES:
        targets = probe_targets(encoder.template, records, attribute)
        for kind in sorted({x[3] for x in targets}):
            chosen = [x for x in targets if x[3] == kind]
            labels = np.array([x[2] for x in chosen])
            train = np.isin([x[0] for x in chosen], train_records)
            for name, feats in (("raw", raw), ("refined", refined)):
                out[f"{attribute}/{name}/{kind}"] = ridge_probe_accuracy(
                    features_at(feats, chosen), labels, train, int(labels.max()) + 1)
    return out


def main(argv):
    del argv
    from lidit_jax.inference import load_trained_run
    from lidit_jax.parallel import mesh as mesh_lib
    config = FLAGS.config
    mesh = mesh_lib.build_mesh(config.mesh)
    trained = load_trained_run(config, FLAGS.workdir, mesh)
    source = shapes.ShapesSource(FLAGS.num, config.eval.seed + 2, config.data.image_size,
                                 config.data.shapes_layout)
    model = nnx.merge(trained.graphdef, trained.ema_params)
    scores = run_probe(model, trained.encoders[0], [source[i] for i in range(len(source))],
                       t=FLAGS.t)
    scores.update(step=trained.step, num_captions=FLAGS.num, t=FLAGS.t)
    with open(os.path.join(FLAGS.workdir, "probe.json"), "w") as f:
        json.dump(scores, f, indent=1)
    for key, value in scores.items():
        attribute = key.split("/")[0]
        if attribute in ATTRIBUTES:
            print(f"probe {key} {attribute}_accuracy={value:.3f}")


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "The run's config file.")
    flags.DEFINE_string("workdir", None, "The trained run's workdir.", required=True)
    flags.DEFINE_integer("num", 512, "Held-out shapes captions probed.")
    flags.DEFINE_float("t", 500.0, "Model time (0..1000) for the refiner's gates.")
    FLAGS = flags.FLAGS
    app.run(main)
