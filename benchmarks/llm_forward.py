"""Encoder throughput: our jitted LLM vs transformers (PyTorch) on SmolLM2-135M, CPU, float32.

    JAX_PLATFORMS=cpu python benchmarks/llm_forward.py [--batch 16] [--length 128] [--repeats 3]

Both run the same weights (the offline SmolLM2 GGUF, dequantized to float32) on the same random
right-padded batch and return all hidden states (what the text encoder needs; no logits). Each is
warmed up once (our jit compiles there), then timed over `repeats` calls; tokens/s counts every
position of the [batch, length] input. Prints both rates and ours / transformers.
"""
import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from lidit_jax.text import load_llm  # noqa: E402
from lidit_jax.text.models import default_model_path  # noqa: E402


def best_seconds(fn, repeats):
    fn()  # Warm-up (compilation for ours, allocator and thread pools for both).
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    path = default_model_path("smollm2")
    ours = load_llm(path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).model.eval()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, ours.config.vocab_size, (args.batch, args.length))
    lengths = rng.integers(args.length // 2, args.length + 1, args.batch)
    mask = (np.arange(args.length)[None] < lengths[:, None]).astype(np.int64)
    ids_t, mask_t = torch.tensor(ids), torch.tensor(mask)

    def run_ours():
        jax.block_until_ready(ours.hidden_states(ids, mask))

    def run_reference():
        with torch.no_grad():
            reference(input_ids=ids_t, attention_mask=mask_t, output_hidden_states=True)

    tokens = args.batch * args.length
    ours_rate = tokens / best_seconds(run_ours, args.repeats)
    reference_rate = tokens / best_seconds(run_reference, args.repeats)
    print(f"SmolLM2-135M fp32, batch {args.batch} x {args.length} tokens, "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    print(f"lidit_jax:    {ours_rate:9.1f} tokens/s")
    print(f"transformers: {reference_rate:9.1f} tokens/s")
    print(f"ratio (ours / transformers): {ours_rate / reference_rate:.2f}")


if __name__ == "__main__":
    main()
