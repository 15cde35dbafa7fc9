"""Timing shared by the benchmarks: warm up every contender, then alternate their repeats.

Alternating (ours, reference, ours, reference, ...) in one process puts both under the same
background load, so the ratio stays fair on a shared machine even when absolute rates drift.
"""
import os
import time


def interleaved_seconds(contenders, repeats):
    """{name: fn()} -> {name: best seconds of one call}, after one warm-up call of each.

    The warm-up absorbs compilation (jit), allocator and thread-pool start-up. The minimum is
    reported: on a shared machine every other statistic measures the neighbours' load.
    """
    for fn in contenders.values():
        fn()
    best = {name: float("inf") for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def load_average():
    """The 1-minute load average (runnable processes), to report beside every measurement."""
    return os.getloadavg()[0]


def smoke_and_repeats_main(doc, run, smoke_help):
    """The command line of a benchmark whose `run(smoke, repeats)` yields JSON records."""
    import argparse
    import json
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help=smoke_help)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for record in run(args.smoke, args.repeats):
        print(json.dumps(record))
