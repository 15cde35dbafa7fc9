"""What the train step eats: global batches of images (or latents) and LLM text states.

`TrainInputs` owns the input pipeline, the frozen text encoders (or their cache) and the image
space (pixels, a VAE, or the VAE's latent cache), and turns each host-local batch into global
arrays sharded along the `batch` logical axis, in a background thread a few batches ahead of the
train loop (data.device_prefetch). The batch contract, which `--mode=compile` also lowers the
step for (`abstract_batch`) and `random_batch` fills:
  {"x0": [batch, H, W, C] float32 (scaled latents or pixels in [-1, 1]),
   "text": [one dict per encoder, in `features.encoder_names` order]}
The text-state convention: each encoder's dict is
  {"states": [batch, L, width_k] bf16 (attention_pool: [batch, L, layers, width_k]),
   "mask": [batch, L] bool (True on real tokens),
   "prompt_mask": [batch, L] bool (True on the caption's own tokens, inside the template's)}
with the text cache (text.cache_dir set). Without it the LLMs run inside the train step
(text/in_step.py): the dict carries "input_ids" [batch, L] int32 in place of "states", L being
the template's shared prefix plus a bucket of the global batch's longest sequence after it
(`PromptEncoder.bucket`), not text.max_length: a few step shapes per run, each compiled once.
Everything that makes or reads text states uses these keys: the same dict without the batch
axis is one example (`text.cache.CachedTextStates.entry`), `PromptEncoder.tokenize` / `encode`
and `PromptTemplate.encode_batch` return one encoder's dict, `in_step.TextEncoders` turns the
token dicts into state dicts, and the Grain workers stack the examples' list of dicts into the
batch's, so a dict is never renamed or regrouped on its way. The per-encoder dict is the unit
(rather than one dict of per-encoder lists) because every producer makes one encoder's arrays
and every consumer (the refiners, the in-step encoders) walks the encoders one by one.
"""
import queue
import threading
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from lidit_jax.data import array_cache, pipeline
from lidit_jax.diffusion import latent_cache
from lidit_jax.diffusion.vae import make_image_space
from lidit_jax.parallel import sharding
from lidit_jax.text import cache as text_cache
from lidit_jax.text import features
from lidit_jax.text.encoder import PromptEncoder
from lidit_jax.text.in_step import STATE_DTYPE, TextEncoders
from lidit_jax.train.checkpoint import encoder_fingerprints


def abstract_batch(config, mesh, state_shapes, channels, image_hw):
    """ShapeDtypeStructs, with their shardings, of one global training batch (see above); token
    ids of text.max_length (the longest bucket) when text.cache_dir is empty.

    state_shapes: per encoder, the trailing shape of its states after [batch, L]: (width,), or
    (num_layers + 1, width) for layer="attention_pool" (text/features.py).
    """
    batch_spec = sharding.logical_to_mesh_spec(("batch",), config.mesh.rules)

    def on_batch(shape, dtype):
        spec = PartitionSpec(*batch_spec, *([None] * (len(shape) - 1)))
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

    batch, text_len = config.train.batch_size, config.text.max_length

    def encoder_inputs(state_shape):
        inputs = {"mask": on_batch((batch, text_len), jnp.bool_),
                  "prompt_mask": on_batch((batch, text_len), jnp.bool_)}
        if config.text.cache_dir:
            inputs["states"] = on_batch((batch, text_len, *state_shape), STATE_DTYPE)
        else:
            inputs["input_ids"] = on_batch((batch, text_len), jnp.int32)
        return inputs

    return {"x0": on_batch((batch, *image_hw, channels), jnp.float32),
            "text": [encoder_inputs(shape) for shape in state_shapes]}


