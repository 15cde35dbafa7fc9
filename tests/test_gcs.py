"""`--workdir=gs://...` end to end against a local GCS emulator (benchmarks/gcs_emulator.py).

Every Google client is pointed at the emulator the standard way (`gcs_emulator.client_env`):
gcsfs, which etils.epath uses, google-cloud-storage, which tensorboardX uses, and tensorstore,
which Orbax writes arrays with. The emulator runs on a free localhost port for this module only.
"""
import http.client
import http.server
import json
import os
import pathlib
import re
import signal
import subprocess
import threading
import time
import urllib.parse

import numpy as np
import pytest

from benchmarks import gcs_emulator

from train_helpers import ROOT, TIMEOUT, TINY, child_env, command, read_events, restore_state

pytestmark = pytest.mark.slow

BUCKET = "lidit-test"
STEPS = 12
TRAIN = ("--config.checkpoint.every=4", "--config.logging.record_ids=True",
         "--config.train.sample_every=1000", "--config.train.log_every=2")


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The emulator's environment, also set in this process (Orbax and epath read it here)."""
    log = tmp_path_factory.mktemp("gcs") / "fake-gcs-server.log"
    with gcs_emulator.emulator(BUCKET, log) as url:
        env = gcs_emulator.client_env(url)
        with gcs_emulator.environment(env):
            yield env


def _env(gcs):
    return dict(child_env(), **gcs)


