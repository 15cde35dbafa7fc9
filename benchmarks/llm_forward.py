"""Encoder throughput: our jitted LLM vs transformers (PyTorch) on SmolLM2-135M, CPU, float32.

    python -m benchmarks.llm_forward [--smoke] [--batch 16] [--length 128] [--repeats 3]

Two comparisons, each on the same weights (the offline SmolLM2 GGUF, dequantized to float32):
- raw forward: the same random right-padded [batch, length] batch, all hidden states out (no
  logits); tokens/s counts every position.
- the encoder task as the trainer runs it: `batch` real captions (T2I-CompBench colour
  prompts) under the paper's instruction and SmolLM2's chat template at the paper configs'
  `text.max_length` (256), the state of layer -3 out. Ours is `PromptEncoder.encode` with
  `crop_padding` (`text/in_step.py`: the template prefix's keys and values computed once, the
  length bucket of the longest caption after it, only the layers layer -3 needs), and again
  without the prefix reuse (`ours_full_forward`: the bucket over the whole sequence, as before
  it); transformers gets the same token ids padded to max_length, as a plain encoder pipeline
  pads, and (`transformers_longest`) cut to the batch's longest sequence, as a pipeline that
  pads per batch does; hidden_states[-3] out. prompts/s; ratios are transformers' seconds over
  ours.
Each contender runs in a process of its own (all in one with --smoke), is warmed up once (our
jit compiles there), then they take turns over `repeats` calls (benchmarks/timing.py). torch
runs with as many threads as XLA:CPU uses (all cores).
"""
import argparse
import functools
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


TASK_MAX_LENGTH = 256  # lidit_1b's and lidit_10b's text.max_length.
TASK_LAYER = -3


def task_encoder():
    """The trainer's PromptEncoder for SmolLM2 with the paper's instruction and chat template."""
    from configs import common
    from lidit_jax.text.encoder import PromptEncoder

    config = common.get_config()
    config.text.max_length = TASK_MAX_LENGTH
    config.text.llms.smollm2.update(layer=TASK_LAYER, dtype="float32")
    return PromptEncoder.from_config(config, "smollm2")


def task_prompts(batch):
    from lidit_jax.evaluate.benchmarks import t2i_compbench_prompts
    return [p for p in t2i_compbench_prompts("color")][:batch]


def ours_task_contender(batch, length, prefix_reuse=True):
    """The encoder task as the trainer runs it (module docstring); prefix_reuse=False: every
    caption runs the full forward (no shared prefix found)."""
    import jax
    del length
    encoder, prompts = task_encoder(), task_prompts(batch)
    if not prefix_reuse:
        encoder.prefix_ids = None
    tokens = encoder.tokenize(prompts)
    bucket = int(encoder.encode(prompts, crop_padding=True)["states"].shape[1])
    return (lambda: jax.block_until_ready(encoder.encode(prompts, crop_padding=True)["states"]),
            {"real_tokens": int(tokens["mask"].sum()), "bucket": bucket,
             "prefix": 0 if encoder.prefix_ids is None else len(encoder.prefix_ids)})


def transformers_task_contender(batch, length, longest=False):
    """The same token ids at max_length (longest=True: cut to the longest sequence) through
    transformers, hidden_states[-3] out."""
    import torch
    del length
    model = _transformers_model()
    encoder = task_encoder()
    tokens = encoder.tokenize(task_prompts(batch))
    if longest:
        tokens = encoder.crop(tokens, encoder.longest_sequence(tokens))
    ids, mask = (torch.tensor(tokens[k]).long() for k in ("input_ids", "mask"))

    def run():
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, output_hidden_states=True)[
                "hidden_states"][TASK_LAYER]

    return run, {"torch_threads": torch.get_num_threads()}


@functools.cache  # One load per process: a smoke run builds every contender in one.
def _transformers_model():
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    path = default_model_path("smollm2")
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).model.eval()


def transformers_contender(batch, length):
    """benchmarks.timing factory: transformers' hidden states of the same batch."""
    import torch

    model = _transformers_model()
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
         "transformers": ("benchmarks.llm_forward:transformers_contender", shape)}, repeats,
        smoke=smoke)
    tokens = batch * length
    ours_rate, reference_rate = tokens / seconds["ours"], tokens / seconds["transformers"]
    raw = {"task": "raw forward, all hidden states", "model": "SmolLM2-135M", "dtype": "float32",
           "batch": batch, "length": length, "ours_tokens_per_s": ours_rate,
           "transformers_tokens_per_s": reference_rate, "ratio": ours_rate / reference_rate,
           "torch_threads": info["transformers"]["torch_threads"], "repeats": repeats,
           "load_average": load}
    task_factory = "benchmarks.llm_forward:{}_task_contender".format
    seconds, info = interleaved_seconds_apart(
        {"ours": (task_factory("ours"), shape),
         "ours_full_forward": (task_factory("ours"), dict(shape, prefix_reuse=False)),
         "transformers": (task_factory("transformers"), shape),
         "transformers_longest": (task_factory("transformers"), dict(shape, longest=True))},
        repeats, smoke=smoke)
    task = {"task": f"encoder task: captions + instruction + chat template, layer {TASK_LAYER}",
            "model": "SmolLM2-135M", "dtype": "float32", "prompts": batch,
            "max_length": TASK_MAX_LENGTH, "ours_length": info["ours"]["bucket"],
            "prefix": info["ours"]["prefix"],
            "full_forward_length": info["ours_full_forward"]["bucket"],
            "real_tokens": info["ours"]["real_tokens"],
            **{f"{name}_prompts_per_s": batch / s for name, s in seconds.items()},
            "ratio": seconds["transformers"] / seconds["ours"],
            "ratio_full_forward": seconds["transformers"] / seconds["ours_full_forward"],
            "ratio_vs_longest": seconds["transformers_longest"] / seconds["ours"],
            "repeats": repeats, "load_average": load_average()}
    return [raw, task]


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
