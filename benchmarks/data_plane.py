"""Data plane against the GCS emulator: does each host read only its share, at any shard count?

    python -m benchmarks.data_plane [--smoke]

A record set (shards of small PNG records in aspect-ratio buckets) and its text cache
(bf16 states of varying length, text.cache's layout) in a fake-gcs-server bucket; every process
reaches the emulator through its own byte-counting HTTP proxy (`CountingProxy`), so what is
counted is what crossed the wire, whatever client read it. Four figures:
  1. bytes read at start (opening the record set and the text cache, planning the buckets) by
     each of 2 processes, over its share of one epoch's bytes;
  2. bytes read over one epoch (Grain, 2 workers a process, the text states looked up in the
     workers) over its share: the payload of the records and text entries of the rows it
     loaded (the epoch's rows of this process, plus the few Grain reads ahead past its end;
     target <= 1.1);
  3. seconds and requests to open a text cache and a record set of 64 and of 512 shards
     (target: the same at both counts);
  4. the training thread's share of a step spent waiting for data (`data_wait_fraction` as the
     train loop computes it) with the lookups in the Grain workers, against the old way (lookup,
     padding and stacking in the training thread after the batch arrives), over a simulated
     step of STEP_SECONDS.
Prints one JSON record per figure. Shard sizes are tiny so it runs in minutes on 2 shared cores.
"""
import argparse
import http.client
import http.server
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import ml_dtypes  # noqa: E402
from absl import flags  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.gcs_emulator import client_env, emulator  # noqa: E402
from configs import common  # noqa: E402
from lidit_jax.data import array_cache, pipeline, records  # noqa: E402
from lidit_jax.text import cache as text_cache  # noqa: E402

BUCKET = "lidit-bench"
BUCKETS = "16x32,32x16,24x24"
STEP_SECONDS = 0.05
WIDTH = 64  # Text state width (a tiny LLM's).
MAX_LENGTH = 32
COUNT_PATH = "/__counted_bytes"


# ---- The emulator and the counting proxy -------------------------------------------------------
def use_endpoint(url):
    """Points this process's GCS clients at `url`, dropping the clients made for another."""
    os.environ.update(client_env(url))  # Before gcsfs is imported: it reads one at import.
    import gcsfs
    from etils.epath import backend

    gcsfs.GCSFileSystem.clear_instance_cache()
    backend.fsspec_backend._get_filesystem.cache_clear()


class CountingProxy:
    """HTTP proxy to `upstream` counting the response body bytes it delivers and the requests.

    Bodies are streamed: a client that stops reading early is charged what it received.
    `paths` lists each request's method and unquoted path, in order, since the last reset.
    GET COUNT_PATH answers {"bytes": ..., "requests": ...} (for a client in another process).
    """

    def __init__(self, upstream):
        parsed = urllib.parse.urlparse(upstream)
        self.bytes = self.requests = 0
        self.paths = []
        lock, proxy = threading.Lock(), self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()
                # Headers and body go out in separate writes: without this, Nagle and the
                # client's delayed ACK add 40 ms to every request.
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def log_message(self, *args):
                pass

            def _reply(self, status, body, headers=()):
                self.send_response(status)
                for key, value in headers:
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _forward(self):
                if self.path == COUNT_PATH:
                    return self._reply(200, json.dumps(proxy.counts()).encode())
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "connection")}
                connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=120)
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                with lock:
                    proxy.requests += 1
                    proxy.paths.append(f"{self.command} {urllib.parse.unquote(self.path)}")
                data = response.read()  # Small test objects: whole, then sent in pieces.
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value.replace(upstream, proxy.url))
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    for start in range(0, len(data) if self.command != "HEAD" else 0, 16384):
                        self.wfile.write(data[start:start + 16384])
                        with lock:
                            proxy.bytes += len(data[start:start + 16384])
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True
                connection.close()

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def counts(self):
        return {"bytes": self.bytes, "requests": self.requests}

    def reset(self):
        self.bytes = self.requests = 0
        self.paths = []

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def proxy_counts(url):
    """The counts of the proxy at `url` (from any process)."""
    with urllib.request.urlopen(url + COUNT_PATH, timeout=30) as response:
        return json.loads(response.read())


