"""The image-caption record format (version 1) and its sharded ArrayRecord writer and reader.

One ArrayRecord entry is one record:
  4 bytes    little-endian uint32 length n of the header
  n bytes    UTF-8 JSON header {"version": 1, "caption": str, "metadata": {...},
             "image_format": "png" | "jpeg" | "webp" | ...}
  the rest   the encoded image file's bytes (decoded with PIL)
No pickle: any language with JSON and an image decoder reads it.

A record set is a folder of shards `records-00000-of-00004.arrayrecord`, ... written with one
record per chunk, uncompressed, each with its `.spans.npy` index (lidit_jax.data.shards: a record
is one ranged read, so a host reads its own records and nothing else). Shard k holds what inputs
[k * per_shard, (k + 1) * per_shard) produced, minus the skipped ones. Each shard is written to
a temporary file and published when complete, so an interrupted conversion resumes by skipping
complete shards. The folder may be local or `gs://` (lidit_jax.paths).

Written last, when every shard is there:
  manifest.json     {"format_version": 1, "shard_records": [records of shard k, ...]}: opening
                    the set reads this one file, not every shard.
  image_sizes.npy   int32 [records, 2] (height, width) from the image headers, (0, 0) where
                    unreadable: aspect-ratio bucketing (lidit_jax.data.batch_plan) reads no image.
A set without a manifest (written before it existed) is opened by counting every shard's
records, with a warning; `python -m lidit_jax.data.records DIR` writes it.
"""
import io
import json
import struct

import numpy as np
from absl import app, logging
from PIL import Image

from lidit_jax import paths
from lidit_jax.data import images, shards

FORMAT_VERSION = 1
SHARD_PATTERN = "records-{shard:05d}-of-{count:05d}.arrayrecord"
MANIFEST_FILE = "manifest.json"
IMAGE_SIZES_FILE = "image_sizes.npy"


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


def image_size(entry):
    """Entry bytes -> (height, width) from the image header only (no decode); (0, 0) if the
    record or its image header is unreadable."""
    try:
        width, height = Image.open(io.BytesIO(decode_record(entry)["image_bytes"])).size
        return height, width
    except Exception:  # noqa: BLE001 -- any failure means "unreadable"; bucketing leaves it out.
        return 0, 0