def random_batch(abstract, seed=0, vocab_size=1000):
    """Random values of `abstract_batch`'s shapes, dtypes and shardings: the batch of benchmarks
    and tests. x0 and text states standard normal; each row's text mask a random length of at
    least a quarter of the sequence, its prompt mask the same after 4 instruction tokens; token
    ids below `vocab_size`. (Single-process: the arrays are placed from this host.)"""
    rng = np.random.default_rng(seed)
    batch_size, length = abstract["text"][0]["mask"].shape
    lengths = rng.integers(max(length // 4, 1), length + 1, size=batch_size)
    mask = np.arange(length)[None] < lengths[:, None]
    prompt_mask = mask & (np.arange(length)[None] >= min(4, length - 1))

    def fill(leaf, value):
        return jax.device_put(np.asarray(value, leaf.dtype), leaf.sharding)

    def values(key, leaf):
        if key == "states":
            return rng.normal(size=leaf.shape)
        if key == "input_ids":
            return rng.integers(0, vocab_size, size=leaf.shape)
        return {"mask": mask, "prompt_mask": prompt_mask}[key]

    return {"x0": fill(abstract["x0"], rng.normal(size=abstract["x0"].shape)),
            "text": [{k: fill(leaf, values(k, leaf)) for k, leaf in inputs.items()}
                     for inputs in abstract["text"]]}


class _Taken(NamedTuple):
    """A global batch and what the data iterator was like right after reading it."""
    batch: dict  # On the devices (see the module docstring).
    record_ids: np.ndarray  # int64 [local_b]: this process's rows.
    state: dict  # The iterator's position after this batch: what a checkpoint saves.
    counters: dict


class _Prefetcher:
    """Calls `produce` in a background thread, at most `depth` results ahead of `get`.

    An exception in `produce` is raised by the `get` that would have returned its result (and by
    every later one).
    """

    def __init__(self, produce, depth):
        self._produce = produce
        self._slots = threading.Semaphore(depth)  # Results made and not yet taken, at most.
        self._results = queue.Queue()
        self._stop = threading.Event()
        self._error = None
        self._thread = threading.Thread(target=self._run, name="device_prefetch", daemon=True)
        self._thread.start()

    def _run(self):
        while True:
            while not self._slots.acquire(timeout=0.1):
                if self._stop.is_set():
                    return
            if self._stop.is_set():
                return
            try:
                self._results.put((self._produce(), None))
            except BaseException as error:  # noqa: BLE001 -- raised in the consumer's thread.
                self._results.put((None, error))
                return

    def get(self):
        if self._error is None:
            result, self._error = self._results.get()
            if self._error is None:
                self._slots.release()
                return result
        raise self._error

    def close(self):
        """Stops the thread (after the result it is making); results not taken are dropped."""
        self._stop.set()
        self._thread.join()


class TrainInputs:
    # Set by `next_batch`: the prefetch thread (data.device_prefetch > 0) and the last batch
    # handed to the train loop.
    _prefetcher = None
    _taken = None
    # Without the text cache: the LLMs the train step runs (in_step.TextEncoders) and their
    # weights, sharded over the global mesh; None with the cache.
    text_encoders = None
    encoder_params = None

    def __init__(self, config, workdir, mesh):
        self.config = config
        self.mesh = mesh
        # Each process loads its own rows: refuse a mesh that cannot take them before the LLMs
        # load (minutes on a pod).
        sharding.check_batch_rows_per_process(
            NamedSharding(mesh, sharding.logical_to_mesh_spec(("batch",), config.mesh.rules)),
            config.train.batch_size)
        self.image_space = make_image_space(config.vae)
        self.channels = self.image_space.channels
        size = config.data.image_size // self.image_space.downsample
        self.image_hw = (size, size)
        # Widths, state shapes and fingerprints come from the LLMs' metadata: with the text
        # cache no weights load (a fixed prompt missing from the cache loads them, logged).
        names = features.encoder_names(config.text)
        if config.text.cache_dir:
            self.encoders = [PromptEncoder.from_config(config, name) for name in names]
        else:
            # The train step runs them: their weights are sharded over the global mesh like the
            # DiT's (FSDP), loaded here, never by a batch in the prefetch thread.
            self.encoders = [PromptEncoder.from_config(config, name, mesh=mesh)
                             for name in names]
            llms = [encoder.load() for encoder in self.encoders]
            self.text_encoders = TextEncoders(tuple(llm.graphdef for llm in llms),
                                              tuple(e.choice for e in self.encoders))
            # Weights and the template prefix's keys and values (computed once at load).
            self.encoder_params = [encoder.params for encoder in self.encoders]
        self.llm_widths = [encoder.width for encoder in self.encoders]
        # The caches must have been made from these records (their count is compared too).
        num_records = len(pipeline.make_source(config.data))
        self.cached = None
        if config.text.cache_dir:
            root = text_cache.cache_root(config, workdir)
            self.cached = [text_cache.CachedTextStates(
                root / encoder.name, config.text.max_length,
                expected=text_cache.expected_metadata(encoder, config, num_records))
                for encoder in self.encoders]
        latents = None
        if config.vae.latent_cache_dir:
            latents = latent_cache.CachedLatents(
                array_cache.resolve(config.vae.latent_cache_dir, workdir),
                expected=latent_cache.expected_metadata(self.image_space, config.data,
                                                        num_records))
        # Text states are looked up, padded and stacked in the Grain workers, with the batch.
        self.dataset = pipeline.make_train_iterator(
            config.data, global_batch_size=config.train.batch_size, seed=config.seed,
            latents=latents, record_transform=None if self.cached is None
            else text_cache.CachedTextFields(self.cached))
        self._fingerprints = encoder_fingerprints(self.encoders, self.image_space)
        self._batch_shardings = jax.tree.map(
            lambda x: x.sharding,
            abstract_batch(config, mesh, [encoder.state_shape for encoder in self.encoders],
                           self.channels, self.image_hw))

    # ---- Identity of the frozen encoders (checkpoints refuse to resume with others) ----------
    def fingerprints(self):
        return self._fingerprints

    def release_encoders(self):
        """Drops the LLMs that a fixed prompt missing from the text cache made load, and their
        device memory, once the cache serves every batch."""
        if self.cached is None:
            raise ValueError("without text.cache_dir the LLMs encode every batch")
        for encoder in self.encoders:
            encoder.release()

    # ---- Batches --------------------------------------------------------------------------
    def batch_shardings(self):
        return self._batch_shardings

    def next_batch(self):
        """The next global batch, on the devices.

        With data.device_prefetch = n > 0, a background thread reads, encodes and transfers the
        next n batches while the device runs the current steps, so the train loop takes a batch
        that is already on the devices. The position (`get_state`), `counters` and record ids
        are those of the batches taken here, never of batches read ahead: a checkpoint resumes
        on the first batch its steps did not consume.
        """
        depth = self.config.data.device_prefetch
        if depth == 0:
            self._taken = self._read()
        else:
            if self._prefetcher is None:
                if depth < 0:
                    raise ValueError(f"data.device_prefetch={depth}; use 0 (off) or the number "
                                     "of batches to prepare ahead (default 2)")
                self._prefetcher = _Prefetcher(self._read_ahead, depth)
            self._taken = self._prefetcher.get()
        return self._taken.batch

    def _read(self):
        local = next(self.dataset)
        if self.cached is not None:
            text = local["text"]  # Stacked by the Grain workers (text_cache.CachedTextFields).
        else:
            text = self._token_ids(list(local["caption"]))
        latents = local["latent"] if "latent" in local else self.image_space.encode(local["image"])
        x0 = np.asarray(self.image_space.scale(latents))
        # The shardings do not depend on the text length: one tree serves every bucket.
        batch = jax.tree.map(
            lambda array, sharding: jax.make_array_from_process_local_data(
                sharding, np.asarray(array)),
            {"x0": x0, "text": text}, self._batch_shardings)
        return _Taken(batch, np.asarray(local["record_id"]), self.dataset.get_state(),
                      self._dataset_counters())

    def _token_ids(self, captions):
        """Captions -> the train step's text input: token ids and masks per LLM (host numpy),
        cut to the bucket of the longest sequence of every LLM.

        Every process must send the same shape; with one process the batch is all here. With
        several, each sees its own rows only, and agreeing on a length would need a round trip
        between hosts per batch: they keep text.max_length (the longest bucket).
        """
        tokens = [encoder.tokenize(captions) for encoder in self.encoders]
        length = self.config.text.max_length
        if jax.process_count() == 1:  # The shared prefix, if any, and a bucket after it.
            length = max(encoder.bucket(t) for encoder, t in zip(self.encoders, tokens))
        return [encoder.crop(t, length) for encoder, t in zip(self.encoders, tokens)]

    def _read_ahead(self):
        """`_read` in the prefetch thread, waiting there until the batch is on the devices.

        Outside the train loop's mesh context (a thread's own): nothing here runs a model (text
        states come from the cache, or the train step encodes the token ids), and
        `make_array_from_process_local_data` places the host-local rows on the global mesh.
        """
        taken = self._read()
        jax.block_until_ready(taken.batch)
        return taken

    @property
    def last_record_ids(self):
        """Record ids of this process's rows of the last batch `next_batch` returned."""
        return self._taken.record_ids

    def global_record_ids(self):
        """Record ids of the last global batch, in batch order (all processes' rows)."""
        if jax.process_count() == 1:
            return self.last_record_ids
        return np.asarray(multihost_utils.process_allgather(self.last_record_ids, tiled=True))

    def encode_prompts(self, prompts):
        """Fixed prompts -> replicated text inputs: from the text cache, which `--mode=encode`
        fills with the run's fixed prompts, else (or on a miss) encoded by the LLMs."""
        per_llm = []
        for k, encoder in enumerate(self.encoders):
            states = self.cached[k].fixed_prompts(prompts) if self.cached is not None else None
            per_llm.append(jax.device_get(encoder.encode(list(prompts)))
                           if states is None else states)
        return per_llm

    # ---- Data position and counters ---------------------------------------------------------
    def get_state(self):
        """The data position after the last batch `next_batch` returned."""
        return self.dataset.get_state() if self._taken is None else self._taken.state

    def set_state(self, state):
        self._stop_prefetch()  # Its batches follow the old position.
        self._taken = None
        self.dataset.set_state(state)

    def counters(self):
        return self._dataset_counters() if self._taken is None else self._taken.counters

    def _dataset_counters(self):
        return dict(self.dataset.counters()) if hasattr(self.dataset, "counters") else {}

    def _stop_prefetch(self):
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None

    def close(self):
        self._stop_prefetch()
        close = getattr(self.dataset, "close", None)
        if close is not None:
            close()
