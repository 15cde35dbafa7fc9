"""Weights fingerprints: the sha256 of names, sizes and bytes as every cache and checkpoint
recorded it, read once per file state on a host; a repeat start reads no weights, a changed byte
is seen however the file was changed."""
import hashlib
import os
import shutil
import time

import numpy as np
import pytest

from lidit_jax.fingerprint import file_fingerprint
from lidit_jax import paths

SIZE = 8 << 20  # A full read stands far out from the record's few hundred bytes.
HOUR_AGO = time.time() - 3600


@pytest.fixture(autouse=True)
def record_dir(tmp_path, monkeypatch):
    """The fingerprint records go into this test's folder, never the user's cache."""
    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / "fingerprints"


def _weights(folder, name="model.safetensors", seed=0, mtime=HOUR_AGO):
    path = folder / name
    path.write_bytes(np.random.default_rng(seed).bytes(SIZE))
    os.utime(path, (mtime, mtime))
    return path


def _reference(files):
    """The fingerprint's definition (unchanged since the first cache was written)."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}:{path.stat().st_size};".encode() + path.read_bytes())
    return digest.hexdigest()


def _bytes_read(fn):
    """(fn(), bytes this process read through read() syscalls meanwhile: /proc/self/io)."""
    def rchar():
        with open("/proc/self/io") as f:
            return int(next(line for line in f if line.startswith("rchar:")).split()[1])
    before = rchar()
    result = fn()
    return result, rchar() - before


def test_fingerprint_is_the_sha256_of_names_sizes_and_bytes(tmp_path):
    """The value caches and checkpoints already hold: recording it changed no fingerprint."""
    files = [_weights(tmp_path, "config.json", seed=1), _weights(tmp_path)]
    assert file_fingerprint(files) == _reference(files)
    assert file_fingerprint(files) == _reference(files)  # From the record.


def test_a_repeat_start_reads_no_weights(tmp_path, record_dir):
    path = _weights(tmp_path)
    first, read = _bytes_read(lambda: file_fingerprint([path]))
    assert read >= SIZE
    again, read = _bytes_read(lambda: file_fingerprint([path]))
    assert again == first and read < 64 << 10  # The record (a few hundred bytes), not 8 MiB.
    assert [p.suffix for p in record_dir.iterdir()] == [".json"]


def test_a_file_written_just_now_is_read_every_time(tmp_path):
    """A second write within the filesystem's timestamp granularity could leave the mtime
    as it was, so a fresh file is never taken from a record."""
    path = _weights(tmp_path, mtime=time.time())
    for _ in range(2):
        _, read = _bytes_read(lambda: file_fingerprint([path]))
        assert read >= SIZE


def test_a_changed_byte_is_seen(tmp_path):
    path = _weights(tmp_path)
    original = file_fingerprint([path])
    stat = path.stat()

    with open(path, "r+b") as f:  # Same size, one byte in the middle.
        f.seek(SIZE // 2)
        byte = f.read(1)
        f.seek(SIZE // 2)
        f.write(bytes([byte[0] ^ 1]))
    changed = file_fingerprint([path])
    assert changed != original and changed == _reference([path])

    # As `cp -p` or `rsync -t` leave it: the old mtime back; the ctime still tells.
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_mtime_ns == stat.st_mtime_ns
    assert file_fingerprint([path]) == changed

    # Replaced by another file of the same size and mtime: another inode (and ctime).
    other = _weights(tmp_path, "other.bin", seed=2)
    os.utime(other, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    shutil.move(other, path)
    assert file_fingerprint([path]) == _reference([path]) not in (original, changed)