def _run(gcs, workdir, mode, *args):
    result = subprocess.run(command(workdir, mode, *args), cwd=ROOT, env=_env(gcs),
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, (f"--mode={mode} exited {result.returncode}:\n"
                                    f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def _logged_steps(path):
    from etils import epath
    path = epath.Path(path)
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_train_kill_resume_sample_export_on_gs(gcs, tiny_llm, compilation_cache, tmp_path,
                                               monkeypatch):
    from etils import epath

    monkeypatch.setenv("LIDIT_STAGING_DIR", str(tmp_path / "staging"))
    # The text cache in the bucket too: ArrayRecord shards are written through a local file and
    # staged back for reading. The seven children share the test run's compilation cache (local).
    args = (*TINY, f"--config.text.llms.smollm2.path={tiny_llm}",
            "--config.text.llms.smollm2.width=0",
            f"--config.text.cache_dir=gs://{BUCKET}/text_cache",
            f"--config.train.compilation_cache_dir={compilation_cache}")
    result = _run(gcs, f"gs://{BUCKET}/encode", "encode", *args)
    assert re.search(rf"text_cache=gs://{BUCKET}/text_cache/smollm2 records=64 written=64",
                     result.stdout), result.stdout

    local = tmp_path / "local"
    _run(gcs, local, "train", *args, *TRAIN, f"--config.train.steps={STEPS}")

    # Killed with SIGKILL mid-run, once the step-4 checkpoint is complete in the bucket (a long
    # run, so the kill cannot come after its end) ...
    workdir = f"gs://{BUCKET}/run"
    committed = epath.Path(workdir) / "checkpoints" / "4" / "commit_success.txt"
    with open(tmp_path / "run.log", "wb") as log:
        process = subprocess.Popen(command(workdir, "train", *args, *TRAIN,
                                           "--config.train.steps=1000"),
                                   cwd=ROOT, env=_env(gcs), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + TIMEOUT
    while not committed.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no complete step-4 checkpoint in the bucket:\n"
                        f"{(tmp_path / 'run.log').read_text(errors='replace')[-6000:]}")
        time.sleep(0.1)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL

    # ... resumes from the bucket and stops at step STEPS (the schedule is constant, so the
    # longer first run trained the same steps).
    result = _run(gcs, workdir, "train", *args, *TRAIN, f"--config.train.steps={STEPS}")
    resumed = re.search(r"resumed from step (\d+)", result.stderr)
    assert resumed and 4 <= int(resumed.group(1)) < STEPS, result.stderr[-3000:]

    state_local = restore_state(str(local), STEPS)
    state_gcs = restore_state(workdir, STEPS)
    assert list(state_gcs) == list(state_local) and len(state_local) > 10
    for path, leaf in state_local.items():
        np.testing.assert_array_equal(state_gcs[path], leaf, err_msg=path)

    run = epath.Path(workdir)
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == STEPS
    assert _logged_steps(run / "metrics.jsonl")[-1] == STEPS
    assert (run / "samples" / f"step_{STEPS:07d}.png").exists()
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    event_file = tmp_path / "events"
    event_file.write_bytes(events[-1].read_bytes())
    tags = {value.tag for event in read_events(event_file) for value in event.summary.value}
    assert "loss" in tags, tags

    # Inference modes read the EMA from the bucket and write back into it.
    result = _run(gcs, workdir, "sample", *args, "--prompts=a red circle")
    assert f"samples=1 output={workdir}/samples/cli" in result.stdout
    assert len(list((run / "samples" / "cli").glob("*.png"))) == 1
    result = _run(gcs, workdir, "export", *args)
    export = f"{workdir}/export/lidit_ema_step{STEPS}.safetensors"
    assert f"export={export}" in result.stdout
    assert epath.Path(export).stat().length > 1000
    # --mode=eval's scores, images and grid land in the bucket, not in a local "gs:" folder.
    result = _run(gcs, workdir, "eval", *args, "--benchmark=shapes", "--config.eval.num_prompts=4")
    assert result.stdout.strip().splitlines()[-1].endswith("num_images=4")
    for name in ("scores.json", "scores.md", "images.npz", "samples.png"):
        assert (run / "eval" / "shapes" / name).exists(), name
    assert not (pathlib.Path(ROOT) / "gs:").exists()



class _CountingProxy(http.server.ThreadingHTTPServer):
    """A plain HTTP proxy in front of the emulator that counts the request body bytes it
    forwards: what a client uploads, measured outside the client. The emulator's own address in
    its answers (the upload URL of a resumable upload) is rewritten to the proxy's, so every
    byte a client sends passes here."""

    daemon_threads = True

    def __init__(self, target):
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.target = urllib.parse.urlsplit(target)
        self.rewrite = (target.encode(), f"http://127.0.0.1:{self.server_port}".encode())
        self.uploaded = 0
        self.lock = threading.Lock()


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _forward(self):
        assert "chunked" not in self.headers.get("Transfer-Encoding", ""), "unsized upload"
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        with self.server.lock:
            self.server.uploaded += length
        target = self.server.target
        connection = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
        connection.request(self.command, self.path, body=body, headers=headers)
        response = connection.getresponse()
        data = response.read().replace(*self.server.rewrite)
        connection.close()
        self.send_response(response.status, response.reason)
        emulator, proxy = (url.decode() for url in self.server.rewrite)
        for key, value in response.getheaders():
            if key.lower() not in ("connection", "content-length", "transfer-encoding"):
                self.send_header(key, value.replace(emulator, proxy))
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            try:
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # The client stopped waiting (gcsfs runs two lookups and drops one).

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

    def log_message(self, *args):
        pass


@pytest.fixture
def counted_gcs(gcs, monkeypatch):
    """gcsfs through a _CountingProxy: new gcsfs clients in this test upload through it."""
    import gcsfs

    proxy = _CountingProxy(gcs["STORAGE_EMULATOR_HOST"])
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{proxy.server_port}")
    gcsfs.GCSFileSystem.clear_instance_cache()  # fsspec reuses clients made for the emulator.
    yield proxy
    gcsfs.GCSFileSystem.clear_instance_cache()
    proxy.shutdown()
    proxy.server_close()


def test_remote_log_uploads_each_line_once(counted_gcs):
    from etils import epath

    from lidit_jax.train import metrics

    path = f"gs://{BUCKET}/log_bytes/metrics.jsonl"
    record = {"loss": 0.1234567, "images_per_sec": 1234.5678, "step_time_sec": 0.0123456,
              "data_wait_fraction": 0.0123, "device_wait_fraction": 0.5678}
    writes, uploaded = 200, []
    log = metrics.JsonLines(path)
    for step in range(1, writes + 1):
        log.write([dict(record, step=step)])
        log.flush()  # One append per line, the worst case (the writer gathers lines otherwise).
        uploaded.append(counted_gcs.uploaded)
    log.close()
    resumed = metrics.JsonLines(path)  # A resumed run appends to the lines already there.
    resumed.write([dict(record, step=writes + 1)])
    resumed.close()

    assert _logged_steps(path) == list(range(1, writes + 2))
    size = epath.Path(path).stat().length
    # Each append sends its line and a fixed overhead (multipart headers, the compose request):
    # O(steps) bytes in all, measured 3.4 x the log's size. Rewriting the whole log at each write
    # sent sum(k * line) ~ writes / 2 * size: measured 100 x (3.0 MB for this 30 kB log).
    assert uploaded[-1] < 6 * size, (uploaded[-1], size)
    first_half, second_half = uploaded[writes // 2 - 1], uploaded[-1] - uploaded[writes // 2 - 1]
    assert second_half < 1.1 * first_half, (first_half, second_half)