# ---- The data set ------------------------------------------------------------------------------
def _png(index):
    height, width = [(16, 32), (32, 16), (24, 24)][index % 3]
    rng = np.random.default_rng(index)
    return records.encode_image(rng.integers(0, 255, (height, width, 3), np.uint8), "png")


def _text_entry(index):
    rng = np.random.default_rng(index)
    length = 4 + index % (MAX_LENGTH - 4)
    return {"states": rng.normal(size=(length, WIDTH)).astype(ml_dtypes.bfloat16),
            "prompt_mask": np.arange(length) >= 1}


def write_data(root, num_shards, per_shard):
    """A record set and its text cache (text.cache's layout for an LLM "llm") under `root`."""
    num = num_shards * per_shard
    records.write_records(f"{root}/records", num,
                          lambda i: records.encode_record(_png(i), f"record {i}"),
                          records_per_shard=per_shard)
    write_text_cache(f"{root}/text/llm", num, per_shard)
    array_cache.write_cache(f"{root}/text/llm/empty", 1, lambda ids: [_text_entry(0)],
                            text_cache.FORMAT_METADATA)
    return num


def write_text_cache(directory, num, shard_size):
    array_cache.write_cache(directory, num, lambda ids: [_text_entry(i) for i in ids],
                            text_cache.FORMAT_METADATA, shard_size=shard_size,
                            batch_size=shard_size)


def payload_bytes(num):
    """(bytes of each record, bytes of its text entry): what a reader of it needs."""
    return (np.array([len(records.encode_record(_png(i), f"record {i}")) for i in range(num)]),
            np.array([len(array_cache.encode_entry(i, _text_entry(i))) for i in range(num)]))


# ---- One process of the two ------------------------------------------------------------------
def _data_config(root, workers):
    config = common.get_config().data
    config.update(source="arrayrecord", path=f"{root}/records", buckets=BUCKETS,
                  num_workers=workers, image_size=32)
    return config


class _LoggedFields(text_cache.CachedTextFields):
    """CachedTextFields that also notes each record it loads (in whichever worker) in a file:
    the rows Grain reads ahead past the epoch count in the share they are read for."""

    def __init__(self, readers, log_dir):
        super().__init__(readers)
        self.log_dir = log_dir

    def __call__(self, record_id, caption_dropped):
        with open(os.path.join(self.log_dir, f"loaded-{os.getpid()}.txt"), "a") as f:
            f.write(f"{record_id} {int(caption_dropped)}\n")
        return super().__call__(record_id, caption_dropped)


def run_process(root, process_index, process_count, batch, workers, proxy_url, log_dir):
    """Start + one epoch in one process; returns its bytes, the records of the batches it
    took and of every row it loaded (JSON-able)."""
    use_endpoint(proxy_url)
    reader = text_cache.CachedTextStates(f"{root}/text/llm", MAX_LENGTH)
    iterator = pipeline.make_train_iterator(
        _data_config(root, workers), global_batch_size=batch, seed=0,
        process_index=process_index, process_count=process_count,
        record_transform=_LoggedFields([reader], log_dir))
    start = proxy_counts(proxy_url)
    steps = iterator.loader.plan.batches_per_epoch
    taken = [next(iterator)["record_id"].tolist() for _ in range(steps)]
    iterator.close()
    epoch = proxy_counts(proxy_url)
    loaded = [[int(x) for x in line.split()] for name in os.listdir(log_dir)
              for line in open(os.path.join(log_dir, name)).read().splitlines()]
    return {"start_bytes": start["bytes"], "epoch_bytes": epoch["bytes"] - start["bytes"],
            "taken": [i for row in taken for i in row], "loaded": loaded}


def data_wait_fraction(root, batch, steps, in_workers):
    """(The training thread's waiting share of (wait + STEP_SECONDS) per step, the share of it
    spent on text lookups, padding and stacking there)."""
    reader = text_cache.CachedTextStates(f"{root}/text/llm", MAX_LENGTH)
    transform = text_cache.CachedTextFields([reader]) if in_workers else None
    iterator = pipeline.make_train_iterator(_data_config(root, 2), global_batch_size=batch,
                                            seed=1, process_index=0, process_count=1,
                                            record_transform=transform)
    next(iterator)  # Worker start-up is not a step.
    waited = looked_up = 0.0
    for _ in range(steps):
        started = time.perf_counter()
        local = next(iterator)
        if not in_workers:  # What train/inputs.py did before: lookup in the training thread.
            lookup_started = time.perf_counter()
            reader.lookup(local["record_id"], local["caption_dropped"])
            looked_up += time.perf_counter() - lookup_started
        waited += time.perf_counter() - started
        time.sleep(STEP_SECONDS)  # The device step (asynchronous on an accelerator).
    iterator.close()
    total = waited + steps * STEP_SECONDS
    return waited / total, looked_up / total


