"""Paired bootstrap and Holm correction (lidit_jax.evaluate.statistics)."""
import numpy as np

from lidit_jax.evaluate import statistics


def counts(hits):
    """[seeds, prompts] of 0/1 -> [seeds, prompts, 2] (hits, one unit each)."""
    hits = np.asarray(hits)
    return np.stack([hits, np.ones_like(hits)], axis=-1)


def test_a_real_difference_is_found_and_its_interval_covers_it():
    rng = np.random.default_rng(0)
    a = counts(rng.random((3, 300)) < 0.8)
    b = counts(rng.random((3, 300)) < 0.5)
    test = statistics.paired_bootstrap(a, b, samples=2000)
    assert abs(test["effect"] - 0.3) < 0.06
    assert test["ci95"][0] < test["effect"] < test["ci95"][1] and test["ci95"][0] > 0.2
    assert test["p"] <= 1 / 2000 + 1e-12


def test_no_difference_gives_a_large_p_and_pairing_removes_prompt_variance():
    rng = np.random.default_rng(1)
    easy = rng.random(300) < 0.5  # Per-prompt difficulty shared by both arms.
    a, b = counts(np.tile(easy, (3, 1))), counts(np.tile(easy, (3, 1)))
    test = statistics.paired_bootstrap(a, b, samples=2000)
    assert test["effect"] == 0.0 and test["ci95"] == [0.0, 0.0] and test["p"] == 1.0
    noisy = counts(rng.random((3, 300)) < 0.5)
    assert statistics.paired_bootstrap(noisy, a, samples=2000)["p"] > 0.05


def test_holm_matches_the_hand_computed_steps():
    # Sorted p 0.01, 0.02, 0.03, 0.5 -> 4 x 0.01, max(0.04, 3 x 0.02), max(.., 2 x 0.03), 0.5.
    adjusted = statistics.holm([0.03, 0.5, 0.01, 0.02])
    np.testing.assert_allclose(adjusted, [0.06, 0.5, 0.04, 0.06])
