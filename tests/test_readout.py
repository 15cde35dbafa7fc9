"""The readout benchmark: prompt truths, statistics against known cases, a tiny run end to end."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from lidit_jax.data import shapes
from lidit_jax.evaluate import readout_prompts as prompts
from lidit_jax.evaluate import readout, readout_stats, scratch_lm
from train_helpers import child_env

_OBJECT = r"a (small|large) (\w+) (\w+)"
_SLOT = "(?:" + "|".join(prompts.GRID.slots) + ")"


def _parse(caption):
    """A reference reader of every construction, written from the English (not from the
    generator): caption -> slots tuple."""
    found = {}
    if m := re.fullmatch(rf"(.*), in the ({_SLOT}(?:(?:, | and ){_SLOT})*) respectively",
                         caption):
        objects = re.findall(_OBJECT, m.group(1))
        places = re.findall(_SLOT, m.group(2))
        assert len(objects) == len(places)
        found = dict(zip(places, objects))
    elif m := re.fullmatch(rf"{_OBJECT} and {_OBJECT} in the (top|bottom|left|right) "
                           r"(row|column), from (\w+) to (\w+)", caption):
        size_a, colour_a, shape_a, size_b, colour_b, shape_b, line, kind, start, _ = m.groups()
        if kind == "row":
            places = [f"{line} left", f"{line} right"]
            reverse = start == "right"
        else:
            places = [f"top {line}", f"bottom {line}"]
            reverse = start == "bottom"
        objects = [(size_a, colour_a, shape_a), (size_b, colour_b, shape_b)]
        found = dict(zip(places, objects[::-1] if reverse else objects))
    elif caption.startswith("in the "):  # pre-binding: "in the <slot>, a ... <shape>"
        found = {p: o for p, *o in re.findall(rf"in the ({_SLOT}), {_OBJECT}", caption)}
        found = {p: tuple(o) for p, o in found.items()}
    else:  # post-binding: "a ... <shape> in the <slot>"
        found = {p: o for *o, p in re.findall(rf"{_OBJECT} in the ({_SLOT})", caption)}
        found = {p: tuple(o) for p, o in found.items()}
    slots = []
    for name in prompts.GRID.slots:
        if name in found:
            size, colour, shape = found[name]
            assert colour in shapes.COLOUR_NAMES and shape in shapes.SHAPES
            slots.append((colour, shape, size))
        else:
            slots.append(None)
    return tuple(slots)


def test_a_reference_parser_reads_every_construction_caption_as_its_truth():
    rng = np.random.default_rng(0)
    for construction in prompts.CONSTRUCTIONS:
        for group in range(60):
            items = prompts.generate(rng, construction, group)
            assert len(items) == (2 if construction in ("order_flip", "attribute_swap") else 1)
            for item in items:
                assert _parse(item.caption) == item.slots, item.caption
                assert item.construction == construction and item.group == group
                assert sorted(item.mentions) == [i for i, s in enumerate(item.slots) if s]
            if len(items) == 2:  # Minimal pairs: the same words reordered, different truths.
                assert items[0].slots != items[1].slots
                assert items[0].caption != items[1].caption
                assert sorted(items[0].caption.split()) == sorted(items[1].caption.split())


def test_mention_order_is_drawn_independently_of_slot():
    rng = np.random.default_rng(1)
    firsts = [prompts.generate(rng, "many", g)[0].mentions[0] for g in range(800)]
    # Slot-ordered captions would always mention slot 0 first.
    assert np.bincount(firsts, minlength=4).min() > 150


def test_test_scenes_never_occur_in_training_and_test_is_deduplicated():
    train, test = prompts.make_split(600, 12, seed=3)
    assert {i.slots for i in train}.isdisjoint({i.slots for i in test})
    keys = [(i.construction, i.slots) for i in test]
    assert len(keys) == len(set(keys))
    assert {i.construction for i in test} == set(prompts.CONSTRUCTIONS)
    # Minimal pairs share a group, other groups hold one caption.
    sizes = np.bincount([i.group for i in test])
    assert set(sizes[sizes > 0]) == {1, 2}


def test_summary_finds_a_planted_difference_only_where_it_was_planted():
    _, items = prompts.make_split(0, 30, seed=4)
    truth = prompts.targets_of(items)
    wrong = {h: np.where(t >= 0, (t + 1) % prompts.CLASSES[h], t) for h, t in truth.items()}
    late = np.array([i.construction == "late_override" for i in items])
    rng = np.random.default_rng(0)
    predictions = {}
    for arm, late_error in (("lidit", 0.0), ("raw", 0.5)):  # raw misreads half of late_override.
        miss = (rng.random((3, len(items), 4)) < late_error) & late[None, :, None]
        predictions[arm] = {h: np.where(miss, wrong[h][None], truth[h][None]) for h in truth}
    right = {arm: np.stack([readout_stats.units_right({h: p[h][s] for h in p}, truth,
                                                               "slots")
                            for s in range(3)]) for arm, p in predictions.items()}
    result = readout_stats.summarise(items, right, predictions, readout.CONTRASTS, samples=300)
    assert result["accuracy"]["lidit"]["all"]["accuracy"] == 1.0
    contrasts = {c["name"]: c for c in result["contrasts"]}
    assert list(contrasts) == ["lidit - raw on late_override", "lidit - raw on order_flip",
                               "lidit - raw on rank_slope"]
    planted = contrasts["lidit - raw on late_override"]
    assert planted["significant"] and planted["ci95"][0] > 0.3
    assert not contrasts["lidit - raw on order_flip"]["significant"]
    for c in contrasts.values():  # Holm never lowers a p-value.
        assert c["p"] <= c["p_holm"] <= 1.0


def test_accuracy_interval_is_exact_without_variation_and_covers_a_known_proportion():
    constant = np.tile([[3, 4]], (2, 50, 1))  # Every group 3 of 4 in every seed.
    value, (low, high) = readout_stats.accuracy_interval(constant, samples=200)
    assert value == low == high == 0.75
    rng = np.random.default_rng(0)
    hits = np.tile(rng.random((1, 400)) < 0.6, (3, 1))  # Seeds agree; one unit per group.
    counts = np.stack([hits, np.ones_like(hits)], -1).astype(float)
    value, (low, high) = readout_stats.accuracy_interval(counts, samples=2000)
    # Only groups vary: the binomial standard error sqrt(0.24 / 400) = 0.0245, so the 95 %
    # interval is about 4 of them wide around the observed accuracy.
    assert low < value < high and 0.085 < high - low < 0.107


def test_rank_slope_recovers_a_planted_bias_and_not_one_explained_by_object_count():
    rng = np.random.default_rng(0)
    count = rng.integers(1, 5, 6000)
    rank = (rng.random(6000) * count).astype(int)
    slot = rng.integers(0, 4, 6000)
    x = readout_stats.design(rank, slot, count, 4)
    planted = 1.0 / (1.0 + np.exp(-(1.5 - 0.5 * rank)))
    correct = (rng.random((1, 6000)) < planted).astype(float)
    slope = readout_stats.rank_slope(x, correct, np.ones(1), np.ones(6000))
    assert abs(slope + 0.5) < 0.1
    # Accuracy falling with object count only: late ranks look worse, but the slope is ~0.
    by_count = 1.0 / (1.0 + np.exp(-(2.0 - 0.6 * count)))
    correct = (rng.random((1, 6000)) < by_count).astype(float)
    assert correct[0, rank == 3].mean() < correct[0, rank == 0].mean() - 0.1
    assert abs(readout_stats.rank_slope(x, correct, np.ones(1), np.ones(6000))) < 0.1


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["slots", "mentions"])
def test_tiny_readout_end_to_end_writes_the_contract(tiny_llm, tmp_path, kind):
    output = tmp_path / "readout"
    command = [sys.executable, "-m", "lidit_jax.evaluate.readout", "--arms=raw,lidit",
               f"--readout={kind}",
               "--seeds=2", f"--output={output}", "--steps=3", "--num_train=48",
               "--test_groups=3", f"--set=text.llms.smollm2.path={tiny_llm}",
               "--set=text.llms.smollm2.width=0",
               "--set=model.width=32", "--set=text.refiner.heads=2"]
    done = subprocess.run(command, capture_output=True, text=True, env=child_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"readout arms=2 seeds=2 contrasts=(\d+) significant=(\d+)", last), last
    result = json.loads((output / "readout.json").read_text())
    assert result["arms"] == ["raw", "lidit"] and result["seeds"] == 2
    assert result["readout"] == kind
    for arm in ("raw", "lidit"):
        for construction in (*prompts.CONSTRUCTIONS, "all"):
            cell = result["accuracy"][arm][construction]
            assert cell["ci95"][0] <= cell["accuracy"] <= cell["ci95"][1]
            assert len(cell["per_seed"]) == 2
        assert len(result["positional"][arm]["by_rank"]) == 4
    # lidit - raw on late_override, order_flip and rank_slope: fixed before the run.
    names = [c["name"] for c in result["contrasts"]]
    assert names == ["lidit - raw on late_override", "lidit - raw on order_flip",
                     "lidit - raw on rank_slope"]
    significant = sum(c["significant"] for c in result["contrasts"])
    assert last.endswith(f"contrasts=3 significant={significant}")
    for contrast in result["contrasts"]:
        assert contrast["p"] <= contrast["p_holm"] <= 1.0
    # Two encoder settings (plain, instruction + chat template), each cached once for both seeds.
    assert len(os.listdir(output / "text_cache")) == 4  # (train, test) x 2 settings.
    runs = sorted(os.listdir(output / "runs"))
    assert [r.split("-")[0] for r in runs] == ["lidit", "raw"]
    assert all(sorted(os.listdir(output / "runs" / r)) == ["seed0.npz", "seed1.npz"] for r in runs)
    # Finished seeds are not retrained: a second call only re-summarises (in this process).
    before = {r: os.path.getmtime(output / "runs" / r / "seed1.npz") for r in runs}
    again = readout.run_readout(["raw", "lidit"], 2, str(output), readout=kind, steps=3,
                                num_train=48, test_groups=3, samples=50,
                                overrides=[f"text.llms.smollm2.path={tiny_llm}",
                                           "text.llms.smollm2.width=0",
                                           "model.width=32", "text.refiner.heads=2"])
    assert all(again["accuracy"][arm][c]["per_seed"] == result["accuracy"][arm][c]["per_seed"]
               for arm in ("raw", "lidit") for c in result["accuracy"][arm])
    assert {r: os.path.getmtime(output / "runs" / r / "seed1.npz") for r in runs} == before


def test_mention_spans_and_targets_name_each_mentioned_object_in_order():
    rng = np.random.default_rng(5)
    for construction in prompts.CONSTRUCTIONS:
        for item in prompts.generate(rng, construction, 0):
            targets = item.mention_targets()
            spans = item.spans()
            assert len(spans) == len(item.mentions)
            for rank, ((start, stop), slot) in enumerate(zip(spans, item.mentions)):
                colour, shape, size = item.slots[slot]
                assert item.caption[start:stop] == f"a {size} {colour} {shape}"
                assert targets["slot"][rank] == slot
                assert shapes.COLOUR_NAMES[targets["colour"][rank]] == colour
            assert (targets["slot"][len(spans):] == -1).all()
            # Reading the captions' spans in order: each after the previous one.
            assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


def test_mention_masks_mark_each_mentions_own_tokens_and_only_them():
    items = [prompts.generate(np.random.default_rng(6), "late_override", 0)[0]]
    offsets = [scratch_lm.word_offsets(items[0].caption)]
    masks = readout.mention_masks(items, offsets, len(offsets[0]))
    words = [items[0].caption[a:b] for a, b in offsets[0]]
    for k, (start, stop) in enumerate(items[0].spans()):
        assert " ".join(w for w, m in zip(words, masks[0, :, k]) if m) == \
            items[0].caption[start:stop]
    assert masks[0].sum(-1).max() == 1  # No token belongs to two mentions.
    assert not masks[0, :, len(items[0].mentions):].any()
    with pytest.raises(ValueError, match="text.max_length"):
        readout.mention_masks(items, offsets, 3)


def test_mentions_scoring_counts_every_head_and_only_real_mentions():
    _, items = prompts.make_split(0, 4, seed=7)
    truth = prompts.targets_of(items, "mentions")
    right = readout_stats.units_right(truth, truth, "mentions")
    assert (right == (truth["slot"] >= 0)).all()
    moved = dict(truth, slot=np.where(truth["slot"] >= 0, (truth["slot"] + 1) % 4, -1))
    assert not readout_stats.units_right(moved, truth, "mentions").any()


def test_every_contrast_names_configured_arms_that_differ_in_one_switch():
    """The contrasts are fixed before a run: each names two arms in configs/readout and a
    construction (or the rank slope); the controlled pairs differ in exactly one setting."""
    from lidit_jax.evaluate import ablation
    for a, b, on in readout.CONTRASTS:
        assert on in (*prompts.CONSTRUCTIONS, "all", "rank_slope")
        for arm in (a, b):
            ablation.load_arm("configs/readout", arm, ())

    def flat(arm):
        def walk(prefix, node):
            for key, value in node.items():
                if isinstance(value, dict):
                    yield from walk(f"{prefix}{key}.", value)
                else:
                    yield f"{prefix}{key}", value
        return dict(walk("", ablation.load_arm("configs/readout", arm, ()).to_dict()))

    for a, b, switch in (("refiner", "refiner_causal", "text.refiner.causal"),
                         ("lidit", "causal_refiner", "text.refiner.causal"),
                         ("refiner_ungated", "refiner_causal_ungated", "text.refiner.causal"),
                         ("refiner", "refiner_ungated", "text.refiner.gating"),
                         ("scratch_mlm", "scratch_causal", "scratch_lm")):
        x, y = flat(a), flat(b)
        assert {k for k in x.keys() | y.keys() if x.get(k) != y.get(k)} == {switch}, (a, b)


def test_scratch_pair_differs_in_what_early_tokens_can_see():
    """The scratch pair's one switch: a causal model's state of a word ignores later words, the
    masked-LM's does not (a few steps of real training, the readout corpus)."""
    train, _ = prompts.make_split(64, 1, seed=8)
    corpus = [i.caption for i in train]
    captions = ["a large red circle in the top left", "a large red circle in the bottom right"]
    for objective, sees_later in (("causal", False), ("mlm", True)):
        model, tokenizer = scratch_lm.train(objective, corpus, steps=3)
        states = scratch_lm.encode(model, tokenizer, captions)["states"]
        early = np.abs(states[0, :4] - states[1, :4]).max()  # "a large red circle"
        assert (early > 1e-4) == sees_later, (objective, early)
        assert np.abs(states[0, -1] - states[1, -1]).max() > 1e-4