def entry_caption(entry):
    """Entry bytes -> its caption; "" for a bad record (never trained on)."""
    try:
        return images.check_caption(decode_record(entry)["caption"])
    except ValueError:  # Includes images.BadRecord and bad JSON / UTF-8.
        return ""


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
    """Writes entries for inputs 0..num_inputs-1 into sharded ArrayRecord files, then the
    manifest and the image sizes (see the module docstring).

    make_entry(i) -> entry bytes (encode_record), or None to skip input i (bad input; the caller
    logs why). Complete shards already in `directory` are kept (resume). Returns (records,
    skipped) over the whole set, counting kept shards too.
    """
    directory = paths.path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    count = max(1, -(-num_inputs // records_per_shard))
    shard_records, sizes = [], []
    skipped = 0
    for shard in range(count):
        start, stop = shard * records_per_shard, min((shard + 1) * records_per_shard, num_inputs)
        final = directory / SHARD_PATTERN.format(shard=shard, count=count)
        if final.exists():  # Resumed: the kept shard's sizes come from its image headers.
            kept = ArrayRecordSource.shard_entries(final)
            shard_sizes = [image_size(entry) for entry in kept]
        else:
            shard_sizes = []

            def entries():
                for index in range(start, stop):
                    entry = make_entry(index)
                    if entry is not None:
                        shard_sizes.append(image_size(entry))
                        yield entry

            shards.write_shard(final, entries())
            logging.info("wrote %s", final)
        shard_records.append(len(shard_sizes))
        sizes.extend(shard_sizes)
        skipped += stop - start - len(shard_sizes)
    write_manifest(directory, shard_records, np.array(sizes, np.int32).reshape(-1, 2))
    return sum(shard_records), skipped


def write_manifest(directory, shard_records, image_sizes=None):
    """Publishes manifest.json (and image_sizes.npy when given) for a complete record set."""
    directory = paths.path(directory)
    if image_sizes is not None:
        write_image_sizes(directory, image_sizes)
    paths.write_text_atomic(directory / MANIFEST_FILE, json.dumps(
        {"format_version": FORMAT_VERSION, "shard_records": [int(n) for n in shard_records]}))


def write_image_sizes(directory, image_sizes):
    """Publishes image_sizes.npy (int32 [records, 2]) in a record set folder, whole or not at
    all."""
    with paths.local_output(paths.path(directory) / IMAGE_SIZES_FILE) as temporary:
        with open(temporary, "wb") as f:
            np.save(f, np.asarray(image_sizes, np.int32).reshape(-1, 2))


def read_image_sizes(directory, num_records):
    """image_sizes.npy of a record set folder, or None if it is missing or not [num_records, 2]
    (written for other records)."""
    try:
        sizes = np.load(io.BytesIO((paths.path(directory) / IMAGE_SIZES_FILE).read_bytes()))
    except FileNotFoundError:
        return None
    return sizes if sizes.shape == (num_records, 2) else None


def _shards_and_counts(directory):
    """(shard paths, records per shard) from the manifest; without one, from every shard."""
    try:
        counts = json.loads((paths.path(directory) / MANIFEST_FILE).read_text())["shard_records"]
    except FileNotFoundError:
        counts = None
    if counts is not None:
        return [str(paths.path(directory) / SHARD_PATTERN.format(shard=k, count=len(counts)))
                for k in range(len(counts))], counts
    found = shard_paths(directory)
    logging.warning("record set %s has no %s: every process opens its %d shards to count their "
                    "records; write it once with `python -m lidit_jax.data.records "
                    "%s`", directory, MANIFEST_FILE, len(found), directory)
    return found, [shards.count_records(p) for p in found]


class ArrayRecordSource:
    """Random access over a record set folder: len(), [i] -> entry bytes, locate(i).

    Opening reads the manifest only; a record is one ranged read (lidit_jax.data.shards), through
    at most `max_open_shards` open shards per process.
    """

    def __init__(self, directory, max_open_shards=shards.MAX_OPEN_SHARDS):
        self.directory = str(directory)
        self.paths, counts = _shards_and_counts(directory)
        self._starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self._readers = shards.ShardReaders(max_open_shards)

    @staticmethod
    def shard_entries(shard):
        """Every entry of one shard, in order (the resumed writer's kept shards)."""
        readers = shards.ShardReaders(1)
        return [readers.read(shard, k) for k in range(shards.count_records(shard))]

    def __len__(self):
        return int(self._starts[-1])

    def locate(self, index):
        """Global index -> (shard path, index within the shard)."""
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} outside {self.directory} ({len(self)} records)")
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        return self.paths[shard], int(index - self._starts[shard])

    def __getitem__(self, index):
        return self._readers.read(*self.locate(int(index)))

    def caption(self, index):
        """Caption of record `index` (for the text cache); "" for a bad record, never trained on."""
        return entry_caption(self[index])

    def __repr__(self):
        return f"ArrayRecordSource({self.directory!r}, {len(self)} records)"


def main(argv):
    """`python -m lidit_jax.data.records DIR`: writes manifest.json for a record set made before
    manifests (counting every shard's records once)."""
    if len(argv) != 2:
        raise app.UsageError("usage: python -m lidit_jax.data.records RECORD_SET_FOLDER")
    found = shard_paths(argv[1])
    write_manifest(argv[1], [shards.count_records(p) for p in found])
    print(f"manifest={paths.path(argv[1]) / MANIFEST_FILE} shards={len(found)}")


if __name__ == "__main__":
    app.run(main)
