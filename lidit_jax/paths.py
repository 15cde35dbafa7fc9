"""One path type for local folders and `gs://` buckets: `etils.epath.Path` (what Orbax uses).

Every file lidit_jax writes or reads (the workdir, config.json, checkpoints, metrics.jsonl,
TensorBoard events, samples, exports, the text and latent caches, ArrayRecord inputs) goes
through `path()`, so `--workdir=gs://BUCKET/run` and `--workdir=runs/demo` take the same code.
`gs://` goes through gcsfs (epath's backend when TensorFlow is absent), TensorBoard events
through google-cloud-storage (tensorboardX) and Orbax's arrays through tensorstore; all three
honour the standard emulator variables (STORAGE_EMULATOR_HOST, TENSORSTORE_GCS_HTTP_URL with
GOOGLE_AUTH_TOKEN_FOR_TESTING), see docs/launch.md "Run against the GCS emulator".

Two things object stores lack, handled here once:
  - ArrayRecord's C++ writer opens local files only (`ArrayRecordWriter("gs://...")` returns
    `ok() == False`), so `local_output` writes into a local temporary file and uploads it when
    complete. Shards are read by byte range (`read_range`: one bounded GET per record, see
    lidit_jax/data/shards.py); `local_copy` downloads a whole file once per host into
    LIDIT_STAGING_DIR (default /tmp/lidit_staging), for files read whole and shards written
    before range reads.
  - No rename and no append: `local_output` publishes a finished file with one upload (a GCS
    object appears whole or not at all) and `write_text_atomic` writes a whole object; logs are
    rewritten whole (lidit_jax.train.metrics).
"""
import contextlib
import hashlib
import os
import pathlib
import shutil
import tempfile

import fsspec
from etils import epath

REMOTE_PREFIXES = ("gs://",)
STAGING_ENV = "LIDIT_STAGING_DIR"
CACHE_ENV = "LIDIT_JAX_CACHE"  # Overrides the cache directory (default ~/.cache/lidit_jax).


def cache_dir():
    """This machine's cache of assembled model files (text/models.py) and weights fingerprints
    (fingerprint.py): $LIDIT_JAX_CACHE, else ~/.cache/lidit_jax. Always local."""
    return pathlib.Path(os.environ.get(CACHE_ENV) or pathlib.Path.home() / ".cache" / "lidit_jax")


def path(p):
    """str | PathLike -> epath.Path; local paths made absolute, URLs left as they are."""
    if is_remote(p):
        return epath.Path(os.fspath(p))
    return epath.Path(os.path.abspath(os.fspath(p)))


def is_remote(p):
    return os.fspath(p).startswith(REMOTE_PREFIXES)


def resolve(p, workdir):
    """A configured path: absolute local paths and URLs as given, relative ones inside `workdir`."""
    if is_remote(p) or os.path.isabs(os.fspath(p)):
        return path(p)
    return path(workdir) / os.fspath(p)


def write_text_atomic(target, text):
    """Writes the whole file at once: readers see the old or the new content, never a part."""
    target = path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(target):
        target.write_text(text)  # One upload: the object is replaced whole.
        return
    temporary = epath.Path(f"{target}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, target)


def staging_root():
    return epath.Path(os.environ.get(STAGING_ENV) or os.path.join(tempfile.gettempdir(),
                                                                  "lidit_staging"))


def local_copy(p):
    """A local filename holding the bytes of `p`: `p` itself when local, else a staged copy.

    The copy is made once per host (kept while its size matches the object's) and renamed into
    place when complete, so concurrent processes on one host neither duplicate nor tear it.
    """
    if not is_remote(p):
        return os.fspath(p)
    source = path(p)
    key = hashlib.sha256(os.fspath(source).encode()).hexdigest()[:16]
    local = staging_root() / key / source.name
    size = source.stat().length
    if local.exists() and os.path.getsize(local) == size:
        return os.fspath(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    temporary = f"{local}.{os.getpid()}.tmp"
    with source.open("rb") as src, open(temporary, "wb") as dst:
        shutil.copyfileobj(src, dst, length=1 << 24)
    os.replace(temporary, local)
    return os.fspath(local)


def read_range(p, start=0, stop=None):
    """Bytes [start, stop) of `p` (stop None: to the end) in one request (a ranged GET for
    `gs://`; unlike `path(p).read_bytes()`, no metadata request first), nothing more."""
    if stop is not None and stop <= start:
        return b""
    if not is_remote(p):
        with open(os.fspath(p), "rb") as f:
            f.seek(start)
            return f.read() if stop is None else f.read(stop - start)
    filesystem, name = fsspec.core.url_to_fs(os.fspath(p))  # gcsfs, as epath uses; cached.
    return filesystem.cat_file(name, start=start or None, end=stop)


@contextlib.contextmanager
def local_output(target):
    """Yields a local filename to write `target` into; publishes it only when the block succeeds.

    Local targets: a temporary file beside it, renamed (atomic). Remote: a local temporary file,
    uploaded in one request. A failed or killed writer leaves nothing under the final name.
    """
    target = path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not is_remote(target):
        temporary = f"{target}.{os.getpid()}.tmp"
        try:
            yield temporary
            os.replace(temporary, target)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)
        return
    with tempfile.TemporaryDirectory(prefix="lidit_upload_") as folder:
        temporary = os.path.join(folder, target.name)
        yield temporary
        upload(temporary, target)


def upload(local, target):
    """Copies a local file, or a folder recursively, to `target` (local or remote)."""
    target = path(target)
    if os.path.isdir(local):
        for folder, _, names in os.walk(local):
            for name in names:
                file = os.path.join(folder, name)
                upload(file, target / os.path.relpath(file, local))
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(local, "rb") as src, target.open("wb") as dst:
        shutil.copyfileobj(src, dst, length=1 << 24)
