"""A sharded, resumable on-disk cache of per-record arrays (text states, VAE latents).

Layout of a cache directory:
  metadata.json                       what produced the arrays (encoder id, weights fingerprint,
                                      layer, template, preprocessing, ...), the record count and
                                      the shard size; a reader compares it with its config.
  shard-00000.arrayrecord, ...        shard k holds records [k * shard_size, (k+1) * shard_size),
                                      in index order, one ArrayRecord entry per record, with its
                                      .spans.npy index: a record is one ranged read
                                      (lidit_jax.data.shards).
  manifest.json                       {"num_shards": n}, published by the process that finds
                                      every shard there after writing its own: a reader opens
                                      a cache by reading it (and metadata.json), whatever the
                                      shard count, never by looking for each shard.
One entry: 4-byte little-endian header length, a UTF-8 JSON header
{"index": i, "arrays": {name: [dtype, shape], ...}} and the arrays' raw bytes in header order.
No pickle. A shard is written to a temporary file and published when complete, so a killed
writer leaves only whole shards, and a restarted one skips them: no duplicates, no gaps.
Directories may be local or `gs://` (lidit_jax.paths). A cache made before manifests is opened
by listing its shards, with a warning: running the same --mode=encode again writes it.
"""
import json
import struct

import ml_dtypes
import numpy as np
from absl import logging
from lidit_jax import paths
from lidit_jax.data import encode_order, shards

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
MANIFEST_FILE = "manifest.json"
SHARD_SIZE = 1024  # Records per shard; process p of P encodes shards p, p + P, ...
_DTYPES = {"bfloat16": ml_dtypes.bfloat16}


class CacheMismatch(ValueError):
    """The cache was made with settings other than the config's."""


def resolve(path, workdir):
    """A cache directory from the config (epath.Path): absolute or a URL, else inside the workdir."""
    return paths.resolve(path, workdir)


def _dtype(name):
    return np.dtype(_DTYPES.get(name, name))


def encode_entry(index, arrays):
    """Serialises {name: np.ndarray} for record `index` to bytes."""
    header = {"index": int(index),
              "arrays": {k: [str(v.dtype), list(v.shape)] for k, v in arrays.items()}}
    header_bytes = json.dumps(header).encode()
    body = b"".join(np.ascontiguousarray(v).tobytes() for v in arrays.values())
    return struct.pack("<I", len(header_bytes)) + header_bytes + body


def decode_entry(data):
    """Inverse of encode_entry: (index, {name: np.ndarray})."""
    (header_len,) = struct.unpack_from("<I", data, 0)
    header = json.loads(data[4:4 + header_len].decode())
    offset = 4 + header_len
    arrays = {}
    for name, (dtype_name, shape) in header["arrays"].items():
        dtype = _dtype(dtype_name)
        count = int(np.prod(shape))
        arrays[name] = np.frombuffer(data, dtype, count, offset).reshape(shape)
        offset += count * dtype.itemsize
    return header["index"], arrays


def shard_path(directory, shard):
    return paths.path(directory) / f"shard-{shard:05d}.arrayrecord"


def compare_metadata(saved, expected, what):
    """Raises CacheMismatch naming every field of `expected` that the saved metadata differs in."""
    differences = [f"{key}: cache has {saved.get(key)!r}, config wants {value!r}"
                   for key, value in expected.items() if saved.get(key) != value]
    if differences:
        raise CacheMismatch(f"{what} does not match the config: " + "; ".join(differences))


