"""ArrayRecord shards read by byte range: the record set's and the caches' one shard format.

Why: a host must read its own records and nothing else. ArrayRecord's reader opens local files
(staging a 1-2 GiB shard to read one record), and the GCS reader inside array_record streams
from a record's offset to the object's end, so every random read pulls ~1 MiB+ more than the
record (measured against the GCS emulator: 2 MiB for a 20 KiB record). So each shard is written
with a sidecar index, `<shard>.spans.npy` (int64 [records, 2]: the file positions [start, stop)
of each record's bytes), and a record is one bounded read of exactly those bytes
(`paths.read_range`: a ranged GET on `gs://`), through the project's GCS client (gcsfs).

What makes a record's bytes addressable: shards are written uncompressed, one record per chunk
(`WRITER_OPTIONS`), so in the Riegeli container a record's bytes are contiguous except for the
24-byte block header at every 64 KiB boundary, which `_strip_block_headers` removes. The spans
are found by walking the chunk headers of the finished local file (`record_spans`) and checked
against what was written before the shard is published. Images are already compressed and the
cached bf16 states barely compress, so dropping zstd costs little storage.

Shards written before this (zstd, no spans) are still read, through ArrayRecord's reader on a
staged local copy (`paths.local_copy`), with a warning that names the fix.

Open shards (their spans, or a legacy reader) are held in an LRU of `MAX_OPEN_SHARDS`: a
process touches every shard of a shuffled data set, and holding all of them grows without
bound at 100M records.
"""
import collections
import io
import mmap
import os
import struct
import threading

import numpy as np
from absl import logging
from array_record.python import array_record_module

from lidit_jax import paths

WRITER_OPTIONS = "group_size:1,uncompressed"
SPANS_SUFFIX = ".spans.npy"
MAX_OPEN_SHARDS = 64
# Riegeli's container (github.com/google/riegeli, doc/riegeli_records_file_format.md).
_BLOCK = 1 << 16
_BLOCK_HEADER = 24
_CHUNK_HEADER = 40
_SIMPLE_CHUNK = ord("r")
_UNCOMPRESSED = 0


class NotRangeReadable(ValueError):
    """The shard's records are not stored as contiguous raw bytes (compressed, grouped)."""


def spans_path(shard):
    return paths.path(f"{shard}{SPANS_SUFFIX}")


# ---- Locating records in the Riegeli container ----------------------------------------------
def _physical(logical):
    """Position in the chunk stream (block headers left out) -> position in the file."""
    usable = _BLOCK - _BLOCK_HEADER
    return logical // usable * _BLOCK + _BLOCK_HEADER + logical % usable


def _read_logical(buffer, logical, length):
    out = bytearray()
    while length:
        physical = _physical(logical)
        take = min(length, _BLOCK - physical % _BLOCK)
        out += buffer[physical:physical + take]
        logical, length = logical + take, length - take
    return bytes(out)


def _varint(data, position):
    value = shift = 0
    while True:
        byte = data[position]
        value, position, shift = value | (byte & 0x7F) << shift, position + 1, shift + 7
        if byte < 0x80:
            return value, position


