"""The image-caption record format (version 1) and its sharded ArrayRecord writer and reader.

One ArrayRecord entry is one record:
  4 bytes    little-endian uint32 length n of the header
  n bytes    UTF-8 JSON header {"version": 1, "caption": str, "metadata": {...},
             "image_format": "png" | "jpeg" | "webp" | ...}
  the rest   the encoded image file's bytes (decoded with PIL)
No pickle: any language with JSON and an image decoder reads it.

A record set is a folder of shards `records-00000-of-00004.arrayrecord`, ... written with
`group_size:1` (random access). Shard k holds what inputs [k * per_shard, (k + 1) * per_shard)
produced, minus the skipped ones. Each shard is written to a temporary file and published when
complete, so an interrupted conversion resumes by skipping complete shards. The folder may be
local or `gs://` (lidit_jax.paths: ArrayRecord opens local files only, so remote shards are
staged to a local copy once per host before reading and uploaded whole after writing).
"""
import io
import json
import struct

from absl import logging
from array_record.python import array_record_module
from PIL import Image

from lidit_jax import paths
from lidit_jax.data import images

FORMAT_VERSION = 1
SHARD_PATTERN = "records-{shard:05d}-of-{count:05d}.arrayrecord"


def encode_record(image_bytes, caption, metadata=None, image_format="png"):
    """(encoded image bytes, caption str, JSON-able metadata, format name) -> entry bytes."""
    header = {"version": FORMAT_VERSION, "caption": caption, "metadata": metadata or {},
              "image_format": image_format}
    header_bytes = json.dumps(header, ensure_ascii=False).encode("utf-8")
    return struct.pack("<I", len(header_bytes)) + header_bytes + bytes(image_bytes)


def decode_record(data):
    """Entry bytes -> dict(caption, metadata, image_format, image_bytes, version).

    Raises ValueError naming the problem for a truncated header, bad JSON or another version.
    """
    if len(data) < 4:
        raise ValueError(f"record of {len(data)} bytes is shorter than its 4-byte header length")
    (header_len,) = struct.unpack_from("<I", data, 0)
    if 4 + header_len > len(data):
        raise ValueError(f"record header of {header_len} bytes runs past the record's end")
    header = json.loads(bytes(data[4:4 + header_len]).decode("utf-8"))
    if header.get("version") != FORMAT_VERSION:
        raise ValueError(f"record version {header.get('version')!r}, this reader reads "
                         f"{FORMAT_VERSION}")
    for key in ("caption", "image_format"):
        if key not in header:
            raise ValueError(f"record header lacks {key!r}")
    return dict(header, image_bytes=bytes(data[4 + header_len:]))


def encode_image(array, image_format="png", quality=95):
    """uint8 [H, W, 3] -> encoded image bytes."""
    buffer = io.BytesIO()
    options = {"quality": quality} if image_format in ("jpeg", "webp") else {}
    Image.fromarray(array).save(buffer, format=image_format.upper(), **options)
    return buffer.getvalue()


def shard_paths(directory):
    """The shards of a record set, in order; raises if none or some are missing."""
    directory = paths.path(directory)
    found = sorted(map(str, directory.glob("records-*-of-*.arrayrecord")))
    if not found:
        raise FileNotFoundError(f"no records-*-of-*.arrayrecord shards in {directory}; write "
                                "some with lidit_jax.data.convert or lidit_jax.data.shapes")
    count = int(found[0].rsplit("-of-", 1)[1].split(".")[0])
    expected = [str(directory / SHARD_PATTERN.format(shard=k, count=count))
                for k in range(count)]
    missing = sorted(set(expected) - set(found))
    if missing:
        raise FileNotFoundError(f"record set {directory} is incomplete: {len(missing)} of {count} "
                                f"shards missing, e.g. {missing[0]}; rerun the conversion")
    return expected


def write_records(directory, num_inputs, make_entry, *, records_per_shard=10000):
    """Writes entries for inputs 0..num_inputs-1 into sharded ArrayRecord files.

    make_entry(i) -> entry bytes (encode_record), or None to skip input i (bad input; the caller
    logs why). Complete shards already in `directory` are kept (resume). Returns (records,
    skipped) over the whole set, counting kept shards too.
    """
    directory = paths.path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    count = max(1, -(-num_inputs // records_per_shard))
    written = skipped = 0
    for shard in range(count):
        start, stop = shard * records_per_shard, min((shard + 1) * records_per_shard, num_inputs)
        final = directory / SHARD_PATTERN.format(shard=shard, count=count)
        if final.exists():
            reader = array_record_module.ArrayRecordReader(paths.local_copy(final))
            kept = reader.num_records()
            reader.close()
            written, skipped = written + kept, skipped + (stop - start - kept)
            continue
        with paths.local_output(final) as temporary:
            writer = array_record_module.ArrayRecordWriter(temporary, "group_size:1")
            for index in range(start, stop):
                entry = make_entry(index)
                if entry is None:
                    skipped += 1
                else:
                    writer.write(entry)
                    written += 1
            writer.close()
        logging.info("wrote %s", final)
    return written, skipped


class ArrayRecordSource:
    """Random access over a record set folder: len(), [i] -> entry bytes, locate(i)."""

    def __init__(self, directory):
        self.directory = str(directory)
        # Staged once per host when remote: ArrayRecord reads local files only.
        self.paths = [paths.local_copy(p) for p in shard_paths(directory)]
        self._starts = [0]
        for path in self.paths:
            reader = array_record_module.ArrayRecordReader(path)
            self._starts.append(self._starts[-1] + reader.num_records())
            reader.close()
        self._readers = {}

    def __len__(self):
        return self._starts[-1]

    def locate(self, index):
        """Global index -> (shard path, index within the shard)."""
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} outside {self.directory} ({len(self)} records)")
        lo, hi = 0, len(self.paths)
        while hi - lo > 1:  # Binary search over shard starts.
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self._starts[mid] <= index else (lo, mid)
        return self.paths[lo], index - self._starts[lo]

    def __getitem__(self, index):
        path, offset = self.locate(int(index))
        if path not in self._readers:
            self._readers[path] = array_record_module.ArrayRecordReader(
                path, "readahead_buffer_size:0")
        return self._readers[path].read([offset])[0]

    def caption(self, index):
        """Caption of record `index` (for the text cache); "" for a bad record, never trained on."""
        try:
            return images.check_caption(decode_record(self[index])["caption"])
        except ValueError:  # Includes images.BadRecord and bad JSON / UTF-8.
            return ""

    def __getstate__(self):
        # Readers hold file handles; worker processes open their own.
        return dict(self.__dict__, _readers={})

    def __repr__(self):
        return f"ArrayRecordSource({self.directory!r}, {len(self)} records)"
