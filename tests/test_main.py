"""The entry point's contract: config overrides, bad keys and unknown modes."""
import re
import subprocess
import sys

import pytest

from train_helpers import ROOT, child_env


def run_main(*args, libtpu=False):
    return subprocess.run([sys.executable, "-m", "lidit_jax.main", *args], cwd=ROOT,
                          env=child_env(libtpu), capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("override,expected", [
    ("--config.no_such_key=1", "unknown config key 'no_such_key'"),
    ("--config.train.setps=1", "did you mean 'train.steps'"),
])
def test_bad_override_exits_nonzero_naming_the_key(override, expected, tmp_path):
    result = run_main("--config=configs/lidit_1b.py", f"--workdir={tmp_path}", "--mode=describe",
                      override)
    assert result.returncode != 0
    assert expected in result.stderr


def test_unknown_mode_names_the_known_ones(tmp_path):
    result = run_main("--config=configs/lidit_1b.py", f"--workdir={tmp_path}", "--mode=bogus")
    assert result.returncode != 0
    assert "known modes:" in result.stderr and "train" in result.stderr


def test_invalid_value_is_refused_before_building(tmp_path):
    result = run_main("--config=configs/lidit_1b.py", f"--workdir={tmp_path}", "--mode=describe",
                      "--config.diffusion.objective=score")
    assert result.returncode != 0
    assert "diffusion.objective='score'" in result.stderr


# 25 d^2 per block (diffusion/dit.py): the size the paper's names round to.
@pytest.mark.parametrize("config,block_arithmetic", [("lidit_1b", 0.93e9), ("lidit_10b", 9.5e9)])
def test_describe_ends_with_the_parameter_counts(config, block_arithmetic):
    # The contract: no --workdir needed, nothing allocated, the last two lines are the counts.
    result = run_main(f"--config=configs/{config}.py", "--mode=describe")
    assert result.returncode == 0, result.stderr[-2000:]
    last_two = result.stdout.strip().splitlines()[-2:]
    assert [line.split("=")[0] for line in last_two] == ["dit_params", "refiner_params"]
    dit_params, refiner_params = (int(line.split("=")[1]) for line in last_two)
    assert abs(dit_params / block_arithmetic - 1) <= 0.05
    assert refiner_params > 0


@pytest.mark.slow
def test_compile_mode_reports_per_chip_memory_for_a_tpu_topology():
    # libtpu compiles for a v5e 2x2 slice on this CPU host: real per-chip memory, no TPU.
    # Unscanned layers: the step's own executable is loop-free, so the report needs no twins
    # (test_aot checks the scanned step's loop counting, on the whole demo step). Two layers:
    # the CLI's contract is the same, and the compile shorter (docs/performance.md).
    result = run_main("--config=configs/demo_shapes.py", "--mode=compile",
                      "--config.aot.topology=v5e:2x2", "--config.text.llms.smollm2.width=576",
                      "--config.mesh.data=2", "--config.mesh.fsdp=2",
                      "--config.model.scan_layers=False", "--config.model.depth=2",
                      libtpu=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "topology=v5e:2x2 slices=1 chips=4 kind=TPU v5 lite" in result.stdout
    memory = re.search(r"per_chip_memory_gib=([0-9.]+) .* hbm_gib=16\.0", result.stdout)
    assert memory and 0 < float(memory.group(1)) < 16
    assert "fits=True" in result.stdout