def write_cache(directory, num_records, encode_batch, metadata, *, shard_size=SHARD_SIZE,
                batch_size=64, process_index=0, process_count=1, progress=None):
    """Fills `directory` with the arrays `encode_batch` makes for records 0..num_records-1.

    encode_batch: list of record indices -> list of {name: np.ndarray}, one dict per index
      (consecutive batches of `batch_size`, in this thread), or `encode_order.Stages` (batches
      in any order, I/O overlapped with the device); either way record i lands at its index.
    metadata: JSON-able description of what produced the arrays; a directory already holding a
      cache with other metadata is refused (CacheMismatch), one with the same is resumed.
    Process p writes shards p, p + process_count, ... (the data-parallel split of encoding).
    Returns the number of records this process wrote (0 when everything was already there).
    """
    directory = paths.path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    full_metadata = dict(metadata, num_records=int(num_records), shard_size=int(shard_size),
                         format_version=FORMAT_VERSION)
    metadata_path = directory / METADATA_FILE
    if metadata_path.exists():
        compare_metadata(json.loads(metadata_path.read_text()), full_metadata,
                         f"existing cache {directory}")
    elif process_index == 0:
        paths.write_text_atomic(metadata_path, json.dumps(full_metadata, indent=1))

    num_shards = -(-num_records // shard_size)
    stages = (encode_batch if isinstance(encode_batch, encode_order.Stages)
              else encode_order.Stages.of_function(encode_batch, batch_size))
    written = 0
    for shard in range(process_index, num_shards, process_count):
        final = shard_path(directory, shard)
        if final.exists():
            continue
        start, stop = shard * shard_size, min((shard + 1) * shard_size, num_records)

        entries = (encode_entry(index, arrays) for index, arrays in
                   encode_order.encoded_in_order(range(start, stop), stages, progress=progress))
        written += shards.write_shard(final, entries)
        logging.info("cache %s: shard %d of %d complete", directory, shard + 1, num_shards)
    # The process whose last upload lands last sees every shard (listings are consistent).
    if len(_listed_shards(directory)) == num_shards:
        paths.write_text_atomic(directory / MANIFEST_FILE, json.dumps({"num_shards": num_shards}))
    return written


def _listed_shards(directory):
    """Indices of the shard files in `directory`: one listing, not a request per shard."""
    return {int(p.name[len("shard-"):-len(".arrayrecord")])
            for p in paths.path(directory).glob("shard-*.arrayrecord")}


class ArrayCache:
    """Random access to a complete cache: `cache[i]` -> {name: np.ndarray} of record i."""

    def __init__(self, directory, max_open_shards=shards.MAX_OPEN_SHARDS):
        directory = paths.path(directory)
        metadata_path = directory / METADATA_FILE
        if not metadata_path.exists():
            raise FileNotFoundError(f"no cache at {directory} (missing {METADATA_FILE}); "
                                    "run --mode=encode first")
        self.metadata = json.loads(metadata_path.read_text())
        self.directory = directory
        self.shard_size = self.metadata["shard_size"]
        self.num_records = self.metadata["num_records"]
        num_shards = -(-self.num_records // self.shard_size)
        try:
            manifest = json.loads((directory / MANIFEST_FILE).read_text())
        except FileNotFoundError:
            manifest = None
        if manifest is None:
            logging.warning("cache %s has no %s (made before manifests): listing its shards; run "
                            "the same --mode=encode again to write it", directory, MANIFEST_FILE)
            missing = sorted(set(range(num_shards)) - _listed_shards(directory))
            if missing:
                raise FileNotFoundError(f"cache {directory} is incomplete: shards {missing[:5]} "
                                        f"of {num_shards} missing; resume --mode=encode to finish "
                                        "it")
        elif manifest["num_shards"] != num_shards:
            raise ValueError(f"cache {directory}: {MANIFEST_FILE} lists {manifest['num_shards']} "
                             f"shards, {METADATA_FILE} implies {num_shards}; encode it again")
        self._readers = shards.ShardReaders(max_open_shards)

    def __len__(self):
        return self.num_records

    def check(self, expected_metadata):
        """Raises CacheMismatch naming each field that differs from `expected_metadata`."""
        compare_metadata(self.metadata, expected_metadata, f"cache {self.directory}")

    def __getitem__(self, index):
        if not 0 <= index < self.num_records:
            raise IndexError(f"record {index} outside cache of {self.num_records}")
        shard, offset = divmod(int(index), self.shard_size)
        stored_index, arrays = decode_entry(
            self._readers.read(shard_path(self.directory, shard), offset))
        if stored_index != index:
            raise ValueError(f"cache {self.directory} shard {shard} is corrupt: entry {offset} "
                             f"holds record {stored_index}, expected {index}")
        return arrays
