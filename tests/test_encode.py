"""--mode=encode at scale: captions batched by length, I/O overlapped with the device, results
written at their record's index whatever order they were computed in, and the record set's image
sizes written so bucket planning reads no image."""
import threading

import numpy as np
import pytest

from configs import common
from lidit_jax import encode
from lidit_jax.data import array_cache, batch_plan, encode_order, image_sizes, records
from lidit_jax.text import cache as text_cache
from lidit_jax.text.encoder import PromptEncoder

_SIZES = [(16, 32), (32, 16), (24, 24)]


def _arrays(index):
    return {"states": np.full((2 + index % 7, 3), index, np.float32),
            "prompt_mask": np.arange(2 + index % 7) < index % 3}


def _shuffled_stages(batch_size, window, seed):
    """Batches of each window in a seeded random order, computed in this thread."""
    def prepare(indices):
        order = np.random.default_rng([seed, indices[0]]).permutation(indices).tolist()
        return [(batch, batch) for batch in (order[k:k + batch_size]
                                             for k in range(0, len(order), batch_size))]
    return encode_order.Stages(prepare=prepare, compute=lambda batch: batch,
                               finish=lambda indices, batch: [_arrays(i) for i in batch],
                               window=window)


def _shard_bytes(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.glob("shard-*"))}


def test_cache_bytes_do_not_depend_on_the_order_records_are_computed_in(tmp_path):
    array_cache.write_cache(str(tmp_path / "in_order"), 45, lambda ids: [_arrays(i) for i in ids],
                            {}, shard_size=20, batch_size=4)
    reference = _shard_bytes(tmp_path / "in_order")
    for seed, window in ((0, 8), (1, 20), (2, 3)):
        out = tmp_path / f"shuffled{seed}"
        array_cache.write_cache(str(out), 45, _shuffled_stages(4, window, seed), {},
                                shard_size=20, batch_size=4)
        assert _shard_bytes(out) == reference


def test_stages_that_leave_out_a_record_are_refused(tmp_path):
    stages = encode_order.Stages(
        prepare=lambda indices: [(indices[1:], indices[1:])], compute=lambda batch: batch,
        finish=lambda indices, batch: [_arrays(i) for i in batch], window=4)
    with pytest.raises(ValueError, match=r"left out records \[0, 4\]"):
        array_cache.write_cache(str(tmp_path), 8, stages, {}, shard_size=8)
    assert not list(tmp_path.glob("shard-*"))  # Nothing published.


def test_reading_and_writing_overlap_the_device_and_stay_bounded():
    """The reader prepares the next window while the caller's thread computes, the writer
    finishes in its own thread, and the reader is never more than `depth` windows ahead."""
    main = threading.get_ident()
    prepared, computed, threads = [], [], {"prepare": set(), "finish": set()}
    next_window_read = threading.Event()

    def prepare(indices):
        threads["prepare"].add(threading.get_ident())
        prepared.append(indices[0])
        if indices[0] == 4:
            next_window_read.set()
        return encode_order.contiguous_batches(indices, 2)

    def compute(batch):
        assert threading.get_ident() == main
        if batch[0] == 0:  # The device busy on window 0: the reader has window 1 meanwhile.
            assert next_window_read.wait(10)
        computed.append(batch[0])
        assert len(prepared) - len(computed) // 2 <= 2 + 1  # depth windows ahead, + the current.
        return batch

    def finish(indices, batch):
        threads["finish"].add(threading.get_ident())
        return [_arrays(i) for i in batch]

    stages = encode_order.Stages(prepare=prepare, compute=compute, finish=finish, window=4)
    out = list(encode_order.encoded_in_order(range(20), stages, depth=2))
    assert [i for i, _ in out] == list(range(20))
    assert main not in threads["prepare"] | threads["finish"]
    assert threads["prepare"].isdisjoint(threads["finish"])


