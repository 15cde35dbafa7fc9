"""Timing shared by the benchmarks: warm up every contender, then alternate their repeats.

Alternating (ours, reference, ours, reference, ...) puts both under the same background load, so
the ratio stays fair on a shared machine even when absolute rates drift. Contenders from
different frameworks each run in a process of their own (`interleaved_seconds_apart`): in one
process, after PyTorch's step has run, XLA:CPU's step was ~30 % slower than alone (glibc's
allocator state; docs/performance.md), which biased every same-process ratio against ours. Even
apart, the first step after the other framework's turn runs slow (PixArt shape: 9.6 s, then 7.9,
against 7.4 back to back; not threads spinning: a 2 s pause does not help), so each turn runs a
few calls back to back, as a training run's steps do, and the best call counts.

    python -m benchmarks.timing --worker=MODULE:FACTORY --kwargs=JSON

is the worker side: it calls `FACTORY(**kwargs)` -> (fn, info), prints {"ready": info} and then
times one `fn()` per "run" line on stdin, printing {"seconds": s}; an empty line ends it.
"""
import argparse
import importlib
import json
import os
import subprocess
import sys
import time


def _timed(fn):
    def seconds():
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    return seconds


def _best_of_alternation(timers, repeats, calls_per_turn=1):
    """{name: () -> seconds} -> {name: best call}, after one warm-up call of each; `repeats`
    rounds in which each contender makes `calls_per_turn` calls in a row.

    The warm-up absorbs compilation (jit), allocator and thread-pool start-up. The minimum is
    reported: on a shared machine every other statistic measures the neighbours' load.
    """
    for timer in timers.values():
        timer()
    best = {name: float("inf") for name in timers}
    for _ in range(repeats):
        for name, timer in timers.items():
            best[name] = min([best[name]] + [timer() for _ in range(calls_per_turn)])
    return best


def interleaved_seconds(contenders, repeats):
    """{name: fn()} -> {name: best seconds of one call}, all in this process (one framework)."""
    return _best_of_alternation({name: _timed(fn) for name, fn in contenders.items()}, repeats)


class _Worker:
    """One contender in its own Python process, driven line by line over its stdin/stdout."""

    def __init__(self, factory, kwargs, environ):
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.timing", f"--worker={factory}",
             f"--kwargs={json.dumps(kwargs)}"],
            cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=environ)
        self.info = self._reply("ready")

    def _reply(self, key):
        # Libraries may print to stdout too; the protocol's lines are JSON objects with `key`.
        for line in self.process.stdout:
            if line.startswith("{"):
                message = json.loads(line)
                if key in message:
                    return message[key]
        raise RuntimeError(f"benchmark worker {self.process.args[3]} exited "
                           f"({self.process.wait()}) before answering {key!r}; see its stderr")

    def seconds(self):
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        return self._reply("seconds")

    def close(self):
        if self.process.poll() is None:
            self.process.stdin.write("\n")
            self.process.stdin.close()
        self.process.wait()


def interleaved_seconds_apart(contenders, repeats, calls_per_turn=3, environ=None,
                              smoke=False):
    """{name: ("module:factory", kwargs)} -> ({name: best seconds}, {name: factory's info}).

    Each contender is built by `factory(**kwargs)` -> (fn, info: JSON-able dict) in a worker
    process of its own, every one with the same `environ` (default: this process's); the
    workers start one after the other (set-up and compilation are not timed), then take turns
    of `calls_per_turn` calls: only one runs at a time, the others wait on their stdin.
    smoke=True builds them all in this process instead, one call a turn (`environ` unused): a
    smoke run checks that every contender runs and reports, its timings are not read, and one
    process loads a model the contenders share once (`functools.cache` on their loaders).
    """
    if smoke:
        built = {name: _factory(factory)(**kwargs)
                 for name, (factory, kwargs) in contenders.items()}
        best = _best_of_alternation({name: _timed(fn) for name, (fn, _) in built.items()},
                                    repeats)
        return best, {name: info for name, (_, info) in built.items()}
    workers = {}
    try:
        for name, (factory, kwargs) in contenders.items():
            workers[name] = _Worker(factory, kwargs, environ)
        best = _best_of_alternation({name: w.seconds for name, w in workers.items()}, repeats,
                                    calls_per_turn)
        return best, {name: w.info for name, w in workers.items()}
    finally:
        for worker in workers.values():
            worker.close()


def load_average():
    """The 1-minute load average (runnable processes), to report beside every measurement."""
    return os.getloadavg()[0]


def smoke_and_repeats_main(doc, run, smoke_help):
    """The command line of a benchmark whose `run(smoke, repeats)` yields JSON records."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help=smoke_help)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for record in run(args.smoke, args.repeats):
        print(json.dumps(record))


def _factory(name):
    """"module:function" -> the function."""
    module, function = name.split(":")
    return getattr(importlib.import_module(module), function)


def _serve(factory, kwargs):
    fn, info = _factory(factory)(**kwargs)
    timed = _timed(fn)
    print(json.dumps({"ready": info}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        print(json.dumps({"seconds": timed()}), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="a benchmark contender's worker process")
    parser.add_argument("--worker", required=True, help="module:factory")
    parser.add_argument("--kwargs", default="{}", help="the factory's keyword arguments, JSON")
    args = parser.parse_args()
    _serve(args.worker, json.loads(args.kwargs))
