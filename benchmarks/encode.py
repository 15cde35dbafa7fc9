"""--mode=encode: the padding that length batching saves, and encode throughput.

    python -m benchmarks.encode padding [--batch 64]
    python -m benchmarks.encode throughput [--repeats 3] [--captions 192] [--batch 16]

padding: every prompt of GenEval, T2I-CompBench (8 categories) and DPG-Bench (4,018) in a
seeded random order (a data set's records are not grouped by length), tokenized under the
trainer's template (SmolLM2's chat template, the paper's instruction, text.max_length 256). For
batches of `batch` cut in that order (before) and sorted by token count within windows of 2, 4,
8, 16 batches (`encode_order.length_batches`): the share of the token slots the LLM's blocks
run that are padding (after the template prefix, which runs once, and padded to the length
bucket of the batch's longest, as `PromptEncoder.encode(crop_padding=True)` does).
throughput: `lidit_jax.encode.run` itself, in process, over a record set of the same prompts as
captions with PNG images of three aspect ratios: the text cache with SmolLM2-135M (float32,
layer -3), then the latent cache with a random 3-block diffusers VAE over three buckets;
`encode.ENCODE_BATCH_SIZE = batch`, 8 fake CPU devices as in the tests. One warm-up run, then
`repeats` runs into fresh caches; the median seconds. It uses only `encode.run` and
`encode.ENCODE_BATCH_SIZE`, so older code is measured by running this file with PYTHONPATH at
another tree.
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

MAX_LENGTH = 256  # lidit_1b's and lidit_10b's text.max_length.
IMAGE_SIZES = [(64, 64), (60, 100), (100, 60)]
BUCKETS = "64x64,48x96,96x48"


def real_prompts(seed=0):
    """The benchmark prompt files' 4,018 prompts in a seeded random order."""
    from lidit_jax.evaluate import benchmarks

    prompts = [p for _, p in benchmarks.geneval_prompts()]
    for category in benchmarks.T2I_COMPBENCH_CATEGORIES:
        prompts += benchmarks.t2i_compbench_prompts(category)
    prompts += [p for _, p in benchmarks.dpg_bench_prompts()]
    return [prompts[k] for k in np.random.default_rng(seed).permutation(len(prompts))]


def _text_config(config):
    config.text.max_length = MAX_LENGTH
    config.text.llms.smollm2.update(layer=-3, dtype="float32")
    return config


def padding(batch):
    from configs import common
    from lidit_jax.data import encode_order
    from lidit_jax.text.encoder import PromptEncoder
    from lidit_jax.text.in_step import length_bucket

    config = _text_config(common.get_config())
    encoder = PromptEncoder("smollm2", config.text.llms.smollm2, config.text)
    prompts = real_prompts()
    tokens = encoder.template.encode_batch(prompts)["mask"].sum(axis=1)
    prefix = 0 if getattr(encoder, "prefix_ids", None) is None else len(encoder.prefix_ids)
    lengths = tokens - prefix  # The blocks run after the prefix (computed once).
    bucket = lambda longest: length_bucket(longest, MAX_LENGTH - prefix)  # noqa: E731
    records = {"prompts": len(prompts), "batch": batch, "prefix_tokens": prefix,
               "mean_tokens_after_prefix": round(float(lengths.mean()), 1)}
    indices = np.arange(len(prompts))
    for window_batches in (1, 2, 4, 8, 16):  # A window of one batch: no reordering (before).
        window = window_batches * batch
        batches = [b for start in range(0, len(indices), window)
                   for b in encode_order.length_batches(indices[start:start + window],
                                                        lengths[start:start + window], batch)]
        fraction = encode_order.padding_fraction([lengths[b].tolist() for b in batches], bucket)
        records[f"padding_window_{window_batches}"] = round(fraction, 4)
    return records


def _record_set(folder, prompts):
    from lidit_jax.data import records

    def entry(i):
        height, width = IMAGE_SIZES[i % 3]
        pixels = np.random.default_rng(i).integers(0, 256, (height, width, 3), np.uint8)
        return records.encode_record(records.encode_image(pixels, "png"), prompts[i])
    records.write_records(folder, len(prompts), entry, records_per_shard=64)


def _vae(folder):
    import diffusers
    import torch

    torch.manual_seed(0)
    diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8,
        latent_channels=4).save_pretrained(folder, safe_serialization=True)


def throughput(repeats, captions, batch):
    from configs import common
    from lidit_jax import encode

    encode.ENCODE_BATCH_SIZE = batch
    root = tempfile.mkdtemp(prefix="bench_encode_")
    _record_set(f"{root}/records", real_prompts()[:captions])
    _vae(f"{root}/vae")
    seconds = {"text": [], "latents": []}
    for run in range(repeats + 1):  # Run 0 warms up (compiles).
        config = _text_config(common.get_config())
        config.data.update(source="arrayrecord", path=f"{root}/records", image_size=64,
                           buckets=BUCKETS, caption_dropout=0.0)
        config.train.sample_prompts, config.eval.num_prompts = (), 0
        config.text.cache_dir = f"{root}/text{run}"
        start = time.perf_counter()
        encode.run(config, root)
        text = time.perf_counter() - start
        config.text.cache_dir = ""
        config.vae.update(path=f"{root}/vae", latent_channels=4, downsample=4,
                          latent_cache_dir=f"{root}/latents{run}")
        start = time.perf_counter()
        encode.run(config, root)
        if run:
            seconds["text"].append(text)
            seconds["latents"].append(time.perf_counter() - start)
    shutil.rmtree(root)
    text, latents = (statistics.median(seconds[k]) for k in ("text", "latents"))
    return {"captions": captions, "batch": batch, "repeats": repeats,
            "text_seconds": [round(s, 2) for s in seconds["text"]],
            "latent_seconds": [round(s, 2) for s in seconds["latents"]],
            "captions_per_s": round(captions / text, 2),
            "images_per_s": round(captions / latents, 2),
            "load_average": os.getloadavg()[0], "code": os.path.dirname(encode.__file__)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("padding", "throughput"))
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--captions", type=int, default=192)
    args = parser.parse_args()
    if args.what == "padding":
        record = padding(args.batch or 64)
    else:
        record = throughput(args.repeats, args.captions, args.batch or 16)
    print(json.dumps(record))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