def open_cost(directory, kind, proxy):
    """(seconds, requests) to open a text cache or a record set at `directory`."""
    proxy.reset()
    started = time.perf_counter()
    (array_cache.ArrayCache if kind == "cache" else records.ArrayRecordSource)(directory)
    return time.perf_counter() - started, proxy.requests


# ---- Main ------------------------------------------------------------------------------------
def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    flags.FLAGS.mark_as_parsed()  # Grain's workers read absl flags (their defaults here).
    if args.child:
        print(json.dumps(run_process(**json.loads(args.child))))
        return
    shards, per_shard, batch, wait_steps = (64, 12, 8, 30) if not args.smoke else (64, 3, 4, 5)
    with emulator(BUCKET) as url:
        proxy = CountingProxy(url)
        use_endpoint(proxy.url)
        root = f"gs://{BUCKET}/set"
        num = write_data(root, shards, per_shard)
        record_bytes, text_bytes = payload_bytes(num)
        # 1, 2: two processes, each behind its own counting proxy.
        proxies = [CountingProxy(url) for _ in range(2)]
        log_dirs = [tempfile.mkdtemp(prefix=f"data_plane_{p}_") for p in range(2)]
        children = [subprocess.Popen(
            [sys.executable, "-m", "benchmarks.data_plane", "--child", json.dumps(dict(
                root=root, process_index=p, process_count=2, batch=batch, workers=2,
                proxy_url=proxies[p].url, log_dir=log_dirs[p]))],
            env=dict(os.environ, **client_env(proxies[p].url), JAX_PLATFORMS="cpu"),
            stdout=subprocess.PIPE, text=True) for p in range(2)]
        results = [json.loads(child.communicate(timeout=900)[0].strip().splitlines()[-1])
                   for child in children]
        for p, result in enumerate(results):
            # A dropped caption's row reads the empty prompt's entry, not its own.
            share = sum(int(record_bytes[i]) + (0 if dropped else int(text_bytes[i]))
                        for i, dropped in result["loaded"])
            print(json.dumps({"name": "bytes", "process": p, "records": len(result["taken"]),
                              "records_loaded": len(result["loaded"]),
                              "epoch_share": len(result["taken"]) / num,
                              "share_bytes": share, "start_bytes": result["start_bytes"],
                              "epoch_bytes": result["epoch_bytes"],
                              "start_ratio": result["start_bytes"] / share,
                              "epoch_ratio": result["epoch_bytes"] / share, "target": 1.1}))
        # 3: open cost at 64 and 512 shards (one record a shard: only the count grows).
        for count in (64, 512):
            directory = f"gs://{BUCKET}/open{count}"
            write_text_cache(f"{directory}/cache", count, 1)
            records.write_records(f"{directory}/records", count,
                                  lambda i: records.encode_record(_png(i), "x"),
                                  records_per_shard=1)
            for kind, sub in (("cache", "cache"), ("records", "records")):
                seconds, requests = min(open_cost(f"{directory}/{sub}", kind, proxy)
                                        for _ in range(3))
                print(json.dumps({"name": "open", "kind": kind, "shards": count,
                                  "seconds": seconds, "requests": requests}))
        # 4: the training thread's wait, lookups in the workers vs in the training thread.
        for arm in ("training_thread", "workers"):
            wait, lookup = data_wait_fraction(root, batch, wait_steps, arm == "workers")
            print(json.dumps({"name": "data_wait_fraction", "lookups_in": arm,
                              "step_seconds": STEP_SECONDS, "data_wait_fraction": wait,
                              "text_lookup_fraction": lookup}))
        proxy.close()
        for p in proxies:
            p.close()


if __name__ == "__main__":
    main()