def record_spans(filename, num_records):
    """A local shard written with WRITER_OPTIONS -> int64 [num_records, 2] file positions
    [start, stop) of each record's bytes; raises NotRangeReadable for any other layout."""
    spans = []
    with open(filename, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
        logical = 0  # Chunk after chunk: signature, (metadata,) records, footer.
        while len(spans) < num_records:
            header = _read_logical(buffer, logical, _CHUNK_HEADER)
            data_size, _, type_and_count, decoded_size = struct.unpack_from("<QQQQ", header, 8)
            chunk_type, count = type_and_count & 0xFF, type_and_count >> 8
            if chunk_type == _SIMPLE_CHUNK:
                head = _read_logical(buffer, logical + _CHUNK_HEADER, min(data_size, 21))
                if head[0] != _UNCOMPRESSED or count != 1:
                    raise NotRangeReadable(
                        f"{filename}: chunk of {count} records, compression {head[0]}; "
                        f"range reads need {WRITER_OPTIONS!r}")
                sizes_size, position = _varint(head, 1)
                size, _ = _varint(head, position)
                start = logical + _CHUNK_HEADER + position + sizes_size
                if size != decoded_size:  # The decoded size counts the record bytes only.
                    raise NotRangeReadable(f"{filename}: record chunk at {logical} is malformed")
                spans.append((_physical(start), _physical(start + size - 1) + 1 if size
                              else _physical(start)))
            logical += _CHUNK_HEADER + data_size
    return np.array(spans, np.int64).reshape(-1, 2)


def _strip_block_headers(data, start):
    """Bytes read from file position `start` -> the same bytes without Riegeli block headers."""
    first = -(-start // _BLOCK) * _BLOCK - start  # Offset of the first block boundary in data.
    if first >= len(data):
        return data
    pieces, position = [data[:first]], first
    while position < len(data):
        pieces.append(data[position + _BLOCK_HEADER:position + _BLOCK])
        position += _BLOCK
    return b"".join(pieces)


# ---- Writing ---------------------------------------------------------------------------------
def write_shard(final, entries):
    """Writes the byte strings `entries` (an iterable) as the shard `final` and its spans; the
    spans are published first, so a shard that exists is range-readable. Returns the count."""
    with paths.local_output(final) as temporary:
        writer = array_record_module.ArrayRecordWriter(temporary, WRITER_OPTIONS)
        sizes = []
        for entry in entries:
            writer.write(entry)
            sizes.append(len(entry))
        writer.close()
        spans = record_spans(temporary, len(sizes))
        if not np.array_equal(spans[:, 1] - spans[:, 0]
                              - _block_headers_within(spans), np.array(sizes, np.int64)):
            raise NotRangeReadable(f"record spans of {final} do not match what was written")
        with paths.local_output(spans_path(final)) as spans_file, open(spans_file, "wb") as f:
            np.save(f, spans)
    return len(sizes)


def _block_headers_within(spans):
    """int64 [n]: bytes of block headers inside each span [start, stop) (a span never starts on
    a block boundary: a block header is there)."""
    return ((spans[:, 1] - 1) // _BLOCK - spans[:, 0] // _BLOCK).clip(0) * _BLOCK_HEADER


def count_records(shard):
    """Records in an existing shard: from its spans, else by opening it (legacy shards)."""
    spans = spans_path(shard)
    if spans.exists():
        return len(np.load(io.BytesIO(paths.read_range(spans))))
    reader = array_record_module.ArrayRecordReader(paths.local_copy(shard))
    try:
        return reader.num_records()
    finally:
        reader.close()


# ---- Reading ---------------------------------------------------------------------------------
class _RangeShard:
    """One shard read by range: its spans (16 bytes a record), read once when opened."""

    def __init__(self, shard):
        self.shard = str(shard)
        self.spans = np.load(io.BytesIO(paths.read_range(spans_path(shard))))

    def read(self, index):
        start, stop = (int(x) for x in self.spans[index])
        return _strip_block_headers(paths.read_range(self.shard, start, stop), start)


class _StagedShard:
    """A shard written before range reads: staged whole, read by ArrayRecord (see the module
    docstring)."""

    def __init__(self, shard):
        self.reader = array_record_module.ArrayRecordReader(paths.local_copy(shard),
                                                            "readahead_buffer_size:0")

    def read(self, index):
        return self.reader.read([index])[0]


class ShardReaders:
    """Record `index` of shard path -> entry bytes, through at most `capacity` open shards
    (least recently used evicted). Thread-safe; pickles empty (worker processes open their own).
    """

    def __init__(self, capacity=MAX_OPEN_SHARDS):
        if capacity < 1:
            raise ValueError(f"ShardReaders(capacity={capacity}): keep at least one shard open")
        self.capacity = capacity
        self._open = collections.OrderedDict()
        self._lock = threading.Lock()
        self._warned = False

    def read(self, shard, index):
        return self._get(str(shard)).read(index)

    def _get(self, shard):
        with self._lock:
            if shard in self._open:
                self._open.move_to_end(shard)
                return self._open[shard]
        opened = self._open_shard(shard)  # Outside the lock: a remote open is a GET.
        with self._lock:
            self._open[shard] = opened
            while len(self._open) > self.capacity:
                # Dropped, not closed: a thread may still be reading it; freed when it is done.
                self._open.popitem(last=False)
        return opened

    def _open_shard(self, shard):
        try:
            return _RangeShard(shard)
        except FileNotFoundError:  # No spans: a legacy shard, or none at all.
            if not paths.path(shard).exists():
                raise FileNotFoundError(f"shard {shard} is missing: the data set or cache is "
                                        "incomplete; write it again") from None
        if not self._warned:
            self._warned = True
            logging.warning(
                "%s has no %s index (written before range reads): its shards are copied whole "
                "to every host that reads them; convert or encode it again to read by range",
                os.path.dirname(shard), SPANS_SUFFIX)
        return _StagedShard(shard)

    def __len__(self):
        return len(self._open)

    def __getstate__(self):
        return {"capacity": self.capacity}

    def __setstate__(self, state):
        self.__init__(state["capacity"])
