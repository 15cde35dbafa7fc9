"""`--mode=encode`: run the frozen encoders once over the data set, so training never does.

  python -m lidit_jax.main --config=configs/demo_shapes.py --workdir=DIR --mode=encode
Fills `text.cache_dir` (one cache per LLM of `text.encoders`, plus the empty prompt and the
fixed prompts that training encodes at start: `fixed_prompts`) from the captions of
`config.data`, and, when `vae.latent_cache_dir` is set, the latent cache from its
images (`lidit_jax/diffusion/latent_cache.py`). Resumable: run it again after a kill and it
continues with the first incomplete shard. On several hosts each process encodes its own shards
(shard k goes to process k mod process_count). Prints one line per cache:
`text_cache=<dir> records=<int> written=<int>` and `latent_cache=<dir> records=<int> written=<int>`,
and `image_sizes=<file>` when it wrote a record set's image sizes (`data/image_sizes.py`).

Captions are encoded in batches of about one token count (sorted within windows), records are
read and tokenized or decoded in a thread ahead of the device and the results fetched and written
in another behind it, and the VAE's batches are sharded over all of the host's chips
(`data/encode_order.py`; measured in docs/data.md).
"""
import jax
import tqdm
from absl import logging

from lidit_jax.data import array_cache, image_sizes, pipeline
from lidit_jax.diffusion import latent_cache
from lidit_jax.diffusion.vae import make_image_space
from lidit_jax.text import cache as text_cache
from lidit_jax.text import features
from lidit_jax.text.encoder import PromptEncoder
from lidit_jax.train import during_training, sampling

NEEDS_WORKDIR = True
ENCODE_BATCH_SIZE = 64


def run(config, workdir):
    if not config.text.cache_dir and not config.vae.latent_cache_dir:
        raise SystemExit("error: nothing to encode: set text.cache_dir and/or "
                         "vae.latent_cache_dir (or train with online encoding)")
    source = pipeline.make_source(config.data)
    sizes = image_sizes.EncodedSizes(source, jax.process_index(), jax.process_count())
    if config.text.cache_dir:
        _encode_text(config, workdir, source, sizes)
    if config.vae.latent_cache_dir:
        _encode_latents(config, workdir, source, sizes)
    written = sizes.publish(array_cache.SHARD_SIZE)
    if written is not None:
        print(f"image_sizes={written}")


def _progress(total, desc):
    return tqdm.tqdm(total=total, desc=desc, disable=jax.process_index() != 0)


def fixed_prompts(config):
    """Every prompt a training run of `config` encodes at start, once each: the sampler's and
    the evaluation's (with the empty prompt). Training reads them from the text cache, so it
    never loads the LLMs."""
    return list(dict.fromkeys(sampling.fixed_prompts(config)
                              + during_training.fixed_prompts(config)))


def _encode_text(config, workdir, source, sizes):
    num_records = len(source)
    root = text_cache.cache_root(config, workdir)
    prompts = fixed_prompts(config)
    for name in features.encoder_names(config.text):
        encoder = PromptEncoder.from_config(config, name)
        logging.info("encoding %d captions and %d fixed prompts with %s (layer %s) into %s",
                     num_records, len(prompts), encoder.llm_name, encoder.layer, root)
        with _progress(num_records, f"encode {name}") as progress:
            written = text_cache.write_text_cache(
                encoder, config, workdir, sizes.caption, num_records, prompts=prompts,
                batch_size=ENCODE_BATCH_SIZE, process_index=jax.process_index(),
                process_count=jax.process_count(), progress=progress.update)
        print(f"text_cache={root / name} records={num_records} written={written}")


def _encode_latents(config, workdir, source, sizes):
    vae = make_image_space(config.vae)  # A VAE: validation refused a cache for pixel space.
    directory = array_cache.resolve(config.vae.latent_cache_dir, workdir)
    logging.info("encoding %d images with the VAE into %s", len(source), directory)
    with _progress(len(source), "encode latents") as progress:
        written = latent_cache.write_latent_cache(
            vae, config, workdir, source, batch_size=ENCODE_BATCH_SIZE,
            process_index=jax.process_index(), process_count=jax.process_count(),
            progress=progress.update, read=sizes.read)
    print(f"latent_cache={directory} records={len(source)} written={written}")
