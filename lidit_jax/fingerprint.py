"""The one fingerprint of frozen weights (LLMs, VAEs): what caches and checkpoints compare.

The fingerprint is the sha256 over the files' names, sizes and full bytes, so it is the same on
every host holding the same files, and any re-quantization, fine-tune, edited config or
truncation changes it. Reading every byte is the cost: LI-DiT-10B's two 8B LLMs are 31 GB, which
every process of every start used to hash. So each result is kept in a small record on the host
(<cache dir>/fingerprints/, paths.cache_dir), keyed by each file's path, size, mtime,
ctime and inode; a later call whose files all stat the same returns the record after one stat per
file. A write to a file changes its mtime and ctime (tools that restore the mtime, cp -p or rsync
-t, still change the ctime; a file replaced by another changes the inode), so changed weights are
hashed again. A remount that renumbers inodes (gcsfuse) costs one more full read.
"""
import hashlib
import json
import os
import time

from absl import logging

from lidit_jax import paths

CHUNK_BYTES = 1 << 24  # The host holds one 16 MiB chunk at a time (weights can be tens of GB).
# A file modified this recently is hashed but not recorded: a second write within the
# filesystem's timestamp granularity (2 s on FAT, a kernel tick on ext4) would leave its mtime
# unchanged, as git's "racy clean" entries.
RECENT_SECONDS = 2.0
RECORD_FORMAT = 1


def file_fingerprint(files):
    """sha256 hex over the names, sizes and full bytes of `files`, in order; from this host's
    record when no file changed since it was hashed (see the module docstring)."""
    files = [os.fspath(p) for p in files]
    stats = [_stat_key(p) for p in files]
    record_path = _record_path(stats)
    recorded = _read_record(record_path)
    if recorded is not None and recorded.get("files") == stats:
        return recorded["fingerprint"]
    started = time.time_ns()
    total = sum(stat[1] for stat in stats)
    logging.info("fingerprinting %.2f GB of weights (%s): one full read, recorded in %s for later "
                 "starts", total / 1e9, ", ".join(os.path.basename(p) for p in files),
                 record_path)
    fingerprint = _hash_files(files)
    logging.info("fingerprinted %.2f GB in %.1f s", total / 1e9, (time.time_ns() - started) / 1e9)
    settled = all(stat[2] < started - RECENT_SECONDS * 1e9 for stat in stats)
    if settled and [_stat_key(p) for p in files] == stats:  # Unchanged while it was read.
        _write_record(record_path, {"format": RECORD_FORMAT, "files": stats,
                                    "fingerprint": fingerprint})
    return fingerprint


def _hash_files(files):
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{os.path.basename(path)}:{os.path.getsize(path)};".encode())
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                digest.update(chunk)
    return digest.hexdigest()


def _stat_key(path):
    """[path, size, mtime ns, ctime ns, inode] (a list, as the JSON record stores it); the stat
    follows links, whose own name the hash uses (a Hugging Face hub snapshot links
    model.safetensors to a blob named by its hash)."""
    stat = os.stat(path)
    return [os.path.abspath(path), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]


def _record_path(stats):
    name = hashlib.sha256("\0".join(stat[0] for stat in stats).encode()).hexdigest()[:32]
    return paths.cache_dir() / "fingerprints" / f"{name}.json"


def _read_record(record_path):
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):  # None yet, or cut off: hash again.
        return None
    return record if record.get("format") == RECORD_FORMAT else None


def _write_record(record_path, record):
    try:
        paths.write_text_atomic(record_path, json.dumps(record))
    except OSError as error:  # A read-only home: correct, only slower at the next start.
        logging.warning("cannot record the weights fingerprint in %s (%s); the next start "
                        "reads the weights again (set $LIDIT_JAX_CACHE to a writable folder)",
                        record_path, error)
