"""The training input pipeline (Grain): shuffled, process-sharded, bucketed, checkpointable.

Stream of one JAX process p of P, for a source of n records:
  position k = 0, 1, 2, ... of an endless sequence of epochs, each a seeded permutation of the n
  records (Grain's index shuffle, reseeded per epoch); process p takes positions p, p + P, ...
  -> load: read, decode, validate, pick the nearest-aspect bucket, resize + center crop, caption
     dropout (deterministic in (seed, epoch, record)), optional `record_transform`
     (in Grain worker processes when data.num_workers > 0)
  -> batch: per-bucket buffers in the main process; a batch leaves when a bucket holds local_b
     records, so every batch has one static shape.
Bad records (undecodable/truncated/tiny/enormous image, empty or non-UTF-8 caption, missing
field) reach the batcher as skip markers: skipped, counted in `counters()`, the first few logged
with shard and index.

Batches (host-local; local_b = global_batch_size // process_count):
  image           float32 [local_b, H, W, 3] in [-1, 1]  (H, W: the batch's bucket)
  caption         object [local_b] of str ("" when dropped)
  caption_dropped bool [local_b]
  record_id       int64 [local_b]  (global index into the source)
  + the fields `record_transform(record_id)` returns, stacked.

Iterator state (`get_state()` / `set_state()`) is a small JSON-able dict: the number of positions
consumed, the (epoch, record) pairs waiting in bucket buffers, and the counters. A restored
iterator reloads those records and yields exactly the batches an uninterrupted one would, with
any number of workers.
"""
import grain
import jax
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from lidit_jax.data import images, records, shapes

STATE_VERSION = 1
_LOGGED_SKIPS = 5


# ---- Sources ----------------------------------------------------------------------------------
def make_source(data_config):
    """data.source -> random-access source: len(), [i] -> raw record, caption(i) -> str.

    shapes: ShapesSource(data.shapes_num_records, seed=data.shuffle_seed, data.image_size);
    arrayrecord: records.ArrayRecordSource(data.path); tfds: convert.TfdsSource(data.path, keys).
    """
    kind = data_config.source
    if kind == "shapes":
        return shapes.ShapesSource(data_config.shapes_num_records, data_config.shuffle_seed,
                                   data_config.image_size)
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
    """(position, record id) -> training example dict, or a skip marker for a bad record."""

    def __init__(self, source, buckets, seed, caption_dropout, record_transform=None):
        self.source, self.buckets, self.seed = source, buckets, seed
        self.caption_dropout, self.record_transform = caption_dropout, record_transform

    def caption_dropped(self, epoch, record_id):
        rng = np.random.default_rng([self.seed, epoch, record_id, 0xD20])
        return bool(rng.random() < self.caption_dropout)

    def __call__(self, item):
        epoch, record_id = item
        try:
            image, caption = parse_record(self.source[record_id])
        except images.BadRecord as error:
            locate = getattr(self.source, "locate", None)
            where = locate(record_id) if locate else (repr(self.source), record_id)
            return {"skipped": str(error), "record_id": record_id, "where": where}
        bucket = images.nearest_bucket(*image.shape[:2], self.buckets)
        image = images.resize_center_crop(image, *self.buckets[bucket])
        dropped = self.caption_dropped(epoch, record_id)
        example = {"image": images.to_model_range(image), "caption": "" if dropped else caption,
                   "caption_dropped": dropped, "record_id": np.int64(record_id),
                   "bucket": bucket, "epoch": epoch}
        if self.record_transform is not None:
            example.update(self.record_transform(record_id))
        return example


