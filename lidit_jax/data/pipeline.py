"""The training input pipeline (Grain): shuffled, process-sharded, bucketed, checkpointable.

Global steps s = 0, 1, 2, ... follow a global batch plan (lidit_jax.data.batch_plan): per epoch a
seeded permutation of the records, cut per aspect-ratio bucket into global batches of one bucket,
in a seeded order. Every JAX process computes the same plan; process p of P loads rows
[p * local_b, (p + 1) * local_b) of each global batch, so all processes put the same bucket
(the same static [H, W]) into the same step and together cover each global batch exactly.
  -> load and batch (Grain; worker processes when data.num_workers > 0): read, decode,
     validate, resize to cover the bucket + center crop, caption dropout (deterministic in
     (seed, epoch, record)), optional `record_transform(record_id, caption_dropped)` (extra
     per-record fields, e.g. the cached text states, looked up and padded there), and the
     local_b rows of a step stacked there too: the training process only receives batches;
     with a latent cache (`latents=`) the cached latent replaces decode + resize: no image is
     decoded in training
  -> uint8 -> float32 [-1, 1] in the training process (4x less inter-process traffic than
     sending floats).
Bad records (undecodable/truncated/tiny/enormous image, empty or non-UTF-8 caption, missing
field) never stop training: the row takes the next good record of the same global batch
instead (deterministic, so every process and every resumed run agrees), the bad record is
counted in `counters()` and the first few are logged with shard and index. With several
buckets, records whose image header is unreadable are left out of the plan up front.

Batches (host-local; local_b = global_batch_size // process_count):
  image           float32 [local_b, H, W, 3] in [-1, 1]  (H, W: the step's bucket)
    or latent     float32 [local_b, H/f, W/f, c]  (with `latents=`: unscaled VAE means)
  caption         object [local_b] of str ("" when dropped)
  caption_dropped bool [local_b]
  record_id       int64 [local_b]  (global index into the source)
  + the fields `record_transform(record_id, caption_dropped)` returns, stacked (nested dicts
    and lists of arrays are stacked leaf by leaf).

Iterator state (`get_state()` / `set_state()`) is a small JSON-able dict whose position is one
integer, the global step, the same on every process: a checkpoint written by the primary host
resumes every process (and another process count) on exactly the batches an uninterrupted run
would have produced, with any number of workers.
"""
import grain
import jax
import numpy as np
from absl import logging

from lidit_jax.data import batch_plan, images, records, shapes

STATE_VERSION = 2
_LOGGED_SKIPS = 5


# ---- Sources ----------------------------------------------------------------------------------
def make_source(data_config):
    """data.source -> random-access source: len(), [i] -> raw record, caption(i) -> str.

    shapes: ShapesSource(data.shapes_num_records, seed=data.shuffle_seed, data.image_size,
      data.shapes_layout);
    arrayrecord: records.ArrayRecordSource(data.path); tfds: convert.TfdsSource(data.path, keys).
    """
    kind = data_config.source
    if kind == "shapes":
        return shapes.ShapesSource(data_config.shapes_num_records, data_config.shuffle_seed,
                                   data_config.image_size, data_config.shapes_layout)
    if kind == "arrayrecord":
        if not data_config.path:
            raise ValueError("data.source=arrayrecord needs data.path (a folder of "
                             "records-*-of-*.arrayrecord shards)")
        return records.ArrayRecordSource(data_config.path)
    if kind == "tfds":
        from lidit_jax.data import convert  # tensorflow_datasets is imported only when used.
        return convert.TfdsSource(data_config.path, image_key=data_config.tfds_image_key,
                                  caption_key=data_config.tfds_caption_key,
                                  label_key=data_config.tfds_label_key)
    raise ValueError(f"data.source={kind!r}; choose shapes, arrayrecord or tfds")


def source_identity(data_config, num_records):
    """What identifies the records a cache was made from (compared by the text/latent caches)."""
    identity = {"source": data_config.source, "path": data_config.path,
                "num_records": int(num_records)}
    if data_config.source == "shapes":  # Generated: the seed and layout pick the records.
        identity["shapes_seed"] = int(data_config.shuffle_seed)
        identity["shapes_layout"] = data_config.shapes_layout
    return identity


