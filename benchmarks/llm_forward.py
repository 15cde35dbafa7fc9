"""Encoder throughput: our jitted LLM vs transformers (PyTorch) on SmolLM2-135M, CPU, float32.

    python -m benchmarks.llm_forward [--smoke] [--batch 16] [--length 128] [--repeats 3]

Both run the same weights (the offline SmolLM2 GGUF, dequantized to float32) on the same random
right-padded batch and return all hidden states (what the text encoder needs; no logits). Each
runs in a process of its own, is warmed up once (our jit compiles there), then the two take
turns over `repeats` calls (benchmarks/timing.py); tokens/s counts every position of the
[batch, length] input. torch runs with as many threads as XLA:CPU uses (all cores).
"""
import argparse
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from benchmarks.timing import interleaved_seconds_apart, load_average  # noqa: E402
from lidit_jax.text.models import default_model_path  # noqa: E402


def random_batch(batch, length, vocab_size):
    """(ids [batch, length], mask [batch, length] int64): right-padded, lengths >= length/2."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab_size, (batch, length))
    lengths = rng.integers(length // 2, length + 1, batch)
    return ids, (np.arange(length)[None] < lengths[:, None]).astype(np.int64)


def ours_contender(batch, length):
    """benchmarks.timing factory: our hidden states of a random batch -> (run, {})."""
    import jax

    from lidit_jax.text import load_llm

    model = load_llm(default_model_path("smollm2"))
    ids, mask = random_batch(batch, length, model.config.vocab_size)
    return lambda: jax.block_until_ready(model.hidden_states(ids, mask)), {}


def transformers_contender(batch, length):
    """benchmarks.timing factory: transformers' hidden states of the same batch."""
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    path = default_model_path("smollm2")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).model.eval()
    ids, mask = map(torch.tensor, random_batch(batch, length, model.config.vocab_size))

    def run():
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, output_hidden_states=True)

    return run, {"torch_threads": torch.get_num_threads()}


def run(smoke=False, batch=16, length=128, repeats=3):
    if smoke:
        batch, length, repeats = 2, 16, 1
    load = load_average()
    shape = {"batch": batch, "length": length}
    seconds, info = interleaved_seconds_apart(
        {"ours": ("benchmarks.llm_forward:ours_contender", shape),
         "transformers": ("benchmarks.llm_forward:transformers_contender", shape)}, repeats)
    tokens = batch * length
    ours_rate, reference_rate = tokens / seconds["ours"], tokens / seconds["transformers"]
    return [{"model": "SmolLM2-135M", "dtype": "float32", "batch": batch, "length": length,
             "ours_tokens_per_s": ours_rate, "transformers_tokens_per_s": reference_rate,
             "ratio": ours_rate / reference_rate,
             "torch_threads": info["transformers"]["torch_threads"],
             "repeats": repeats, "load_average": load}]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="2 x 16 tokens, one repeat")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for record in run(args.smoke, args.batch, args.length, args.repeats):
        print(json.dumps(record))


if __name__ == "__main__":
    main()
