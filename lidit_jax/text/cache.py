"""The text-state cache: the frozen LLMs run once over a data set's captions, never in training.

One directory per LLM under `text.cache_dir` (relative paths are inside the workdir):
  <cache_dir>/<llm name>/           records 0..N-1: one example's {"states", "prompt_mask"}
                                    (train/inputs.py's convention) cut to its real tokens:
                                    states bf16 [length, width], prompt_mask bool [length]
  <cache_dir>/<llm name>/empty/     the empty prompt (the unconditional branch of guidance and
                                    the caption-dropout target), encoded once
  <cache_dir>/<llm name>/prompts/   the fixed prompts a training run encodes at start (samples,
                                    evals, the empty prompt), listed by text in its metadata
All are `lidit_jax.data.array_cache` directories, whose metadata.json records the LLM id and
weights fingerprint, layer, final norm, template and the data set; a config that differs in any
of these is refused with the field that differs. A fixed prompt missing from prompts/ (prompts
changed after encoding, or a cache made before prompts/ existed) is encoded by the LLM instead,
whose weights then load: a warning says so.

Reading pads every [length] array with zeros to text.max_length and sets the mask to the first
`length` tokens (the cache needs text.padding_side='right'): no other conversion. The metadata's
"text_cache_format" is `FORMAT` (`FORMAT_METADATA`); format 1 (before it was recorded) stored
the prompt as a span [start, stop) and is refused with a request to encode again.
"""
import copy
import json

import numpy as np
from absl import logging

from lidit_jax.data import array_cache, encode_order, pipeline

PROMPTS_DIR = "prompts"
# Of a record: 2 stores {"states", "prompt_mask"}; 1 (no "text_cache_format" in the metadata)
# stored a "prompt_span" instead of the prompt mask. Every text cache's metadata holds it.
FORMAT = 2
FORMAT_METADATA = {"text_cache_format": FORMAT}
# Batches per window whose captions are sorted by token count: see docs/data.md's
# padding fractions by window (python -m benchmarks.encode).
WINDOW_BATCHES = 16


def cache_root(config, workdir):
    return array_cache.resolve(config.text.cache_dir, workdir)


def expected_metadata(encoder, config, num_records):
    """What a cache for this encoder, template and data set must record."""
    return dict(encoder.metadata(), max_length=config.text.max_length,
                data=pipeline.source_identity(config.data, num_records), **FORMAT_METADATA)


def check_format(metadata, directory):
    """Refuses a text cache whose records are not of `FORMAT`, naming the fix."""
    found = metadata.get("text_cache_format", 1)
    if found != FORMAT:
        raise array_cache.CacheMismatch(
            f"the text cache {directory} has records of format {found} (1: prompt spans), this "
            f"version reads format {FORMAT} (prompt masks): run --mode=encode again with a new "
            "text.cache_dir (or delete this one)")


def _entries(encoded):
    """`encoder.encode(..., crop_padding=True)`'s output -> the cache's records (host numpy):
    each example's states and prompt mask cut to its real tokens (the first ones: right
    padding)."""
    states, masks, prompt_masks = (np.asarray(encoded[k])
                                   for k in ("states", "mask", "prompt_mask"))
    return [{"states": s[:n], "prompt_mask": p[:n]}
            for s, p, n in zip(states, prompt_masks, masks.sum(axis=1))]


def _padded(record, max_length):
    """A record (cut to its real tokens) -> one example's {"states", "mask", "prompt_mask"} of
    [max_length, ...] (host numpy), zeros after the real tokens."""
    length = record["states"].shape[0]

    def pad(x):
        return np.pad(x, [(0, max_length - length)] + [(0, 0)] * (x.ndim - 1))

    return {"states": pad(record["states"]), "mask": np.arange(max_length) < length,
            "prompt_mask": pad(record["prompt_mask"])}


def _encode_to_entries(encoder, captions):
    return _entries(encoder.encode(captions, crop_padding=True))


def length_sorted_stages(encoder, caption_of, batch_size, window_batches=WINDOW_BATCHES):
    """The caption encoder as `encode_order.Stages`: a reader thread reads a window of
    `window_batches` batches of captions and sorts them by token count, the caller's thread
    dispatches each batch to the LLM, a writer thread fetches and trims its states."""
    # The reader's own tokenizer: a Hugging Face fast tokenizer refuses calls from two threads
    # at once ("Already borrowed"), and the caller's thread tokenizes in `encode`.
    template = copy.deepcopy(encoder.template)

    def prepare(indices):
        captions = dict(zip(indices, encode_order.read_all(caption_of, indices)))
        lengths = template.encode_batch([captions[i] for i in indices])["mask"].sum(1)
        return [(batch, [captions[i] for i in batch])
                for batch in encode_order.length_batches(indices, lengths, batch_size)]

    return encode_order.Stages(
        prepare=prepare, compute=lambda captions: encoder.encode(captions, crop_padding=True),
        finish=lambda indices, encoded: _entries(encoded), window=window_batches * batch_size)


