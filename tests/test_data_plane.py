"""The data plane at scale: range reads, manifests, bounded readers, lookups in the workers,
image sizes from the converters. Bytes and requests are counted on the wire, against the GCS
emulator behind a counting proxy (benchmarks/data_plane.py)."""
import logging
import os

import numpy as np
import pytest
from array_record.python import array_record_module

from benchmarks import data_plane, gcs_emulator
from configs import common
from lidit_jax.data import array_cache, batch_plan, pipeline, records, shards
from lidit_jax.text import cache as text_cache


@pytest.fixture(scope="module")
def gcs():
    """The emulator behind a counting proxy; this process's GCS clients pointed at the proxy."""
    with gcs_emulator.environment(gcs_emulator.client_env("")), \
            gcs_emulator.emulator(data_plane.BUCKET) as url:
        proxy = data_plane.CountingProxy(url)
        data_plane.use_endpoint(proxy.url)
        yield proxy
        proxy.close()


def _entry(index, size=(16, 32)):
    image = np.full((*size, 3), index % 256, np.uint8)
    return records.encode_record(records.encode_image(image, "png"), f"record {index}")


def _arrays(index):
    return {"states": np.full((3 + index % 5, 8), index, np.float32),
            "prompt_mask": np.arange(3 + index % 5) < 3}


def test_records_cross_block_boundaries_and_read_back_exactly(tmp_path):
    sizes = [0, 1, 100, 65_000, 65_512, 65_536, 200_000, 7]
    entries = [np.random.default_rng(k).bytes(size) for k, size in enumerate(sizes)]
    shard = str(tmp_path / "shard.arrayrecord")
    assert shards.write_shard(shard, iter(entries)) == len(entries)
    readers = shards.ShardReaders()
    assert [readers.read(shard, k) for k in range(len(entries))] == entries
    assert shards.count_records(shard) == len(entries)


def test_a_record_is_one_ranged_read_not_a_staged_shard(gcs, tmp_path, monkeypatch):
    monkeypatch.setenv("LIDIT_STAGING_DIR", str(tmp_path / "staging"))
    root = "gs://lidit-bench/ranged"
    records.write_records(f"{root}/records", 32, _entry, records_per_shard=4)
    array_cache.write_cache(f"{root}/cache", 32, lambda ids: [_arrays(i) for i in ids], {},
                            shard_size=4)
    source = records.ArrayRecordSource(f"{root}/records")
    cache = array_cache.ArrayCache(f"{root}/cache")
    gcs.reset()
    wanted = [5, 6, 7, 21]  # Two shards of each.
    for index in wanted:
        assert records.decode_record(source[index])["caption"] == f"record {index}"
        np.testing.assert_array_equal(cache[index]["states"], _arrays(index)["states"])
    needed = sum(len(_entry(i)) + len(array_cache.encode_entry(i, _arrays(i))) for i in wanted)
    spans = 4 * (128 + 4 * 16)  # Four shards' indexes: npy header and 16 bytes a record.
    assert gcs.bytes <= 1.1 * (needed + spans), (gcs.bytes, needed, spans)
    assert not os.path.exists(tmp_path / "staging")  # Nothing copied whole.


def test_opening_reads_the_manifest_whatever_the_shard_count(gcs):
    requests = {}
    for count in (2, 24):
        root = f"gs://lidit-bench/open{count}"
        records.write_records(f"{root}/records", count, _entry, records_per_shard=1)
        array_cache.write_cache(f"{root}/cache", count, lambda ids: [_arrays(i) for i in ids],
                                {}, shard_size=1)
        gcs.reset()
        assert len(records.ArrayRecordSource(f"{root}/records")) == count
        assert len(array_cache.ArrayCache(f"{root}/cache")) == count
        # Opening touches metadata and manifests only: no request names a shard object.
        shard_requests = [p for p in gcs.paths if ".arrayrecord" in p]
        assert not shard_requests, shard_requests
        requests[count] = gcs.requests
    # The same few reads at both counts, where a per-shard open would add 22 or more; gcsfs's
    # listing cache and retries under load move the count by a few.
    assert requests[24] <= requests[2] + 8 and requests[2] <= 20, requests


