"""Scores and statistics of the readout benchmark (readout.py): per-slot correctness, accuracy
intervals, the positional-bias model, the Holm-corrected contrasts (`summarise`).

Both resample as `statistics.paired_bootstrap` does (which readout.py uses for the accuracy
contrasts): test groups (a minimal pair is one group; all arms share them, which keeps the
pairing) and, within each arm, seeds. A bootstrap sample is then a weight per (seed, group):
how often the seed was drawn times how often the group was drawn.

Positional bias: in constructions whose mention order is random (readout_prompts.RANDOM_ORDER)
an object's mention rank is independent of its slot, but rank r only occurs with >= r + 1
objects, so rank is still confounded with object count. A logistic model
  logit P(object read right) = b0 + slope * rank + slot one-hot + object-count one-hot
separates them; `slope` (log-odds per later mention, 0 = no positional bias) is the number
reported, with a bootstrap interval.
"""
import numpy as np

from lidit_jax.evaluate import readout_prompts as prompts
from lidit_jax.evaluate import statistics

SAMPLES = 2000
ALPHA = 0.05  # Family-wise error rate of the Holm-corrected contrasts.


def _draw_counts(rng, population, samples):
    """[samples, population]: how often each member is drawn in `samples` resamples (with
    replacement) of the population."""
    draws = rng.integers(0, population, (samples, population))
    return np.stack([np.bincount(d, minlength=population) for d in draws]).astype(np.float64)


def accuracy_interval(counts, *, samples=SAMPLES, seed=0):
    """counts [seeds, groups, 2] (hits, units) -> (pooled accuracy, [2.5 %, 97.5 %] bootstrap)."""
    counts = np.asarray(counts, np.float64)
    rng = np.random.default_rng(seed)
    seed_w, group_w = (_draw_counts(rng, n, samples) for n in counts.shape[:2])
    hits = np.einsum("bs,bg,sg->b", seed_w, group_w, counts[..., 0])
    units = np.einsum("bs,bg,sg->b", seed_w, group_w, counts[..., 1])
    resampled = hits / np.maximum(units, 1.0)
    accuracy = counts[..., 0].sum() / max(counts[..., 1].sum(), 1.0)
    return float(accuracy), [float(x) for x in np.percentile(resampled, [2.5, 97.5])]


def design(rank, slot, count, num_slots):
    """Covariates of the positional model: [objects, 1 + 1 + (num_slots - 1) * 2] =
    intercept, rank, slot one-hot (slot 0 the reference), count one-hot (1 object the
    reference)."""
    rank, slot, count = (np.asarray(a) for a in (rank, slot, count))
    slots = (slot[:, None] == np.arange(1, num_slots)[None]).astype(np.float64)
    counts = (count[:, None] == np.arange(2, num_slots + 1)[None]).astype(np.float64)
    return np.concatenate([np.ones((len(rank), 1)), rank[:, None].astype(np.float64), slots,
                           counts], axis=1)


def logistic_fit(x, successes, trials, ridge=1e-2, iterations=30):
    """Binomial logistic regression by Newton's method: x [n, k], successes and trials [n] (may
    be fractional bootstrap weights) -> coefficients [k]. A small ridge (not on the intercept)
    keeps the fit finite when a covariate separates the outcomes (e.g. every object right)."""
    penalty = ridge * np.eye(x.shape[1])
    penalty[0, 0] = 0.0
    beta = np.zeros(x.shape[1])
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(x @ beta)))
        gradient = x.T @ (successes - trials * p) - penalty @ beta
        hessian = (x * (trials * p * (1 - p))[:, None]).T @ x + penalty
        step = np.linalg.solve(hessian, gradient)
        beta = beta + step
        if np.max(np.abs(step)) < 1e-8:
            break
    return beta


def rank_slope(x, correct, seed_weights, object_weights):
    """The rank coefficient for one weighting: correct [seeds, objects] in {0, 1};
    seed_weights [seeds]; object_weights [objects]."""
    successes = (seed_weights[:, None] * correct).sum(0) * object_weights
    trials = seed_weights.sum() * object_weights
    keep = trials > 0
    return float(logistic_fit(x[keep], successes[keep], trials[keep])[1])


def slope_samples(x, correct, group, group_weights, *, seed=0):
    """Bootstrap rank slopes [samples] of one arm: correct [seeds, objects]; group [objects] the
    test group of each object; group_weights [samples, groups] (_draw_counts), the same array
    for every arm, so that slopes are paired by prompt as accuracies are. Seeds are drawn
    here, independently per arm (pass each arm its own `seed`)."""
    seed_w = _draw_counts(np.random.default_rng(seed), correct.shape[0], len(group_weights))
    return np.array([rank_slope(x, correct, seed_w[b], group_weights[b][group])
                     for b in range(len(group_weights))])


def two_sided_p(differences):
    """Bootstrap p-value of 'no difference', as statistics.paired_bootstrap computes it."""
    tail = min(np.mean(differences <= 0), np.mean(differences >= 0))
    return float(min(1.0, max(2 * tail, 1.0 / len(differences))))


METRICS = {
    "slots": "accuracy: test slots read fully right (colour or empty; shape and size where "
             "occupied) over all slots; ci95: hierarchical bootstrap over test groups and seeds",
    "mentions": "accuracy: mentioned objects read fully right (slot, colour, shape, size) over "
                "all mentions; ci95: hierarchical bootstrap over test groups and seeds"}


def valid_units(targets, readout):
    """bool [num_test, NUM_SLOTS]: the scored units: every slot (slots readout), the mentions
    a caption has (mentions readout)."""
    if readout == "slots":
        return np.ones(targets["colour"].shape, bool)
    return targets["slot"] >= 0