def parse_record(raw):
    """A source's raw record -> (uint8 image [H, W, 3], caption str); raises images.BadRecord."""
    try:
        record = records.decode_record(raw) if isinstance(raw, (bytes, memoryview)) else raw
        image = record["image_bytes"] if "image_bytes" in record else record["image"]
        caption = record["caption"]
    except (KeyError, ValueError) as error:  # ValueError covers bad JSON and UTF-8.
        raise images.BadRecord(f"unreadable record: {type(error).__name__}: {error}") from None
    caption = images.check_caption(caption)
    if isinstance(image, np.ndarray):
        images.check_array(image)
    else:
        image = images.decode(bytes(image))
    return image, caption


# ---- Per-record work (runs in Grain workers) --------------------------------------------------
class RecordLoader:
    """Local position k -> training example of row k % local_b of this process's share of global
    step k // local_b (see the module docstring)."""

    def __init__(self, source, plan, buckets, *, process_index, local_batch_size, seed,
                 caption_dropout, record_transform=None, latents=None):
        self.source, self.plan, self.buckets = source, plan, buckets
        self.process_index, self.local_batch_size = process_index, local_batch_size
        self.seed, self.caption_dropout = seed, caption_dropout
        self.record_transform = record_transform
        self.latents = latents

    def caption_dropped(self, epoch, record_id):
        rng = np.random.default_rng([self.seed, epoch, record_id, 0xD20])
        return bool(rng.random() < self.caption_dropout)

    def _load(self, record_id, bucket):
        """-> ({"image": uint8 [H, W, 3]} or {"latent": float32 [h, w, c]}, caption str)."""
        if self.latents is not None:  # No image decoding: the VAE ran at encode time.
            return ({"latent": self.latents(record_id)},
                    images.check_caption(self.source.caption(record_id)))
        image, caption = parse_record(self.source[record_id])
        return {"image": images.resize_center_crop(image, *self.buckets[bucket])}, caption

    def _where(self, record_id):
        locate = getattr(self.source, "locate", None)
        return locate(record_id) if locate else (repr(self.source), record_id)

    def __call__(self, position):
        step, local_row = divmod(int(position), self.local_batch_size)
        epoch, batch = self.plan.batch(step)
        row = self.process_index * self.local_batch_size + local_row
        skipped = []
        # The row's record, else the next good one of the same global batch (cyclically).
        for record_id in (int(batch[(row + k) % len(batch)]) for k in range(len(batch))):
            # The plan's bucket (from the header), so a batch has one shape even if a header lied.
            try:
                image_or_latent, caption = self._load(record_id, self.plan.bucket_of_record[record_id])
                break
            except images.BadRecord as error:
                # Only the row's own record counts: substitutes are other rows' records.
                if not skipped:
                    skipped.append((record_id, self._where(record_id), str(error)))
        else:
            raise RuntimeError(f"every record of global step {step} (epoch {epoch}) is bad, e.g. "
                               f"{skipped[0]}; check the data set with lidit_jax.data.convert")
        dropped = self.caption_dropped(epoch, record_id)
        example = dict(image_or_latent, caption="" if dropped else caption, caption_dropped=dropped,
                       record_id=np.int64(record_id), skipped=skipped)
        if self.record_transform is not None:
            example.update(self.record_transform(record_id, dropped))
        return example


def _stack(examples):
    """local_b examples -> one batch (in the Grain worker); images stay uint8 (sent smaller)."""
    batch = {key: jax.tree.map(lambda *rows: np.stack(rows), *[e[key] for e in examples])
             for key in examples[0] if key not in ("caption", "skipped")}
    batch["caption"] = np.array([e["caption"] for e in examples], dtype=object)
    batch["caption_dropped"] = batch["caption_dropped"].astype(bool)
    batch["skipped"] = [skip for e in examples for skip in e["skipped"]]
    return batch