@pytest.mark.parametrize("arm, overrides, sees_before, sees_after", [
    ("raw", [], False, False),
    ("refiner", [], True, True),
    ("refiner_causal", ["text.refiner.gating=False"], True, False),
    # The refiner's gates are conditioned on t_emb + the masked mean of the WHOLE caption's
    # states, so even under a causal mask every token is scaled by a function of later words.
    ("refiner_causal", [], True, True)])
def test_a_mention_query_reads_its_own_tokens_and_what_the_encoder_moved_into_them(
        arm, overrides, sees_before, sees_after):
    """mentions readout: query k sees only the states of mention k's tokens (after the
    conditioner's instruction drop moved them), plus what the text side moved into them. Four
    template tokens come first, as with an instruction."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from lidit_jax.evaluate import ablation
    from lidit_jax.evaluate.readout_model import ReadoutModel
    config = ablation.load_arm("configs/readout", arm, ["model.width=32",
                                                        "text.refiner.heads=2", *overrides])
    model = ReadoutModel(config, 16, "mentions", rngs=nnx.Rngs(0))
    # The refiner's gates start at zero (an identity refiner): move every weight off its init.
    params = nnx.state(model, nnx.Param)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    nnx.update(model, jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape)
                                                for x, k in zip(leaves, keys)]))
    length = 14
    mask = jnp.ones((1, length), bool)
    prompt_mask = jnp.arange(length)[None] >= 4
    # Mention 0: positions 6-7; mention 1: 10-11.
    mention_mask = jnp.zeros((1, length, 4), bool).at[0, 6:8, 0].set(True)
    mention_mask = mention_mask.at[0, 10:12, 1].set(True)
    states = jax.random.normal(jax.random.key(0), (1, length, 16))
    t = jnp.full((1,), 500.0)
    forward = nnx.jit(lambda m, s: m(s, mask, prompt_mask, t, mention_mask)["slot"][0, 0])
    base = forward(model, states)
    changed = {where: float(jnp.abs(forward(model, states.at[0, where].add(1.0)) - base).max())
               for where in (7, 9, 5)}  # Inside mention 0, after it, before it.
    assert changed[7] > 1e-4
    assert (changed[5] > 1e-6) == sees_before
    assert (changed[9] > 1e-6) == sees_after
