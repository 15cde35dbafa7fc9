"""Global batch plan: which records form each global batch, the same on every JAX process.

With aspect-ratio buckets every process must put the same bucket (the same [H, W]) into the same
step, or the global batch cannot be assembled. So batches are planned globally, from each
record's bucket, before anything is decoded:
  epoch e: a seeded permutation of the records (seed, e); per bucket, its records in that order
  cut into global batches of global_batch_size (the remainder of each bucket is left out of this
  epoch; the next permutation leaves out others); the batches of all buckets in a seeded order.
Global step s is batch s % batches_per_epoch of epoch s // batches_per_epoch, and process p of P
loads rows [p * local_b, (p + 1) * local_b) of it. The position of the whole stream is one
integer (the global step), identical on every process.

Per-record sizes come from the source without decoding, and only with more than one bucket: the
shapes source is all square; a record set has them in `image_sizes.npy`, written by the
converters (lidit_jax.data.records) and by --mode=encode, so planning reads no image. Other
sources, and record sets made before that, are scanned (image headers only, every record by
every process: slow at scale, logged) and the scan is saved beside the shards if the folder is
writable. Records whose header cannot be read get bucket -1 and are left out of every epoch.
"""
import io

import numpy as np
from absl import logging
from PIL import Image

from lidit_jax.data import records, shapes

UNREADABLE = -1


def assign_buckets(sizes, buckets):
    """sizes int [n, 2] (height, width; 0 = unreadable) -> bucket index int32 [n] (-1 unreadable).

    The nearest bucket in log aspect ratio: a square image goes to the squarest bucket.
    """
    sizes = np.asarray(sizes, np.float64).reshape(-1, 2)
    readable = sizes.min(axis=1) > 0
    safe = np.where(readable[:, None], sizes, 1.0)
    ratios = np.log(safe[:, 0] / safe[:, 1])
    targets = np.log([h / w for h, w in buckets])
    nearest = np.abs(ratios[:, None] - targets[None, :]).argmin(axis=1).astype(np.int32)
    return np.where(readable, nearest, UNREADABLE).astype(np.int32)


def header_size(raw):
    """A source's raw record -> (height, width) from the image header only; (0, 0) if unreadable."""
    if isinstance(raw, (bytes, memoryview)):
        return records.image_size(raw)
    try:
        image = raw["image_bytes"] if "image_bytes" in raw else raw["image"]
        if isinstance(image, np.ndarray):
            return tuple(image.shape[:2])
        width, height = Image.open(io.BytesIO(bytes(image))).size
        return height, width
    except Exception:  # noqa: BLE001 -- any failure means "unreadable"; the scan must go on.
        return 0, 0


def record_sizes(source):
    """int32 [len(source), 2] (height, width) of every record; (0, 0) where unreadable."""
    if isinstance(source, shapes.ShapesSource):
        return np.full((len(source), 2), source.image_size, np.int32)
    directory = getattr(source, "directory", None)
    sizes = records.read_image_sizes(directory, len(source)) if directory else None
    if sizes is not None:
        return sizes
    logging.warning("reading the image headers of %d records of %r for aspect-ratio buckets "
                    "(every process reads every record): convert the data again, or run "
                    "--mode=encode, to write %s", len(source), source, records.IMAGE_SIZES_FILE)
    sizes = np.array([header_size(source[i]) for i in range(len(source))], np.int32)
    sizes = sizes.reshape(-1, 2)
    if directory:
        try:  # Every process may write it; each publishes a whole file (lidit_jax.paths).
            records.write_image_sizes(directory, sizes)
        except OSError as e:  # A read-only record set is fine: the scan is redone next time.
            logging.info("cannot save %s in %s (%s); the header scan is not cached",
                         records.IMAGE_SIZES_FILE, directory, e)
    return sizes


class BatchPlan:
    """Global batches of record ids per epoch (see the module docstring)."""

    def __init__(self, bucket_of_record, num_buckets, global_batch_size, seed):
        self.bucket_of_record = np.asarray(bucket_of_record, np.int32)
        self.num_buckets, self.global_batch_size = num_buckets, global_batch_size
        self.seed = seed
        counts = np.bincount(self.bucket_of_record[self.bucket_of_record >= 0],
                             minlength=num_buckets)
        self.batches_per_epoch = int((counts // global_batch_size).sum())
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"no bucket holds train.batch_size={global_batch_size} readable records "
                f"(records per bucket: {counts.tolist()}); use a smaller batch, fewer buckets "
                "or more data")
        self._cached = (None, None)  # (epoch, its batches): consecutive steps share an epoch.

    def epoch(self, epoch):
        """int64 [batches_per_epoch, global_batch_size] record ids of epoch `epoch`."""
        if self._cached[0] == epoch:
            return self._cached[1]
        rng = np.random.default_rng([self.seed, epoch, 0xB0C])
        order = rng.permutation(len(self.bucket_of_record))
        bucket_in_order = self.bucket_of_record[order]
        batches = []
        for bucket in range(self.num_buckets):
            members = order[bucket_in_order == bucket]
            usable = len(members) // self.global_batch_size * self.global_batch_size
            batches.append(members[:usable].reshape(-1, self.global_batch_size))
        batches = np.concatenate(batches).astype(np.int64)
        batches = batches[rng.permutation(len(batches))]
        self._cached = (epoch, batches)
        return batches

    def batch(self, step):
        """Global step -> (epoch, record ids int64 [global_batch_size])."""
        epoch, index = divmod(step, self.batches_per_epoch)
        return epoch, self.epoch(epoch)[index]


def record_buckets(source, buckets):
    """int32 [len(source)]: each record's bucket index into buckets [(H, W), ...], -1 where the
    image header is unreadable; scans sizes only for > 1 bucket."""
    if len(buckets) == 1:
        return np.zeros(len(source), np.int32)
    return assign_buckets(record_sizes(source), buckets)


def make_plan(source, buckets, global_batch_size, seed):
    """BatchPlan over `source` for buckets [(H, W), ...]."""
    bucket_of_record = record_buckets(source, buckets)
    unreadable = int((bucket_of_record == UNREADABLE).sum())
    if unreadable:
        logging.warning("%d of %d records have unreadable images and are left out", unreadable,
                        len(source))
    return BatchPlan(bucket_of_record, len(buckets), global_batch_size, seed)
