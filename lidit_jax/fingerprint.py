"""The one fingerprint of frozen weights (LLMs, VAEs): what caches and checkpoints compare."""
import hashlib
import os

CHUNK_BYTES = 1 << 24  # The host holds one 16 MiB chunk at a time (weights can be tens of GB).


def file_fingerprint(paths):
    """sha256 hex over the names, sizes and full bytes of `paths`, in order.

    Any re-quantization, fine-tune, edited config or truncation changes it.
    """
    digest = hashlib.sha256()
    for path in map(str, paths):
        digest.update(f"{os.path.basename(path)}:{os.path.getsize(path)};".encode())
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                digest.update(chunk)
    return digest.hexdigest()