def write_text_cache(encoder, config, workdir, caption_of, num_records, *, prompts=(),
                     batch_size=64, process_index=0, process_count=1, progress=None):
    """Encodes captions 0..num_records-1 (`caption_of(i)` -> str, called from reader threads),
    the empty prompt and the fixed `prompts` (process 0 writes these two), in batches of
    captions of about the same token count (`length_sorted_stages`).

    Resumable: complete shards are kept, so a killed run continues where it stopped.
    Returns the number of records written by this process.
    """
    if config.text.padding_side != "right":
        raise ValueError("the text cache stores real tokens first: set text.padding_side=right")
    directory = cache_root(config, workdir) / encoder.name
    metadata_path = directory / array_cache.METADATA_FILE
    if metadata_path.exists():  # Resuming: refuse an old format before comparing the rest.
        check_format(json.loads(metadata_path.read_text()), directory)
    metadata = expected_metadata(encoder, config, num_records)
    if process_index == 0:
        array_cache.write_cache(directory / "empty", 1,
                                lambda _: _encode_to_entries(encoder, [""]), metadata)
        if prompts:
            _write_prompts(encoder, directory / PROMPTS_DIR, _identity(metadata), prompts)
    return array_cache.write_cache(directory, num_records,
                                   length_sorted_stages(encoder, caption_of, batch_size), metadata,
                                   batch_size=batch_size, process_index=process_index,
                                   process_count=process_count, progress=progress)


def _identity(metadata):
    """The fields of `expected_metadata` that fixed prompts depend on (not the data set)."""
    return {k: v for k, v in metadata.items() if k != "data"}


def _write_prompts(encoder, directory, identity, prompts):
    """The fixed prompts' store; rewritten whole (it is small) when the prompts changed."""
    prompts = list(dict.fromkeys(prompts))
    metadata_path = directory / array_cache.METADATA_FILE
    if (metadata_path.exists()
            and json.loads(metadata_path.read_text()).get("prompts") != prompts):
        logging.info("the fixed prompts changed since %s was written: writing it again",
                     directory)
        directory.rmtree()
    array_cache.write_cache(
        directory, len(prompts),
        lambda indices: _encode_to_entries(encoder, [prompts[i] for i in indices]),
        dict(identity, prompts=prompts))


class CachedTextStates:
    """Reads one LLM's cache: record ids (and dropped captions) -> fixed-length numpy arrays."""

    def __init__(self, directory, max_length, expected=None):
        self.cache = array_cache.ArrayCache(directory)
        check_format(self.cache.metadata, self.cache.directory)
        self.empty = array_cache.ArrayCache(self.cache.directory / "empty")
        if expected is not None:
            self.cache.check(expected)
        self.max_length = max_length
        self._empty_entry = _padded(self.empty[0], max_length)
        self._prompts, self._prompt_index = None, {}
        if (self.cache.directory / PROMPTS_DIR / array_cache.METADATA_FILE).exists():
            self._prompts = array_cache.ArrayCache(self.cache.directory / PROMPTS_DIR)
            if expected is not None:
                self._prompts.check(_identity(expected))
            self._prompt_index = {p: i for i, p in enumerate(self._prompts.metadata["prompts"])}

    @property
    def metadata(self):
        return self.cache.metadata

    @property
    def width(self):
        return int(self._empty_entry["states"].shape[-1])

    def entry(self, record_id, use_empty):
        """One record -> dict(states [L, w], mask [L], prompt_mask [L]), padded to max_length."""
        return (self._empty_entry if use_empty
                else _padded(self.cache[int(record_id)], self.max_length))

    def lookup(self, record_ids, use_empty):
        """record_ids [b] int, use_empty [b] bool -> dict(states [b, L, w], mask, prompt_mask)."""
        return _stack([self.entry(i, empty) for i, empty in zip(record_ids, use_empty)])

    def fixed_prompts(self, prompts):
        """Fixed prompts (list of str) -> dict(states [b, L, w], mask, prompt_mask) from
        prompts/, or None, with a warning, when any of them is not there: the caller then
        encodes them with the LLM."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_index]
        if missing:
            logging.warning(
                "%d of %d fixed prompts (e.g. %r) are not in the text cache %s: the LLM encodes "
                "them instead, loading its weights; run --mode=encode again to store them",
                len(missing), len(prompts), missing[0], self.cache.directory / PROMPTS_DIR)
            return None
        entries = [_padded(self._prompts[self._prompt_index[p]], self.max_length)
                   for p in prompts]
        return _stack(entries)


class CachedTextFields:
    """The input pipeline's `record_transform` with the text cache: (record id, caption dropped)
    -> {"text": [entry per LLM]} (`CachedTextStates.entry`), which the Grain workers stack
    into the batch's "text" as the train step takes it (train/inputs.py). Running in those
    workers, the lookups, padding and stacking (~1 GiB a step per host at scale) stay out of
    the training process; each worker opens its own shards."""

    def __init__(self, readers):
        self.readers = list(readers)

    def __call__(self, record_id, caption_dropped):
        return {"text": [reader.entry(record_id, caption_dropped) for reader in self.readers]}


def _stack(entries):
    """Padded entries (dicts of [L, ...] arrays) -> dict(states [b, L, w], mask, prompt_mask)."""
    return {k: np.stack([e[k] for e in entries]) for k in ("states", "mask", "prompt_mask")}
