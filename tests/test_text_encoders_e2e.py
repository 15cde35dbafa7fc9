"""End to end through `python -m lidit_jax.main` with other prompt encoders than the default:
the demo config (tiny overrides) encodes, trains 10 steps and samples."""
import json
import math
import os
import re

import pytest

from tests.test_train_loop import TINY, run_main

pytestmark = pytest.mark.slow  # ~90 s per run on two shared CPU cores (mostly compilation).
STEPS = 10


def encode_train_sample(workdir, *overrides):
    args = (*TINY, *overrides, f"--config.train.steps={STEPS}",
            f"--config.train.sample_every={STEPS}", f"--config.checkpoint.every={STEPS}")
    result = run_main(workdir, "encode", *args)
    assert re.search(r"records=64 written=64", result.stdout), result.stdout
    run_main(workdir, "train", *args)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f]
    assert losses and all(math.isfinite(loss) for loss in losses)
    assert os.listdir(os.path.join(workdir, "samples")) == [f"step_{STEPS:07d}.png"]


def test_demo_trains_with_minilm(tmp_path):
    encode_train_sample(tmp_path / "minilm", "--config.text.encoders=minilm")
    with open(tmp_path / "minilm" / "text_cache" / "minilm" / "metadata.json") as f:
        assert json.load(f)["llm"].startswith("bert:")
