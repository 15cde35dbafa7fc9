"""Paired comparisons of runs scored on the same prompts: hierarchical bootstrap and Holm.

Every arm of an experiment is scored on the same held-out prompts with the same sampling noise,
so arms are compared prompt by prompt. Units are `[hits, units]` per (seed, prompt) (the
scorer's `per_image` entries); an arm's accuracy is its hits over its units. The bootstrap
resamples prompts (shared by both arms, which keeps the pairing) and, within each arm, seeds
(training randomness), so the interval covers both sources of variation.
"""
import numpy as np


def accuracy(counts):
    """counts [seeds, prompts, 2] (hits, units) -> pooled accuracy."""
    counts = np.asarray(counts, np.float64)
    return float(counts[..., 0].sum() / max(counts[..., 1].sum(), 1.0))


def paired_bootstrap(counts_a, counts_b, *, samples=4000, seed=0):
    """Accuracy of A minus B with a 95 % interval and a two-sided bootstrap p-value.

    counts_a [seeds_a, prompts, 2], counts_b [seeds_b, prompts, 2]: the same prompts in the same
    order. Returns dict(effect, ci95, p).
    """
    a, b = np.asarray(counts_a, np.float64), np.asarray(counts_b, np.float64)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"arms scored on different prompt sets: {a.shape[1]} vs {b.shape[1]}")
    rng = np.random.default_rng(seed)
    prompts = rng.integers(0, a.shape[1], (samples, a.shape[1]))
    seeds_a = rng.integers(0, a.shape[0], (samples, a.shape[0]))
    seeds_b = rng.integers(0, b.shape[0], (samples, b.shape[0]))

    def resampled(counts, seeds):  # -> [samples] accuracies.
        per_prompt = counts[seeds].sum(axis=1)  # [samples, prompts, 2] over resampled seeds.
        picked = np.take_along_axis(per_prompt, prompts[..., None], axis=1)
        return picked[..., 0].sum(-1) / np.maximum(picked[..., 1].sum(-1), 1.0)

    differences = resampled(a, seeds_a) - resampled(b, seeds_b)
    low, high = np.percentile(differences, [2.5, 97.5])
    tail = min(np.mean(differences <= 0), np.mean(differences >= 0))
    return {"effect": accuracy(a) - accuracy(b), "ci95": [float(low), float(high)],
            "p": float(min(1.0, max(2 * tail, 1.0 / samples)))}


def holm(p_values):
    """Holm-Bonferroni adjusted p-values, in the input order (family-wise error control)."""
    p = np.asarray(p_values, np.float64)
    order = np.argsort(p)
    adjusted = np.empty_like(p)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[index]))
        adjusted[index] = running
    return adjusted.tolist()
