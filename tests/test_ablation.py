"""The ablation runner end to end: two tiny arms x 2 seeds -> table, plots, sample grids."""
import os

import jax
import numpy as np
import pytest

from lidit_jax.data import shapes
from lidit_jax.evaluate import ablation


def _tiny(tiny_llm):
    return [f"text.llms.smollm2.path={tiny_llm}", "text.llms.smollm2.width=0",
            "model.depth=1", "model.width=32", "model.heads=2", "text.refiner.heads=2",
            "data.shapes_num_records=16", "train.steps=2", "train.batch_size=8",
            "train.warmup_steps=0", "train.log_every=1", "eval.num_prompts=8",
            "eval.batch_size=8", "diffusion.sample_steps=2",
            "mesh.replicated_min_size=1099511627776"]


@pytest.mark.slow
def test_two_tiny_arms_two_seeds_write_table_plots_and_resume(tiny_llm, tmp_path):
    workdir = str(tmp_path / "ablation")
    failed = ablation.run_ablation(["baseline", "lidit"], 2, workdir, _tiny(tiny_llm))
    assert failed == []
    table = open(os.path.join(workdir, "ablation.md")).read()
    for arm in ("baseline", "lidit"):
        row = next(line for line in table.splitlines() if line.startswith(f"| {arm} |"))
        assert row.split("|")[2].strip() == "2"  # Two seeds aggregated.
        assert " ± " in row
        assert open(os.path.join(workdir, "samples", f"{arm}.png"), "rb").read(4) == b"\x89PNG"
    for plot in ("accuracy.png", "by_mention.png"):
        assert open(os.path.join(workdir, plot), "rb").read(4) == b"\x89PNG"
    assert "mention 1" in table
    # Two text settings (instruction off / on), each cached once and shared by both seeds.
    assert len(os.listdir(os.path.join(workdir, "text_cache"))) == 2
    # Finished runs are skipped: a second call retrains and rescores nothing.
    scores = os.path.join(workdir, "runs", "lidit", "seed1", "eval", "scores.json")
    before = os.path.getmtime(scores)
    assert ablation.run_ablation(["baseline", "lidit"], 2, workdir, _tiny(tiny_llm)) == []
    assert os.path.getmtime(scores) == before
    # The persistent compilation cache was the ablation's alone: what this process compiles
    # next is not written there.
    cache = os.path.join(workdir, "jax_cache")
    entries = set(os.listdir(cache))
    assert entries
    jax.jit(lambda x: x * 3 + 1)(np.arange(5.0)).block_until_ready()
    assert set(os.listdir(cache)) == entries


def test_unknown_arm_and_override_are_refused_with_the_known_names(tmp_path):
    with pytest.raises(ValueError, match="known arms: .*baseline"):
        ablation.load_arm("configs/ablations", "basline")
    with pytest.raises(ValueError, match="did you mean 'train.steps'"):
        ablation.load_arm("configs/ablations", "baseline", ["train.setps=3"])


def test_contrasts_fixed_pairs_on_prompt_subsets_with_holm():
    # 16 prompts of the grid_late design: one-object prompts and 2-4 object listing / late.
    prompts = [shapes.ShapesSource(16, seed=0, layout="grid_late")[i]["metadata"]
               for i in range(16)]
    late = [m["template"] == 3 and len(m["objects"]) > 1 for m in prompts]
    rng = np.random.default_rng(0)
    results = {  # "good" wins every late prompt over "bad"; elsewhere they tie.
        "good": [{"per_image": [{"position_accuracy": [1 if is_late else hit, 1]}
                                for is_late, hit in zip(late, rng.integers(0, 2, 16))]}] * 3,
        "bad": [{"per_image": [{"position_accuracy": [0 if is_late else hit, 1]}
                               for is_late, hit in zip(late, rng.integers(0, 2, 16))]}] * 3}
    pairs = ablation.parse_contrasts(["good-bad", "bad-good"], ["bad", "good"])
    assert pairs == [("good", "bad"), ("bad", "good")]
    rows = ablation.contrasts(results, pairs, prompts, ("late", "listing"), ("position_accuracy",))
    assert [(r["arm"], r["subset"], r["prompts"]) for r in rows] == [
        ("good", "late", 6), ("good", "listing", 6), ("bad", "late", 6), ("bad", "listing", 6)]
    assert rows[0]["effect"] == 1.0 and rows[2]["effect"] == -1.0
    assert all(r["p_holm"] >= r["p"] for r in rows)
    assert rows[0]["p_holm"] < 0.01
    assert "| good - bad | late binding, 2-4 objects (6) | position | +1.000" in (
        ablation.contrast_table(rows))
    # Default: every arm minus the first; a pair naming an arm not run is refused.
    assert ablation.parse_contrasts([], ["a", "b", "c"]) == [("b", "a"), ("c", "a")]
    with pytest.raises(ValueError, match="--contrasts entry 'a-z'"):
        ablation.parse_contrasts(["a-z"], ["a", "b"])