def units_right(predictions, targets, readout):
    """-> bool [num_test, NUM_SLOTS], False on units that are not scored. slots: colour (or
    empty) right, and shape and size where occupied; mentions: every head right."""
    if readout == "slots":
        occupied = targets["shape"] >= 0
        right = predictions["colour"] == targets["colour"]
        for name in ("shape", "size"):
            right &= ~occupied | (predictions[name] == targets[name])
        return right
    right = valid_units(targets, readout)
    for name in prompts.MENTION_CLASSES:
        right = right & (predictions[name] == targets[name])
    return right


def group_counts(right, valid, items, indices):
    """right [seeds, num_test, units], valid [num_test, units] -> [seeds, groups, 2] (units
    right, units) over the test groups of items[indices], in first-seen order."""
    groups = list(dict.fromkeys(items[i].group for i in indices))
    column = {g: k for k, g in enumerate(groups)}
    counts = np.zeros((right.shape[0], len(groups), 2))
    for i in indices:
        counts[:, column[items[i].group], 0] += right[:, i].sum(-1)
        counts[:, column[items[i].group], 1] += valid[i].sum()
    return counts


def attribute_accuracies(predictions, targets, readout):
    """Pooled over seeds, per head. slots: colour / shape / size on occupied slots, empty slots
    read as empty; mentions: slot / colour / shape / size of the mentioned objects."""
    hit = {name: predictions[name] == targets[name] for name in targets}
    if readout == "mentions":
        valid = np.broadcast_to(valid_units(targets, readout), predictions["slot"].shape)
        return {name: float(hit[name][valid].mean()) if valid.any() else None for name in hit}
    occupied = np.broadcast_to(targets["shape"] >= 0, predictions["colour"].shape)
    return {"colour": float(hit["colour"][occupied].mean()),
            "shape": float(hit["shape"][occupied].mean()),
            "size": float(hit["size"][occupied].mean()),
            "empty_slot": float(hit["colour"][~occupied].mean()) if (~occupied).any() else None}


def positional_objects(items, readout):
    """Objects of the random-order constructions: (item, unit, slot, rank, object count,
    group); unit: the object's column of units_right (its slot, or its mention rank)."""
    return [(i, slot if readout == "slots" else rank, slot, rank, len(item.mentions),
             item.group)
            for i, item in enumerate(items) if item.construction in prompts.RANDOM_ORDER
            for rank, slot in enumerate(item.mentions)]


def summarise(items, right, predictions, contrasts, readout="slots", *, samples=SAMPLES):
    """The readout.json statistics of test `items`.

    right {arm: bool [seeds, num_test, units]} (units_right per seed); predictions {arm: {head:
    [seeds, num_test, units]}}; contrasts: (arm A, arm B, construction | "all" | "rank_slope"),
    those whose two arms were run are tested and Holm-corrected together.
    """
    arms = list(right)
    targets = prompts.targets_of(items, readout)
    valid = valid_units(targets, readout)
    selections = {c: [i for i, item in enumerate(items) if item.construction == c]
                  for c in prompts.CONSTRUCTIONS}
    selections["all"] = list(range(len(items)))
    accuracy = {}
    for arm in arms:
        accuracy[arm] = {}
        for name, indices in selections.items():
            counts = group_counts(right[arm], valid, items, indices)
            value, interval = accuracy_interval(counts, samples=samples)
            per_seed = (counts[..., 0].sum(1) / counts[..., 1].sum(1)).tolist()
            attributes = attribute_accuracies(
                {h: p[:, indices] for h, p in predictions[arm].items()},
                {h: t[indices] for h, t in targets.items()}, readout)
            accuracy[arm][name] = dict(accuracy=value, ci95=interval, per_seed=per_seed,
                                       **attributes)

    objects = positional_objects(items, readout)
    item_of, unit, slot, rank, count, group = (np.array(column) for column in zip(*objects))
    _, group_index = np.unique(group, return_inverse=True)
    x = design(rank, slot, count, prompts.NUM_SLOTS)
    group_weights = _draw_counts(np.random.default_rng(len(arms)), int(group_index.max()) + 1,
                                 samples)
    positional, slope_draws = {}, {}
    for k, arm in enumerate(arms):
        correct = right[arm][:, item_of, unit].astype(np.float64)
        ones = np.ones(correct.shape[0])
        slope_draws[arm] = slope_samples(x, correct, group_index, group_weights, seed=k)
        positional[arm] = {
            "rank_slope": rank_slope(x, correct, ones, np.ones(len(objects))),
            "ci95": [float(v) for v in np.percentile(slope_draws[arm], [2.5, 97.5])],
            "by_rank": [float(correct[:, rank == r].mean())
                        for r in range(prompts.NUM_SLOTS)]}

    tested = []
    for a, b, on in contrasts:
        if a not in arms or b not in arms:
            continue
        if on == "rank_slope":
            differences = slope_draws[a] - slope_draws[b]
            result = {"effect": positional[a]["rank_slope"] - positional[b]["rank_slope"],
                      "ci95": [float(v) for v in np.percentile(differences, [2.5, 97.5])],
                      "p": two_sided_p(differences)}
        else:
            result = statistics.paired_bootstrap(
                group_counts(right[a], valid, items, selections[on]),
                group_counts(right[b], valid, items, selections[on]), samples=samples)
        tested.append(dict(name=f"{a} - {b} on {on}", a=a, b=b, on=on,
                           metric="rank_slope" if on == "rank_slope" else "accuracy",
                           **result))
    for contrast, adjusted in zip(tested, statistics.holm([c["p"] for c in tested])):
        contrast.update(p_holm=adjusted, significant=bool(adjusted < ALPHA))
    return {"accuracy": accuracy, "positional": positional, "contrasts": tested}
