"""The paper's text-side ablation at toy scale: arms x seeds, trained and scored alike.

  python -m lidit_jax.evaluate.ablation --arms=baseline,instruction,refiner,lidit \\
      --seeds=2 --workdir=DIR [--set=train.steps=300 ...] [--configs_dir=configs/ablations]

Each arm is a config file CONFIGS_DIR/<arm>.py; `--set key=value` overrides apply to every arm
(then config.seed = the seed). Per arm and seed, in one process:
  1. text states: cached once per encoder setting under DIR/text_cache/<llm>-<setting>
     (`--mode=encode`'s writer; an arm's cache root DIR/runs/<arm>/text_cache links to them);
  2. training (`--mode=train`'s loop) in DIR/runs/<arm>/seed<k>;
  3. the shapes scores of its EMA weights (`--mode=eval --benchmark=shapes`) in .../eval.
ablation.md compares arms prompt by prompt (`lidit_jax.evaluate.statistics`: hierarchical
bootstrap over prompts and seeds, Holm over the table): by default every arm against the first;
`--contrasts=a-b,...` fixes the pairs before the run, `--contrast_subsets` the held-out prompt
subsets (SUBSETS) and `--contrast_metrics` the scores compared.
A run whose eval/scores.json exists is skipped, so the command resumes after a crash (a run
killed mid-training resumes from its last checkpoint). Compiled programs are shared through
JAX's persistent compilation cache (DIR/jax_cache): seeds of an arm compile once.
Then `summarise` writes DIR/ablation.md (mean and spread over seeds of every metric, per arm),
DIR/accuracy.png (bars), DIR/by_mention.png (positional-bias curves), DIR/samples/<arm>.png.
"""
import contextlib
import fcntl
import hashlib
import json
import os
import time
import traceback

import numpy as np
from absl import app, flags, logging

from lidit_jax import compilation_cache, config_files, configuration
from lidit_jax.text import features
from lidit_jax.evaluate import statistics

TABLE_METRICS = ("prompt_accuracy", "object_accuracy", "colour_accuracy", "shape_accuracy",
                 "size_accuracy", "position_accuracy", "count_accuracy")
CONTRAST_METRICS = ("position_accuracy", "shape_accuracy", "colour_accuracy", "prompt_accuracy")
# Held-out prompt subsets a contrast is computed on: name -> (label, predicate on the prompt's
# shapes metadata). listing / late: the "grid_late" design's two templates (data/shapes.py),
# prompts of 2-4 objects (with one object the late template binds nothing).
SUBSETS = {
    "all": ("all", lambda m: True),
    "one_object": ("1 object", lambda m: len(m["objects"]) == 1),
    "listing": ("listing, 2-4 objects", lambda m: m["template"] == 0 and len(m["objects"]) > 1),
    "late": ("late binding, 2-4 objects",
             lambda m: m["template"] == 3 and len(m["objects"]) > 1),
}
CONTRAST_SUBSETS = ("all", "one_object")


def load_arm(configs_dir, arm, overrides=(), seed=0):
    """CONFIGS_DIR/<arm>.py's get_config(), with `key=value` overrides and config.seed."""
    path = os.path.join(configs_dir, f"{arm}.py")
    if not os.path.exists(path):
        known = sorted(f[:-3] for f in os.listdir(configs_dir)
                       if f.endswith(".py") and f not in ("__init__.py", "base.py"))
        raise ValueError(f"no arm {arm!r} in {configs_dir}; known arms: {known}")
    try:
        config = config_files.apply_overrides(config_files.load(path), overrides)
    except KeyError as e:
        raise ValueError(f"--set {e.args[0]}") from None
    config.seed = seed
    return config


def encoder_setting(config, name):
    """A readable, unique directory name for what an LLM's cached states depend on."""
    llm, text = config.text.llms[name], config.text
    setting = dict(path=llm.path, layer=llm.layer, final_norm=llm.final_norm, dtype=llm.dtype,
                   instruction=text.instruction if text.use_instruction else "",
                   system=text.system_prompt, chat=text.use_chat_template,
                   max_length=text.max_length, data=config.data.to_dict())
    digest = hashlib.sha1(json.dumps(setting, sort_keys=True, default=str).encode()).hexdigest()
    return (f"{name}-layer{llm.layer}-{'instr' if text.use_instruction else 'plain'}-"
            f"{digest[:8]}")