# ---- The iterator -----------------------------------------------------------------------------
class TrainIterator:
    """Endless iterator of host-local batches with get_state/set_state and counters()."""

    def __init__(self, source, *, global_batch_size, buckets, seed, caption_dropout,
                 process_index, process_count, num_workers, record_transform=None, latents=None):
        if len(source) == 0:
            raise ValueError(f"data source {source!r} holds no records")
        self.local_batch_size = global_batch_size // process_count
        self.num_workers = num_workers
        plan = batch_plan.make_plan(source, buckets, global_batch_size, seed)
        # Left out of the plan (several buckets and an unreadable image header): the same count
        # on every process, reported with the skipped ones.
        self._unreadable = int((plan.bucket_of_record == batch_plan.UNREADABLE).sum())
        self.loader = RecordLoader(source, plan, buckets, process_index=process_index,
                                   local_batch_size=self.local_batch_size, seed=seed,
                                   caption_dropout=caption_dropout,
                                   record_transform=record_transform, latents=latents)
        # The process index and count are not part of the identity: the position is global.
        self._identity = {"version": STATE_VERSION, "seed": seed, "num_records": len(source),
                          "global_batch_size": global_batch_size,
                          "buckets": [list(b) for b in buckets]}
        self._iterator = None
        self._start(step=0, counters={"records": 0, "skipped": 0})

    def _start(self, step, counters):
        self.close()
        first = step * self.local_batch_size
        # Batched before the workers: a worker hands over whole batches, stacked.
        dataset = (grain.MapDataset.range(first, 2**62).map(self.loader)
                   .batch(self.local_batch_size, batch_fn=_stack)
                   .to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)))
        if self.num_workers > 0:
            dataset = dataset.mp_prefetch(
                grain.MultiprocessingOptions(num_workers=self.num_workers))
        self._iterator = iter(dataset)
        self._step = step
        self._counters = dict(counters)

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self._iterator)
        for record_id, where, reason in batch.pop("skipped"):
            self._counters["skipped"] += 1
            if self._counters["skipped"] <= _LOGGED_SKIPS:
                logging.warning("skipping bad record %d (%s): %s", record_id, where, reason)
        if "image" in batch:
            batch["image"] = images.to_model_range(batch["image"])
        self._counters["records"] += self.local_batch_size
        self._step += 1
        return batch

    def get_state(self):
        """JSON-able position: the global step (same on every process) and the counters."""
        return dict(self._identity, step=self._step, counters=dict(self._counters))

    def set_state(self, state):
        """Continues from a get_state() dict of an iterator with the same data settings."""
        different = {k: (state.get(k), v) for k, v in self._identity.items() if state.get(k) != v}
        if different:
            raise ValueError("data iterator state was saved with other settings "
                             f"(saved, current): {different}; resume with the same data config, "
                             "seed and global batch size")
        self._start(state["step"], state["counters"])

    def counters(self):
        """{'records': rows yielded, 'skipped': bad records met} by this process (restored from
        the checkpointed state, which the primary process wrote), and 'unreadable': records of
        the whole source left out of the plan."""
        return dict(self._counters, unreadable=self._unreadable)

    def close(self):
        if self._iterator is not None and hasattr(self._iterator, "close"):
            self._iterator.close()
        self._iterator = None


def make_train_iterator(data_config, *, global_batch_size, seed=None, process_index=None,
                        process_count=None, record_transform=None, latents=None):
    """The training batches of this JAX process (see the module docstring for the batch dict).

    seed: shuffle and caption-dropout seed (default data.shuffle_seed).
    process_index / process_count: default jax.process_index() / jax.process_count().
    record_transform: (record id, caption dropped) -> dict of extra numpy fields (e.g. the
      cached text states, text.cache.CachedTextStates.record_fields); runs in the loader (Grain
      workers when data.num_workers > 0), so it must pickle.
    latents: record id -> float32 latent [h, w, c] (`diffusion.latent_cache.CachedLatents`);
      when given, batches hold "latent" [local_b, h, w, c] instead of "image" and no image is
      decoded.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % process_count:
        raise ValueError(f"train.batch_size={global_batch_size} is not divisible by the "
                         f"{process_count} processes")
    seed = data_config.shuffle_seed if seed is None else seed
    return TrainIterator(
        make_source(data_config), global_batch_size=global_batch_size,
        buckets=images.parse_buckets(data_config.buckets, data_config.image_size),
        seed=int(seed) % 2**32, caption_dropout=float(data_config.caption_dropout),
        process_index=process_index, process_count=process_count,
        num_workers=int(data_config.num_workers), record_transform=record_transform,
        latents=latents)

