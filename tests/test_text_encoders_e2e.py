"""End to end through `python -m lidit_jax.main` with other prompt encoders than the default:
the demo config (tiny overrides) encodes, trains 10 steps and samples."""
import json
import math
import os
import re

import pytest

from train_helpers import TINY, run_main

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


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    """A random gated-GELU T5 encoder (2 layers, width 32) with MiniLM's WordPiece tokenizer: the
    T5 code path end to end without a T5 tokenizer offline."""
    import torch
    import transformers

    from lidit_jax.text.models import default_model_path

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(default_model_path("minilm")))
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_t5")
    transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu")).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_demo_trains_with_a_t5_encoder(tiny_t5, tmp_path):
    encode_train_sample(tmp_path / "t5", "--config.text.encoders=t5",
                        f"--config.text.llms.t5.path={tiny_t5}", "--config.text.llms.t5.width=32")


@pytest.mark.parametrize("layer", ["all_norm_avg", "[-1,-3]"])
def test_demo_trains_with_smollm2_multi_layer_features(layer, tmp_path):
    encode_train_sample(tmp_path / "run", f"--config.text.llms.smollm2.layer={layer}")
    with open(tmp_path / "run" / "text_cache" / "smollm2" / "metadata.json") as f:
        recorded = json.load(f)["layer"]
    assert recorded == ("all_norm_avg" if layer == "all_norm_avg" else
                        {"layer": [-1, -3], "layer_combine": "concat"})