def prepare_text_cache(config, root, arm_dir):
    """Points config.text.cache_dir at ARM_DIR/text_cache, whose per-LLM entries link to the
    shared ROOT/text_cache/<setting> caches; encodes those not complete yet."""
    from lidit_jax import encode  # Loads the LLMs: only when training.
    arm_cache = os.path.join(arm_dir, "text_cache")
    os.makedirs(arm_cache, exist_ok=True)
    # Workers running other seeds of the same arms (--run_seeds) encode one at a time.
    with open(os.path.join(root, "text_cache.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for name in features.encoder_names(config.text):
            shared = os.path.join(root, "text_cache", encoder_setting(config, name))
            os.makedirs(shared, exist_ok=True)
            link = os.path.join(arm_cache, name)
            if not os.path.islink(link):
                os.symlink(shared, link)
        config.text.cache_dir = arm_cache
        # Complete shards are skipped: a setting another arm cached costs one LLM load.
        encode.run(config, arm_dir)


def run_one(config, run_dir):
    """Trains one arm/seed in RUN_DIR and scores it; returns its scores dict."""
    from lidit_jax.evaluate.mode import shapes_report
    from lidit_jax.inference import load_trained_run
    from lidit_jax.parallel import mesh as mesh_lib
    from lidit_jax.train import loop
    start = time.time()
    loop.run(config, run_dir)
    trained_at = time.time()
    mesh = mesh_lib.build_mesh(config.mesh)
    scores = shapes_report(config, load_trained_run(config, run_dir, mesh), mesh,
                           os.path.join(run_dir, "eval"))
    timing = {"train_s": trained_at - start, "eval_s": time.time() - trained_at}
    with open(os.path.join(run_dir, "timing.json"), "w") as f:
        json.dump(timing, f)
    return scores


@contextlib.contextmanager
def llms_kept_loaded():
    """Within it, each frozen LLM is read once per (path, load options) and shared.

    Encoding, training (its fixed prompts) and evaluation each build PromptEncoders; reading
    and dequantising a GGUF took 30-50 s on the shared 2-core machine, three times per run
    without this. The LLMs are frozen, so sharing them changes no result.
    """
    from lidit_jax.text import encoder
    original, loaded = encoder.load_llm, {}

    def load_once(path, **options):  # dtype, mesh, rules, attention: load_llm's keywords.
        key = (str(path), *sorted((name, repr(value)) for name, value in options.items()))
        if key not in loaded:
            loaded[key] = original(path, **options)
        return loaded[key]
    encoder.load_llm = load_once
    try:
        yield
    finally:
        encoder.load_llm = original


def parse_contrasts(specs, arms):
    """["a-b", ...] (arm a minus arm b) -> [(a, b), ...]; empty: every arm minus the first."""
    if not specs:
        return [(arm, arms[0]) for arm in arms[1:]]
    pairs = []
    for spec in specs:
        pair = tuple(spec.split("-"))
        if len(pair) != 2 or not set(pair) <= set(arms):
            raise ValueError(f"--contrasts entry {spec!r}: want ARM-ARM with both arms in "
                             f"--arms {list(arms)} (arm names must not contain '-')")
        pairs.append(pair)
    return pairs


def run_ablation(arms, seeds, workdir, overrides=(), configs_dir="configs/ablations",
                 run_seeds=None, contrasts=(), contrast_subsets=CONTRAST_SUBSETS,
                 contrast_metrics=CONTRAST_METRICS):
    """Runs every arm x seed not done yet (resumable), then `summarise` (all `seeds` seeds
    finished so far). run_seeds: only these seeds (default all), e.g. one per worker process;
    contrasts: "a-b" pairs for the paired table (parse_contrasts), computed on each of
    contrast_subsets (SUBSETS names) for each of contrast_metrics."""
    pairs = parse_contrasts(contrasts, arms)
    unknown = set(contrast_subsets) - set(SUBSETS)
    if unknown:
        raise ValueError(f"--contrast_subsets {sorted(unknown)}; choose from {list(SUBSETS)}")
    workdir = os.path.abspath(workdir)
    with llms_kept_loaded(), compilation_cache.persistent_cache(os.path.join(workdir, "jax_cache")):
        return _run_ablation(arms, seeds, workdir, overrides, configs_dir,
                             range(seeds) if run_seeds is None else run_seeds,
                             dict(pairs=pairs, subsets=tuple(contrast_subsets),
                                  metrics=tuple(contrast_metrics)))


def _run_ablation(arms, seeds, workdir, overrides, configs_dir, run_seeds, contrasts):
    from lidit_jax.evaluate.shapes_eval import heldout_records
    configs = {arm: load_arm(configs_dir, arm, overrides) for arm in arms}  # Fail early.
    for config in configs.values():
        configuration.validate(config)
    # Every arm is scored on these prompts (eval.seed, eval.num_prompts and the data's layout
    # are not text-side settings): the first arm's config names them.
    prompts = [record["metadata"] for record in heldout_records(configs[arms[0]])]
    failed = []
    for arm in arms:
        arm_dir = os.path.join(workdir, "runs", arm)
        for seed in run_seeds:
            run_dir = os.path.join(arm_dir, f"seed{seed}")
            if os.path.exists(os.path.join(run_dir, "eval", "scores.json")):
                continue
            config = load_arm(configs_dir, arm, overrides, seed)
            logging.info("ablation: arm %s seed %d in %s", arm, seed, run_dir)
            try:
                prepare_text_cache(config, workdir, arm_dir)
                scores = run_one(config, run_dir)
                print(f"arm={arm} seed={seed} prompt_accuracy={scores['prompt_accuracy']:.4f} "
                      f"object_accuracy={scores['object_accuracy']:.4f}", flush=True)
            except Exception:  # noqa: BLE001 - one broken arm must not stop the others.
                logging.error("arm %s seed %d failed:\n%s", arm, seed, traceback.format_exc())
                failed.append((arm, seed))
    summarise(workdir, arms, seeds, prompts=prompts, **contrasts)
    return failed


def collect(workdir, arms, seeds):
    """{arm: [scores dict per finished seed]} (timing attached as scores['timing'])."""
    out = {}
    for arm in arms:
        runs = []
        for seed in range(seeds):
            run_dir = os.path.join(workdir, "runs", arm, f"seed{seed}")
            path = os.path.join(run_dir, "eval", "scores.json")
            if os.path.exists(path):
                with open(path) as f:
                    scores = json.load(f)
                timing_path = os.path.join(run_dir, "timing.json")
                if os.path.exists(timing_path):
                    with open(timing_path) as f:
                        scores["timing"] = json.load(f)
                scores["seed"] = seed
                runs.append(scores)
        if runs:
            out[arm] = runs
    return out


def _mean_spread(values):
    """(mean, sample std over seeds; 0 for one seed)."""
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def markdown_table(results):
    """{arm: [scores]} -> markdown: mean ± std over seeds per metric, seeds, train time."""
    head = "| arm | seeds | " + " | ".join(m.replace("_accuracy", "") for m in TABLE_METRICS)
    lines = [head + " | train s / seed |", "|---" * (len(TABLE_METRICS) + 3) + "|"]
    for arm, runs in results.items():
        cells = []
        for metric in TABLE_METRICS:
            mean, std = _mean_spread([r[metric] for r in runs])
            cells.append(f"{mean:.3f} ± {std:.3f}")
        train_s = [r["timing"]["train_s"] for r in runs if "timing" in r]
        time_cell = f"{np.mean(train_s):.0f}" if train_s else "-"
        lines.append(f"| {arm} | {len(runs)} | " + " | ".join(cells) + f" | {time_cell} |")
    return "\n".join(lines) + "\n"


def mention_table(results):
    """{arm: [scores]} -> markdown: object accuracy by mention rank (mean ± std over seeds)."""
    ranks = sorted({b["rank"] for runs in results.values() for r in runs for b in r["by_mention"]})
    lines = ["| arm | " + " | ".join(f"mention {k}" for k in ranks) + " |",
             "|---" * (len(ranks) + 1) + "|"]
    for arm, runs in results.items():
        cells = []
        for rank in ranks:
            values = [b["accuracy"] for r in runs for b in r["by_mention"] if b["rank"] == rank]
            cells.append("{:.3f} ± {:.3f}".format(*_mean_spread(values)) if values else "-")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def contrasts(results, pairs, prompts, subsets=CONTRAST_SUBSETS, metrics=CONTRAST_METRICS):
    """{arm: [scores]} -> one dict per (pair, subset, metric): arm a minus arm b paired by prompt
    (the same held-out prompts, in order, and noise), restricted to the subset's prompts, with
    its 95 % hierarchical-bootstrap interval (prompts and seeds), bootstrap p and the Holm p over
    all rows. prompts: the held-out prompts' shapes metadata. Pairs with an arm that has no
    finished run are left out."""
    rows = []
    for a, b in pairs:
        if a not in results or b not in results:
            continue
        for subset in subsets:
            keep = [SUBSETS[subset][1](metadata) for metadata in prompts]
            for metric in metrics:
                counts = []
                for name in (a, b):
                    runs = [run["per_image"] for run in results[name]]
                    if any(len(images) != len(keep) for images in runs):
                        raise ValueError(f"arm {name} was scored on a different prompt set "
                                         f"({[len(i) for i in runs]} vs {len(keep)} prompts)")
                    counts.append(np.array([[image[metric] for image, k in zip(images, keep) if k]
                                            for images in runs]))
                test = statistics.paired_bootstrap(*counts)
                rows.append(dict(arm=a, against=b, subset=subset, metric=metric,
                                 prompts=int(sum(keep)), **test))
    for row, p in zip(rows, statistics.holm([row["p"] for row in rows])):
        row["p_holm"] = p
    return rows


def contrast_table(rows):
    """contrasts() rows -> markdown: effect, 95 % interval, Holm p per row."""
    lines = ["| contrast | prompts | metric | effect | 95 % interval | Holm p |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        low, high = row["ci95"]
        lines.append(f"| {row['arm']} - {row['against']} | {SUBSETS[row['subset']][0]} "
                     f"({row['prompts']}) | {row['metric'].replace('_accuracy', '')} | "
                     f"{row['effect']:+.3f} | [{low:+.3f}, {high:+.3f}] | {row['p_holm']:.3g} |")
    return "\n".join(lines) + "\n"


def plot_bars(results, path):
    """Grouped bars: per metric, one bar per arm (mean over seeds, error bar = std)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    arms = list(results)
    width = 0.8 / max(len(arms), 1)
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(TABLE_METRICS) + 0.2 * len(arms)), 4.2))
    for i, arm in enumerate(arms):
        stats = [_mean_spread([r[m] for r in results[arm]]) for m in TABLE_METRICS]
        ax.bar(np.arange(len(TABLE_METRICS)) + (i - (len(arms) - 1) / 2) * width,
               [s[0] for s in stats], width, yerr=[s[1] for s in stats], label=arm, capsize=2)
    ax.set_xticks(np.arange(len(TABLE_METRICS)))
    ax.set_xticklabels([m.replace("_accuracy", "") for m in TABLE_METRICS])
    ax.set_ylabel("accuracy (mean over seeds, bar = std)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_mentions(results, path):
    """Positional-bias curves: object accuracy vs mention rank in the caption, per arm."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, runs in results.items():
        ranks = sorted({b["rank"] for r in runs for b in r["by_mention"]})
        stats = [_mean_spread([b["accuracy"] for r in runs for b in r["by_mention"]
                               if b["rank"] == k]) for k in ranks]
        ax.errorbar(ranks, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o",
                    capsize=2, label=arm)
    ax.set_xlabel("object's mention rank in the caption")
    ax.set_ylabel("object accuracy (colour, shape, size at its slot)")
    ax.set_xticks(range(1, 5))
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarise(workdir, arms, seeds, pairs=(), prompts=None, subsets=CONTRAST_SUBSETS,
              metrics=CONTRAST_METRICS):
    """Writes ablation.md, ablation.json, accuracy.png, by_mention.png and samples/<arm>.png;
    with `pairs` ((a, b) arms) and `prompts` (the held-out prompts' metadata), ablation.md also
    gets the paired contrasts (`contrasts`), also written to contrasts.json."""
    import shutil
    results = collect(workdir, arms, seeds)
    if not results:
        logging.warning("ablation: no finished runs in %s", workdir)
        return results
    with open(os.path.join(workdir, "ablation.json"), "w") as f:
        json.dump(results, f, indent=1)
    any_run = next(iter(results.values()))[0]
    with open(os.path.join(workdir, "ablation.md"), "w") as f:
        f.write(f"Shapes prompt following per arm: mean ± std over seeds, "
                f"{any_run['num_images']} held-out prompts per run (step {any_run['step']}, "
                f"{any_run['sampler']} {any_run['sample_steps']} steps, guidance "
                f"{any_run['guidance_scale']}).\n\n")
        f.write(markdown_table(results))
        f.write("\nObject accuracy by the object's mention rank in the caption:\n\n")
        f.write(mention_table(results))
        paired = all("per_image" in r for runs in results.values() for r in runs)
        rows = contrasts(results, pairs, prompts, subsets, metrics) if paired and prompts else []
        if rows:
            f.write("\nPaired contrasts (runs scored on the same prompts; Holm over the "
                    f"{len(rows)} rows):\n\n")
            f.write(contrast_table(rows))
            with open(os.path.join(workdir, "contrasts.json"), "w") as out:
                json.dump(rows, out, indent=1)
    plot_bars(results, os.path.join(workdir, "accuracy.png"))
    plot_mentions(results, os.path.join(workdir, "by_mention.png"))
    os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
    for arm, runs in results.items():
        grid = os.path.join(workdir, "runs", arm, f"seed{runs[0]['seed']}", "eval",
                            "samples.png")
        shutil.copyfile(grid, os.path.join(workdir, "samples", f"{arm}.png"))
    return results


def main(argv):
    del argv
    f = flags.FLAGS
    if not f.arms or not f.workdir:
        raise SystemExit("error: --arms=a,b,... and --workdir=DIR are required")
    run_seeds = [int(s) for s in f.run_seeds] if f.run_seeds else None
    failed = run_ablation(f.arms, f.seeds, f.workdir, f.set, f.configs_dir, run_seeds,
                          f.contrasts, f.contrast_subsets, f.contrast_metrics)
    print(f"ablation={os.path.join(os.path.abspath(f.workdir), 'ablation.md')} "
          f"failed={len(failed)}")


if __name__ == "__main__":
    # Defined here, not at import: lidit_jax.main defines --workdir too, and a process that
    # imports both modules (tests, notebooks) must not see a duplicate flag.
    flags.DEFINE_list("arms", None, "Arms: config names in --configs_dir, in run order.")
    flags.DEFINE_integer("seeds", 2, "Seeds per arm (0..seeds-1).")
    flags.DEFINE_string("workdir", None, "Where runs, caches and the summary go.")
    flags.DEFINE_list("run_seeds", None, "Only these seeds (default: all); run one worker "
                      "process per seed to use more cores.")
    flags.DEFINE_multi_string("set", [], "key=value config override for every arm.")
    flags.DEFINE_string("configs_dir", "configs/ablations", "Folder of arm configs.")
    flags.DEFINE_list("contrasts", [], "Paired contrasts a-b (arm a minus arm b), fixed before "
                      "the run; default: every arm minus the first.")
    flags.DEFINE_list("contrast_subsets", list(CONTRAST_SUBSETS),
                      f"Held-out prompt subsets of every contrast: {list(SUBSETS)}.")
    flags.DEFINE_list("contrast_metrics", list(CONTRAST_METRICS), "Scores compared.")
    app.run(main)
