"""How `--mode=encode` feeds the device: batches by length, I/O overlapped, results in index order.

An encoder is three `Stages` that run at the same time:
  prepare   reader thread: a window of record indices -> its batches [(indices, inputs), ...] in
            any order that covers each index once (records read, captions tokenized and sorted
            by length, images decoded and resized)
  compute   the caller's thread: a batch's inputs -> device arrays. JAX dispatch returns before
            the device finishes, so this thread is soon free to dispatch the next batch
  finish    writer thread: (indices, device arrays) -> [{name: np.ndarray} per index]
            (device_get, trimming to real tokens)
Queues are bounded: the reader runs at most `depth` windows ahead of the device and the writer at
most `depth` batches behind, so host memory holds about (depth + 1) windows. `encoded_in_order`
hands the results back in index order whatever order they were computed in: a cache shard holds
record i at position i, and its bytes do not depend on the batching.

Captions sorted by token count within a window (`length_batches`) share a length bucket with
captions of about their own length, so little of the encoder's work is padding: the padding
fraction of the real prompt files before and after is in docs/data.md
(`python -m benchmarks.encode`).
"""
import collections
import dataclasses
from concurrent import futures
from typing import Callable

import numpy as np

# Remote (gs://) reads are one GET each (lidit_jax.data.shards): latency-bound, so a window's
# records are fetched by this many threads at once.
READ_THREADS = 16


@dataclasses.dataclass(frozen=True)
class Stages:
    """One encoder as three overlapped stages (see the module docstring).

    prepare: list of indices (a window) -> [(batch indices, inputs), ...]
    compute: inputs -> outputs (device arrays; dispatch only)
    finish: (batch indices, outputs) -> [{name: np.ndarray}, one per index]
    window: records per `prepare` call (what the length sort sees at once)
    """
    prepare: Callable
    compute: Callable
    finish: Callable
    window: int

    @classmethod
    def of_function(cls, encode_batch, batch_size):
        """A plain `encode_batch(indices) -> [{name: np.ndarray}]`, run in the caller's thread
        on consecutive batches (the fixed prompts, the empty prompt, tests)."""
        return cls(prepare=lambda indices: contiguous_batches(indices, batch_size),
                   compute=encode_batch, finish=lambda indices, entries: entries,
                   window=batch_size)


def contiguous_batches(indices, batch_size):
    """[(batch, batch)] for consecutive batches of `indices`: the inputs are the indices."""
    batches = [list(indices[k:k + batch_size]) for k in range(0, len(indices), batch_size)]
    return [(batch, batch) for batch in batches]


def length_batches(indices, lengths, batch_size):
    """Indices sorted by length (ties in index order), cut into batches: list of index lists.

    indices: [n] record indices of one window; lengths: [n] tokens of each."""
    order = np.lexsort((np.asarray(indices), np.asarray(lengths)))
    ordered = [int(indices[k]) for k in order]
    return [ordered[k:k + batch_size] for k in range(0, len(ordered), batch_size)]


def padding_fraction(batches_of_lengths, bucket):
    """Share of the token slots a batched encoder computes that are padding.

    batches_of_lengths: [[tokens of each caption] per batch]; bucket(longest) -> the padded
    length of a batch whose longest caption has `longest` tokens."""
    slots = sum(bucket(max(b)) * len(b) for b in batches_of_lengths)
    real = sum(sum(b) for b in batches_of_lengths)
    return 1.0 - real / slots


def read_all(read, indices):
    """[read(i) for i in indices], READ_THREADS at a time (remote reads wait on latency)."""
    with futures.ThreadPoolExecutor(READ_THREADS) as pool:
        return list(pool.map(read, indices))


def encoded_in_order(indices, stages, *, depth=2, progress=None):
    """Runs `stages` over `indices` -> yields (index, {name: np.ndarray}) in the order of
    `indices`; `progress(n)` after each batch. Raises ValueError if `prepare` leaves out or
    repeats a record."""
    indices = [int(i) for i in indices]
    windows = [indices[k:k + stages.window] for k in range(0, len(indices), stages.window)]
    done, position = {}, 0

    def ready():  # The finished entries that continue the index order.
        nonlocal position
        while position < len(indices) and indices[position] in done:
            yield indices[position], done.pop(indices[position])
            position += 1

    with futures.ThreadPoolExecutor(1, "encode-read") as reader, \
            futures.ThreadPoolExecutor(1, "encode-write") as writer:
        prepared = collections.deque(reader.submit(stages.prepare, w) for w in windows[:depth])
        finishing = collections.deque()

        def collect():
            batch, future = finishing.popleft()
            entries = future.result()
            if len(entries) != len(batch):
                raise ValueError(f"encoder returned {len(entries)} entries for {len(batch)} "
                                 "records")
            for index, entry in zip(batch, entries):
                if index in done:
                    raise ValueError(f"record {index} was encoded twice")
                done[index] = entry
            if progress is not None:
                progress(len(batch))

        for next_window in range(depth, len(windows) + depth):
            batches = prepared.popleft().result()
            if next_window < len(windows):
                prepared.append(reader.submit(stages.prepare, windows[next_window]))
            for batch, inputs in batches:
                outputs = stages.compute(inputs)
                finishing.append((list(batch), writer.submit(stages.finish, batch, outputs)))
                # Bounded: wait for the oldest batch once `depth` are on their way back.
                while finishing and (len(finishing) > depth or finishing[0][1].done()):
                    collect()
                yield from ready()
        while finishing:
            collect()
        yield from ready()
    if position != len(indices) or done:
        missing = sorted(set(indices[position:]) - set(done))
        extra = sorted(set(done) - set(indices))
        raise ValueError(f"the encoder's batches (Stages.prepare) left out records {missing[:5]}"
                         + (f" and encoded records outside their window {extra[:5]}" if extra
                            else ""))
