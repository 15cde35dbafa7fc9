"""The text-state cache: the frozen LLMs run once over a data set's captions, never in training.

One directory per LLM under `text.cache_dir` (relative paths are inside the workdir):
  <cache_dir>/<llm name>/           records 0..N-1: the chosen layer's states for the real tokens
                                    (bf16 [length, width]) and the prompt span [start, stop)
  <cache_dir>/<llm name>/empty/     the empty prompt (the unconditional branch of guidance and
                                    the caption-dropout target), encoded once
Both are `lidit_jax.data.array_cache` directories, whose metadata.json records the LLM id and
weights fingerprint, layer, final norm, template and the data set; a config that differs in any
of these is refused with the field that differs.
"""
import numpy as np

from lidit_jax.data import array_cache, pipeline
from lidit_jax.text.encoder import pad_entry, trim_entry


def cache_root(config, workdir):
    return array_cache.resolve(config.text.cache_dir, workdir)


def expected_metadata(encoder, config, num_records):
    """What a cache for this encoder, template and data set must record."""
    return dict(encoder.metadata(), max_length=config.text.max_length,
                data=pipeline.source_identity(config.data, num_records))


def _encode_to_entries(encoder, captions):
    encoded = encoder.encode(captions, crop_padding=True)
    states, masks, prompt_masks = (np.asarray(encoded[k]) for k in ("states", "mask", "prompt_mask"))
    return [trim_entry(s, m, p) for s, m, p in zip(states, masks, prompt_masks)]


def write_text_cache(encoder, config, workdir, caption_of, num_records, *, batch_size=64,
                     process_index=0, process_count=1, progress=None):
    """Encodes captions 0..num_records-1 (`caption_of(i)` -> str) and the empty prompt.

    Resumable: complete shards are kept, so a killed run continues where it stopped.
    Returns the number of records written by this process.
    """
    if config.text.padding_side != "right":
        raise ValueError("the text cache stores real tokens first: set text.padding_side=right")
    directory = cache_root(config, workdir) / encoder.name
    metadata = expected_metadata(encoder, config, num_records)
    encode_batch = lambda indices: _encode_to_entries(encoder, [caption_of(i) for i in indices])  # noqa: E731
    if process_index == 0:
        array_cache.write_cache(directory / "empty", 1,
                                lambda _: _encode_to_entries(encoder, [""]), metadata)
    return array_cache.write_cache(directory, num_records, encode_batch, metadata,
                                   batch_size=batch_size, process_index=process_index,
                                   process_count=process_count, progress=progress)


class CachedTextStates:
    """Reads one LLM's cache: record ids (and dropped captions) -> fixed-length numpy arrays."""

    def __init__(self, directory, max_length, expected=None):
        self.cache = array_cache.ArrayCache(directory)
        self.empty = array_cache.ArrayCache(self.cache.directory / "empty")
        if expected is not None:
            self.cache.check(expected)
        self.max_length = max_length
        self._empty_entry = pad_entry(self.empty[0], max_length)

    @property
    def metadata(self):
        return self.cache.metadata

    @property
    def width(self):
        return int(self._empty_entry["states"].shape[-1])

    def lookup(self, record_ids, use_empty):
        """record_ids [b] int, use_empty [b] bool -> dict(states [b, L, w], mask, prompt_mask)."""
        entries = [self._empty_entry if empty else pad_entry(self.cache[int(i)], self.max_length)
                   for i, empty in zip(record_ids, use_empty)]
        return {k: np.stack([e[k] for e in entries]) for k in ("states", "mask", "prompt_mask")}

    def empty_prompt(self):
        """The empty prompt's arrays with a batch axis of 1."""
        return {k: v[None] for k, v in self._empty_entry.items()}
