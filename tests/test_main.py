"""The entry point's contract: config overrides, bad keys and unknown modes."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "lidit_jax.main", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


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