def _with_epoch(num_records):
    return lambda position, record_id: (position // num_records, int(record_id))


def _stack(examples):
    batch = {key: np.stack([e[key] for e in examples]) for key in examples[0]
             if key not in ("caption", "bucket", "epoch")}
    batch["caption"] = np.array([e["caption"] for e in examples], dtype=object)
    batch["caption_dropped"] = batch["caption_dropped"].astype(bool)
    return batch


# ---- The iterator -----------------------------------------------------------------------------
class TrainIterator:
    """Endless iterator of host-local batches with get_state/set_state and counters()."""

    def __init__(self, source, *, local_batch_size, buckets, seed, caption_dropout,
                 process_index, process_count, num_workers, record_transform=None):
        if len(source) == 0:
            raise ValueError(f"data source {source!r} holds no records")
        self.source = source
        self.local_batch_size = local_batch_size
        self.buckets = buckets
        self.process_index, self.process_count = process_index, process_count
        self.num_workers = num_workers
        self.loader = RecordLoader(source, buckets, seed, caption_dropout, record_transform)
        # Positions of this process in the endless shuffled sequence, as (epoch, record id).
        self._positions = (grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat()
                           .map_with_index(_with_epoch(len(source)))
                           [process_index::process_count])
        self._identity = {"version": STATE_VERSION, "seed": seed, "num_records": len(source),
                          "process_index": process_index, "process_count": process_count,
                          "local_batch_size": local_batch_size,
                          "buckets": [list(b) for b in buckets]}
        self._iterator = None
        self._start(consumed=0, pending={}, counters={"records": 0, "skipped": 0})

    def _start(self, consumed, pending, counters):
        self.close()
        dataset = self._positions[consumed:].map(self.loader).to_iter_dataset(
            grain.ReadOptions(num_threads=2, prefetch_buffer_size=2 * self.local_batch_size))
        if self.num_workers > 0:
            dataset = dataset.mp_prefetch(
                grain.MultiprocessingOptions(num_workers=self.num_workers))
        self._iterator = iter(dataset)
        self._consumed = consumed
        self._counters = dict(counters)
        # Bucket buffers: the examples, and their (epoch, record id) for the state.
        self._pending = {int(b): [self.loader(tuple(item)) for item in items]
                         for b, items in pending.items()}

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            example = next(self._iterator)
            self._consumed += 1
            if "skipped" in example:
                self._counters["skipped"] += 1
                if self._counters["skipped"] <= _LOGGED_SKIPS:
                    logging.warning("skipping bad record %d (%s): %s", example["record_id"],
                                    example["where"], example["skipped"])
                continue
            self._counters["records"] += 1
            buffer = self._pending.setdefault(example["bucket"], [])
            buffer.append(example)
            if len(buffer) == self.local_batch_size:
                del self._pending[example["bucket"]]
                return _stack(buffer)

    def get_state(self):
        """JSON-able position: consumed positions, buffered (epoch, record id)s, counters."""
        pending = {str(b): [[int(e["epoch"]), int(e["record_id"])] for e in examples]
                   for b, examples in self._pending.items()}
        return dict(self._identity, consumed=self._consumed, pending=pending,
                    counters=dict(self._counters))

    def set_state(self, state):
        """Continues from a get_state() dict of an iterator with the same data settings."""
        different = {k: (state.get(k), v) for k, v in self._identity.items() if state.get(k) != v}
        if different:
            raise ValueError("data iterator state was saved with other settings "
                             f"(saved, current): {different}; resume with the same data config, "
                             "seed, batch size and process count")
        self._start(state["consumed"], state["pending"], state["counters"])

    def counters(self):
        """{'records': usable records read, 'skipped': bad records skipped} in this process."""
        return dict(self._counters)

    def close(self):
        if self._iterator is not None and hasattr(self._iterator, "close"):
            self._iterator.close()
        self._iterator = None


def make_train_iterator(data_config, *, global_batch_size, seed=None, process_index=None,
                        process_count=None, record_transform=None):
    """The training batches of this JAX process (see the module docstring for the batch dict).

    seed: shuffle and caption-dropout seed (default data.shuffle_seed).
    process_index / process_count: default jax.process_index() / jax.process_count().
    record_transform: record id -> dict of extra numpy fields (e.g. cached text states);
      runs in the loader (Grain workers when data.num_workers > 0), so it must pickle.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % process_count:
        raise ValueError(f"train.batch_size={global_batch_size} is not divisible by the "
                         f"{process_count} processes")
    seed = data_config.shuffle_seed if seed is None else seed
    return TrainIterator(
        make_source(data_config), local_batch_size=global_batch_size // process_count,
        buckets=images.parse_buckets(data_config.buckets, data_config.image_size),
        seed=int(seed) % 2**32, caption_dropout=float(data_config.caption_dropout),
        process_index=process_index, process_count=process_count,
        num_workers=int(data_config.num_workers), record_transform=record_transform)


def to_global_batch(local_batch, mesh, batch_axes=("data", "fsdp")):
    """Numeric fields -> global jax.Arrays sharded on dim 0 over `batch_axes`; strings stay."""
    out = {}
    for key, value in local_batch.items():
        if value.dtype == object or value.dtype.kind in "US":
            out[key] = value
            continue
        spec = PartitionSpec(batch_axes, *([None] * (value.ndim - 1)))
        out[key] = jax.make_array_from_process_local_data(NamedSharding(mesh, spec), value)
    return out
