"""Text-only linear probe: can a linear read-out find the k-th object's colour in the text
features at that object's tokens, before and after the linguistic token refiner?

For shapes captions ("a large red circle in the top left, a small blue ..."), per object and
per probed token (`article`: the object's first word, which a causal LLM reads before the
colour; `noun`: its shape noun, read after it), the features are
  raw      the frozen LLM's chosen layer (what the cache stores), input-normed as the refiner
           sees it
  refined  the trained refiner's output (EMA weights of a run, at model time eval t)
and a ridge-regression one-vs-rest probe (fit on half the captions, scored on the other half)
predicts the colour (8 classes, chance 1/8). A causal LLM cannot put the colour into the article
token's state; a bidirectional refiner can, so `article` accuracy measures the paper's
"causal attention hides later tokens" problem directly, without any image.

  python -m lidit_jax.evaluate.probes --config=configs/ablations/lidit.py \\
      --workdir=RUN --num=512 [--t=500]
prints one line per (features, token) and writes RUN/probe.json.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lidit_jax.data import shapes


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


def probe_targets(template, records):
    """-> list of (record index, token index, colour id, kind) for every object and kind."""
    out = []
    for i, record in enumerate(records):
        caption = record["caption"]
        for obj in record["metadata"]["objects"]:
            noun = obj["word_index"]
            # "a large red circle": the article is 3 words before the noun ("two" for counts).
            for kind, word in (("article", noun - 3), ("noun", noun)):
                out.append((i, word_token(template, caption, word),
                            shapes.COLOUR_NAMES.index(obj["colour"]), kind))
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
    """-> {f"{features}/{kind}": accuracy} for features raw / refined, kind article / noun."""
    captions = [r["caption"] for r in records]
    encoded = jax.device_get(encoder.encode(captions))
    states = jnp.asarray(encoded["states"], jnp.float32)
    mask = jnp.asarray(encoded["mask"])
    targets = probe_targets(encoder.template, records)
    refiner = model.text.refiners[0]
    raw = states if refiner.input_norm is None else refiner.input_norm(states)
    refined = nnx.jit(refined_states)(model, states, mask, t)
    rng = np.random.default_rng(seed)
    train_records = rng.permutation(len(records))[:len(records) // 2]
    out = {}
    for kind in ("article", "noun"):
        chosen = [x for x in targets if x[3] == kind]
        labels = np.array([x[2] for x in chosen])
        train = np.isin([x[0] for x in chosen], train_records)
        for name, feats in (("raw", raw), ("refined", refined)):
            out[f"{name}/{kind}"] = ridge_probe_accuracy(features_at(feats, chosen), labels,
                                                         train, len(shapes.COLOUR_NAMES))
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
    for key in ("raw/article", "refined/article", "raw/noun", "refined/noun"):
        print(f"probe {key} colour_accuracy={scores[key]:.3f} (chance 0.125)")


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "The run's config file.")
    flags.DEFINE_string("workdir", None, "The trained run's workdir.", required=True)
    flags.DEFINE_integer("num", 512, "Held-out shapes captions probed.")
    flags.DEFINE_float("t", 500.0, "Model time (0..1000) for the refiner's gates.")
    FLAGS = flags.FLAGS
    app.run(main)
