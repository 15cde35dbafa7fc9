"""The benchmark suite in smoke mode: every benchmark runs and its JSON has every field.

Tiny shapes, one repeat; no timing is asserted (a 2-core CI machine's figures mean nothing).
"""
import json
import math
import os
import subprocess
import sys

import pytest

from cpu_flags import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FIELDS = {
    "train_step": {"shape", "depth", "width", "heads", "batch", "ours_images_per_s",
                   "diffusers_images_per_s", "ratio", "ours_flops_per_s", "cpu_peak_flops_per_s",
                   "fraction_of_peak", "torch_threads", "load_average"},
    "llm_forward": {"task", "model", "ratio", "load_average"},
    "input_pipeline": {"name", "pipeline_images_per_s", "ratio", "batch", "image",
                       "load_average"},
    "fsdp_memory": {"devices", "bytes_per_device", "ideal_bytes", "ratio_to_ideal"},
    "sample": {"sampler", "steps", "batch", "images_per_s", "flops_per_s", "fraction_of_peak",
               "load_average"},
}


@pytest.mark.slow  # Five processes that each start JAX (and torch) and compile.
def test_smoke_run_writes_every_field(tmp_path):
    out = tmp_path / "bench.json"
    # Quick code generation as in every test process: no figure of a smoke run is read. One
    # device, not the tests' eight; fsdp_memory appends its own count, and XLA's last flag wins.
    env = dict(os.environ, XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-m", "benchmarks.run", "--smoke", f"--out={out}"],
                            cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=2400)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["smoke"] is True
    assert set(report["results"]) == set(FIELDS)
    for name, fields in FIELDS.items():
        records = report["results"][name]
        assert records, name
        for record in records:
            assert fields <= set(record), (name, fields - set(record))
            for field in fields:
                if isinstance(record[field], float):
                    assert math.isfinite(record[field]) and record[field] > 0, (name, field)
    raw, task = report["results"]["llm_forward"]
    assert {"batch", "length", "ours_tokens_per_s", "transformers_tokens_per_s"} <= set(raw)
    assert {"prompts", "max_length", "ours_length", "ours_prompts_per_s"} <= set(task)
    assert task["ours_length"] < task["max_length"]  # The length bucket, not max_length.
    demo, photos = report["results"]["input_pipeline"]
    assert "train_step_images_per_s" in demo and "bare_pil_images_per_s" in photos
    assert [r["devices"] for r in report["results"]["fsdp_memory"]] == [1, 2, 4, 8]
    # The table names every benchmark's reference.
    for word in ("diffusers", "transformers", "demo step", "bare PIL", "ideal", "peak"):
        assert word in result.stdout, word
