"""`--mode=encode` writes a record set's image_sizes.npy, so bucket planning reads no image.

A record set that was only encoded, or whose converter predates image_sizes.npy, would otherwise
have every training process read every record's image header at start
(`batch_plan.record_sizes`). The encoders read every record of their process's share anyway (its
caption, its image): `EncodedSizes` keeps each record's header size on the way (the converters'
function, `records.image_size`). At the end each process publishes its share beside the shards,
  image_sizes.part-<p>-of-<P>.npz    indices int64 [n], sizes int32 [n, 2]
after reading the headers of the records it did not encode this run (shards complete from an
earlier run), and the process that finds all P parts merges them into image_sizes.npy (the file
the converters write) and removes the parts. Nothing happens for a set that has its sizes, for
other sources (shapes are square; TFDS sets are not ours to write into), or, with a warning, for
a folder that cannot be written.
"""
import io

import numpy as np
from absl import logging

from lidit_jax import paths
from lidit_jax.data import batch_plan, encode_order, records

PART_PATTERN = "image_sizes.part-{process:05d}-of-{count:05d}.npz"


class EncodedSizes:
    """The image sizes of the records this process reads while encoding (see the module
    docstring); `caption` and `read` are the encoders' way to read records."""

    def __init__(self, source, process_index=0, process_count=1):
        self.source = source
        self.process_index, self.process_count = process_index, process_count
        directory = getattr(source, "directory", None)
        self.active = bool(directory) and records.read_image_sizes(directory, len(source)) is None
        self._sizes = {}  # record index -> (height, width); filled by the reader threads.

    def caption(self, index):
        """`source.caption(index)`, keeping the size of the record's image."""
        if not self.active:
            return self.source.caption(index)
        entry = self.source[index]
        self._sizes[index] = records.image_size(entry)
        return records.entry_caption(entry)

    def read(self, index):
        """index -> (raw record, (height, width) from its image header; (0, 0) unreadable)."""
        raw = self.source[index]
        size = batch_plan.header_size(raw)
        if self.active:
            self._sizes[index] = size
        return raw, size

    def publish(self, shard_size):
        """Writes this process's part (its cache shards p, p + P, ... of `shard_size` records)
        and, when every part is there, image_sizes.npy. Returns its path once written, else
        None."""
        if not self.active:
            return None
        directory = paths.path(self.source.directory)
        num_records = len(self.source)
        share = [i for shard in range(self.process_index, -(-num_records // shard_size),
                                      self.process_count)
                 for i in range(shard * shard_size, min((shard + 1) * shard_size, num_records))]
        missing = [i for i in share if i not in self._sizes]
        if missing:
            logging.info("reading the image headers of %d records not encoded in this run",
                         len(missing))
            for index, size in zip(missing, encode_order.read_all(
                    lambda i: batch_plan.header_size(self.source[i]), missing)):
                self._sizes[index] = size
        part = directory / PART_PATTERN.format(process=self.process_index,
                                               count=self.process_count)
        try:
            with paths.local_output(part) as temporary:
                with open(temporary, "wb") as f:
                    np.savez(f, indices=np.asarray(share, np.int64),
                             sizes=np.asarray([self._sizes[i] for i in share],
                                              np.int32).reshape(-1, 2))
        except OSError as e:  # A read-only record set: training scans the headers instead.
            logging.warning("cannot write the image sizes into %s (%s): training will read every "
                            "image header at start; convert the data into a writable folder",
                            directory, e)
            return None
        return self._merge(directory, num_records)

    def _merge(self, directory, num_records):
        """image_sizes.npy from all parts, by the process that finds them all (one listing)."""
        parts = sorted(directory.glob(PART_PATTERN.replace("{process:05d}", "*").format(
            count=self.process_count)))
        if len(parts) < self.process_count:
            return None
        sizes = np.zeros((num_records, 2), np.int32)
        covered = np.zeros(num_records, bool)
        for part in parts:
            with np.load(io.BytesIO(part.read_bytes())) as stored:
                sizes[stored["indices"]] = stored["sizes"]
                covered[stored["indices"]] = True
        if not covered.all():
            raise ValueError(f"the image size parts in {directory} miss records "
                             f"{np.flatnonzero(~covered)[:5].tolist()}: remove {parts[0].name} "
                             "and the other parts, and run --mode=encode again")
        records.write_image_sizes(directory, sizes)
        for part in parts:
            part.unlink(missing_ok=True)  # Another process may be merging them too.
        return directory / records.IMAGE_SIZES_FILE