def test_length_batches_sort_a_window_by_token_count():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 200, 512)
    indices = list(range(1000, 1512))
    batches = encode_order.length_batches(indices, lengths, 64)
    assert sorted(i for b in batches for i in b) == indices
    longest = [max(lengths[np.array(b) - 1000]) for b in batches]
    assert longest == sorted(longest)
    bucket = lambda longest: 16 * 2 ** int(np.ceil(np.log2(max(longest, 16) / 16)))  # noqa: E731
    contiguous = [lengths[k:k + 64].tolist() for k in range(0, 512, 64)]
    sorted_batches = [lengths[np.array(b) - 1000].tolist() for b in batches]
    assert (encode_order.padding_fraction(sorted_batches, bucket)
            < encode_order.padding_fraction(contiguous, bucket) - 0.1)


# ---- Image sizes ------------------------------------------------------------------------------
def _entry(index):
    image = np.full((*_SIZES[index % 3], 3), index % 256, np.uint8)
    caption = "a very long caption " * (index % 5) + f"record {index}"
    return records.encode_record(records.encode_image(image, "png"), caption)


@pytest.fixture
def record_set_without_sizes(tmp_path):
    """A record set as a converter that predates image_sizes.npy left it."""
    folder = tmp_path / "records"
    records.write_records(str(folder), 30, _entry, records_per_shard=8)
    (folder / records.IMAGE_SIZES_FILE).unlink()
    return folder


def _plan_without_reading(source, monkeypatch):
    def no_reading(*args):
        raise AssertionError("bucket planning read a record")
    monkeypatch.setattr(records.ArrayRecordSource, "__getitem__", no_reading)
    return batch_plan.make_plan(source, _SIZES, 5, seed=0)


def test_encode_writes_the_image_sizes_so_planning_reads_no_image(
        tiny_llm, record_set_without_sizes, tmp_path, monkeypatch, capsys):
    config = common.get_config()
    config.data.update(source="arrayrecord", path=str(record_set_without_sizes),
                       buckets=",".join(f"{h}x{w}" for h, w in _SIZES))
    config.text.llms.smollm2.path, config.text.llms.smollm2.width = str(tiny_llm), 0
    config.text.max_length = 96
    config.text.cache_dir = str(tmp_path / "cache")
    encode.run(config, str(tmp_path))
    assert f"image_sizes={record_set_without_sizes}/image_sizes.npy" in capsys.readouterr().out
    source = records.ArrayRecordSource(str(record_set_without_sizes))
    np.testing.assert_array_equal(records.read_image_sizes(source.directory, 30),
                                  [_SIZES[i % 3] for i in range(30)])
    assert _plan_without_reading(source, monkeypatch).batches_per_epoch == 6


def test_two_processes_write_one_image_sizes_file(record_set_without_sizes, monkeypatch):
    """Process 0 reads its share's captions; process 1 encoded nothing this run (its shards
    were complete) and reads its headers. The second to publish merges."""
    source = records.ArrayRecordSource(str(record_set_without_sizes))
    first = image_sizes.EncodedSizes(source, 0, 2)
    for index in [*range(0, 8), *range(16, 24)]:  # Shards 0 and 2 of 8 records.
        assert first.caption(index).endswith(f"record {index}")
    assert first.publish(shard_size=8) is None  # Process 1's part is not there yet.
    assert image_sizes.EncodedSizes(source, 1, 2).publish(shard_size=8) == (
        record_set_without_sizes / records.IMAGE_SIZES_FILE)
    assert not list(record_set_without_sizes.glob("image_sizes.part-*"))
    assert _plan_without_reading(source, monkeypatch).batches_per_epoch == 6


def test_captions_are_encoded_in_batches_of_one_length(tiny_llm, tmp_path):
    config = common.get_config()
    config.text.llms.smollm2.path, config.text.llms.smollm2.width = str(tiny_llm), 0
    config.text.max_length = 96
    encoder = PromptEncoder("smollm2", config.text.llms.smollm2, config.text)
    captions = ["word " * (1 + (7 * i) % 40) for i in range(32)]
    stages = text_cache.length_sorted_stages(encoder, captions.__getitem__, batch_size=8)
    batches = stages.prepare(list(range(32)))
    lengths = [[len(c) for c in batch_captions] for _, batch_captions in batches]
    assert [max(b) for b in lengths] == sorted(max(b) for b in lengths)
    assert sorted(i for batch, _ in batches for i in batch) == list(range(32))
    # The longest of one batch is under the shortest of the next: each holds one length range.
    assert all(max(a) <= min(b) for a, b in zip(lengths, lengths[1:]))
