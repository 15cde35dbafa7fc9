"""The benchmark suite: every benchmark, one summary table, one JSON file.

    python -m benchmarks.run [--smoke] [--out=benchmarks.json] [--only=train_step,sample]

Each benchmark runs in its own process (`python -m benchmarks.<name> --smoke?`), so one's XLA
flags (fsdp_memory's 8 fake devices) and memory never affect another's timing; each prints one
JSON record per line. Every figure is a ratio against a reference measured in the same run
(diffusers, transformers, a bare PIL loop, the demo's step, the ideal 1/N) or against this CPU's
measured float32 matmul peak. `--smoke` runs tiny shapes with one repeat (CI: checks that every
benchmark runs and reports every field; its timings mean nothing).
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

BENCHMARKS = ("train_step", "llm_forward", "input_pipeline", "fsdp_memory", "sample")

# name -> (record -> (label, figure, reference, ratio, target)); target None: no goal.
ROWS = {
    "train_step": lambda r: (f"train step, {r['shape']} (d{r['depth']} w{r['width']} "
                             f"b{r['batch']}), images/s",
                             r["ours_images_per_s"], f"diffusers {r['diffusers_images_per_s']:.2f}",
                             r["ratio"], 1.2 if r["shape"] == "pixart" else 1.0),
    "llm_forward": lambda r: (
        (f"LLM forward, SmolLM2-135M {r['batch']}x{r['length']}, tokens/s",
         r["ours_tokens_per_s"], f"transformers {r['transformers_tokens_per_s']:.0f}",
         r["ratio"], None)
        if "ours_tokens_per_s" in r else
        (f"encoder task, SmolLM2-135M, {r['prompts']} captions at max_length "
         f"{r['max_length']} (ours {r['ours_length']}), prompts/s", r["ours_prompts_per_s"],
         f"transformers {r['transformers_prompts_per_s']:.2f}", r["ratio"], 1.3)),
    "input_pipeline": lambda r: (
        ("input pipeline, demo data, images/s", r["pipeline_images_per_s"],
         f"demo step {r['train_step_images_per_s']:.1f}", r["ratio"], 5.0)
        if r["name"] == "demo" else
        (f"input pipeline, {r['image']}px JPEG, images/s", r["pipeline_images_per_s"],
         f"bare PIL {r['bare_pil_images_per_s']:.1f}", r["ratio"], None)),
    "fsdp_memory": lambda r: (f"FSDP state bytes/device, N={r['devices']}",
                              r["bytes_per_device"], f"ideal {r['ideal_bytes']:.3g}",
                              r["ratio_to_ideal"], None),
    "sample": lambda r: (f"sampling, demo model, {r['sampler']} {r['steps']} steps CFG, images/s",
                         r["images_per_s"],
                         f"peak {r['cpu_peak_flops_per_s'] / 1e9:.0f} GFLOP/s",
                         r["fraction_of_peak"], None),
}


def run_benchmark(name, smoke, extra_args=()):
    """The records one benchmark prints, run as `python -m benchmarks.<name>`."""
    command = ([sys.executable, "-m", f"benchmarks.{name}"] + (["--smoke"] if smoke else [])
               + list(extra_args))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(command, cwd=root, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n"
                           f"{result.stderr[-4000:]}")
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def fsdp_within(record, tolerance=0.10):
    return record["devices"] == 1 or record["ratio_to_ideal"] <= 1 + tolerance


def summary_table(results):
    """Markdown table: benchmark, ours, reference, ratio, target, met."""
    lines = ["| benchmark | ours | reference | ratio | target | met |",
             "|---|---|---|---|---|---|"]
    for name, records in results.items():
        for record in records:
            label, ours, reference, ratio, target = ROWS[name](record)
            if name == "fsdp_memory":
                target_text, met = "<= 1.10", fsdp_within(record)
            elif target is None:
                target_text, met = "", None
            else:
                target_text, met = f">= {target}", ratio >= target
            lines.append(f"| {label} | {ours:.4g} | {reference} | {ratio:.2f} | {target_text} | "
                         f"{'' if met is None else ('yes' if met else 'no')} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one repeat (CI)")
    parser.add_argument("--out", default="benchmarks.json", help="the JSON file to write")
    parser.add_argument("--only", default=",".join(BENCHMARKS),
                        help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    parser.add_argument("--train_shapes", default="pixart,large",
                        help="train_step's shapes (benchmarks/train_step.py SHAPES)")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n]
    unknown = set(names) - set(BENCHMARKS)
    if unknown:
        sys.exit(f"error: --only names {sorted(unknown)}; known: {', '.join(BENCHMARKS)}")
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()[0]
    results = {}
    for name in names:
        print(f"running benchmarks.{name} ...", file=sys.stderr, flush=True)
        extra = [f"--shapes={args.train_shapes}"] if name == "train_step" else []
        results[name] = run_benchmark(name, args.smoke, extra)
    report = {
        "smoke": args.smoke,
        "started_utc": started.isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0],
        "results": results,
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(summary_table(results))
    print(f"\n{os.cpu_count()} CPUs, load average {load_before:.1f} before, "
          f"{report['load_average_after']:.1f} after; JSON: {args.out}")


if __name__ == "__main__":
    main()