def test_sets_and_caches_without_manifest_or_spans_still_read_with_a_warning(tmp_path, caplog):
    # As written before manifests and range reads: zstd chunks, no spans, no manifest.
    folder = tmp_path / "records"
    folder.mkdir()
    for shard in range(2):
        writer = array_record_module.ArrayRecordWriter(
            str(folder / records.SHARD_PATTERN.format(shard=shard, count=2)), "group_size:1")
        for index in range(3 * shard, 3 * shard + 3):
            writer.write(_entry(index))
        writer.close()
    cache_dir = tmp_path / "cache"
    array_cache.write_cache(str(cache_dir), 6, lambda ids: [_arrays(i) for i in ids], {},
                            shard_size=3)
    os.remove(cache_dir / array_cache.MANIFEST_FILE)
    with caplog.at_level(logging.WARNING):
        source = records.ArrayRecordSource(str(folder))
        cache = array_cache.ArrayCache(str(cache_dir))
        assert [records.decode_record(source[i])["caption"] for i in range(6)] == [
            f"record {i}" for i in range(6)]
        np.testing.assert_array_equal(cache[4]["states"], _arrays(4)["states"])
    text = caplog.text
    assert "python -m lidit_jax.data.records" in text and "has no manifest.json" in text
    assert "run the same --mode=encode again" in text and "convert or encode it again" in text


def test_open_shards_are_bounded(tmp_path):
    records.write_records(str(tmp_path), 20, _entry, records_per_shard=2)
    source = records.ArrayRecordSource(str(tmp_path), max_open_shards=3)
    for index in list(range(20)) + list(range(19, -1, -3)):
        assert records.decode_record(source[index])["caption"] == f"record {index}"
        assert len(source._readers) <= 3
    with pytest.raises(ValueError, match="at least one"):
        shards.ShardReaders(0)


class _FieldsWithPid(text_cache.CachedTextFields):
    def __call__(self, record_id, caption_dropped):
        return dict(super().__call__(record_id, caption_dropped), pid=np.int64(os.getpid()))


def test_text_states_are_looked_up_and_stacked_in_the_workers(tmp_path):
    from absl import flags

    flags.FLAGS.mark_as_parsed()
    num, max_length = 24, 12
    array_cache.write_cache(str(tmp_path / "llm"), num, lambda ids: [
        {"states": np.full((2 + i % 6, 4), i, np.float32),
         "prompt_mask": np.arange(2 + i % 6) == 1} for i in ids], text_cache.FORMAT_METADATA,
        shard_size=4)
    array_cache.write_cache(str(tmp_path / "llm" / "empty"), 1, lambda ids: [
        {"states": np.zeros((1, 4), np.float32), "prompt_mask": np.zeros(1, bool)}],
        text_cache.FORMAT_METADATA)
    reader = text_cache.CachedTextStates(str(tmp_path / "llm"), max_length)
    config = common.get_config().data
    config.update(source="shapes", shapes_num_records=num, num_workers=2, caption_dropout=0.3)
    iterator = pipeline.make_train_iterator(config, global_batch_size=4, seed=0,
                                            process_index=0, process_count=1,
                                            record_transform=_FieldsWithPid([reader]))
    for _ in range(3):
        batch = next(iterator)
        assert os.getpid() not in batch["pid"].tolist()  # Looked up in a worker...
        assert len(set(batch["pid"].tolist())) == 1  # ... which stacked the whole batch.
        expected = reader.lookup(batch["record_id"], batch["caption_dropped"])
        for key in ("states", "mask", "prompt_mask"):
            np.testing.assert_array_equal(batch["text"][0][key], expected[key])
    iterator.close()


def test_converted_record_sets_plan_buckets_without_reading_an_image(tmp_path, monkeypatch):
    shapes = [(16, 32), (32, 16), (24, 24)]
    records.write_records(str(tmp_path), 9, lambda i: _entry(i, shapes[i % 3]),
                          records_per_shard=4)
    source = records.ArrayRecordSource(str(tmp_path))

    def no_reading(*args):
        raise AssertionError("bucket planning read a record")

    monkeypatch.setattr(records.ArrayRecordSource, "__getitem__", no_reading)
    np.testing.assert_array_equal(batch_plan.record_sizes(source), [shapes[i % 3]
                                                                   for i in range(9)])
    plan = batch_plan.make_plan(source, shapes, 3, seed=0)
    assert plan.batches_per_epoch == 3
