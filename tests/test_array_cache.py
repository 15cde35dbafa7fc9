"""The on-disk array cache: round trip, resume after a kill, metadata checks."""
import ml_dtypes
import numpy as np
import pytest

from lidit_jax.data import array_cache


def fake_encode(indices):
    rng = np.random.default_rng(0)
    out = []
    for i in indices:
        length = 3 + i % 5
        out.append({"states": (rng.normal(size=(length, 4)) + i).astype(ml_dtypes.bfloat16),
                    "span": np.array([1, length], np.int32)})
    return out


def test_round_trip_and_metadata(tmp_path):
    meta = {"llm": "tiny", "layer": -3}
    written = array_cache.write_cache(str(tmp_path), 23, fake_encode, meta, shard_size=5, batch_size=4)
    assert written == 23
    cache = array_cache.ArrayCache(str(tmp_path))
    assert len(cache) == 23
    for i in range(23):
        got = cache[i]
        assert got["states"].dtype == ml_dtypes.bfloat16 and got["states"].shape == (3 + i % 5, 4)
        np.testing.assert_array_equal(got["span"], [1, 3 + i % 5])
    cache.check(meta)
    with pytest.raises(array_cache.CacheMismatch, match="layer: cache has -3, config wants -2"):
        cache.check({"llm": "tiny", "layer": -2})


def test_killed_writer_resumes_without_duplicates_or_gaps(tmp_path):
    calls = []

    def dying_encode(indices):
        calls.extend(indices)
        if len(calls) > 12:
            raise KeyboardInterrupt("killed")
        return fake_encode(indices)

    with pytest.raises(KeyboardInterrupt):
        array_cache.write_cache(str(tmp_path), 23, dying_encode, {"llm": "tiny"}, shard_size=5,
                                batch_size=2)
    with pytest.raises(FileNotFoundError, match="incomplete"):
        array_cache.ArrayCache(str(tmp_path))
    calls.clear()
    written = array_cache.write_cache(str(tmp_path), 23, lambda ix: calls.extend(ix) or fake_encode(ix),
                                      {"llm": "tiny"}, shard_size=5, batch_size=2)
    assert calls == list(range(10, 23)) and written == 13  # Shards 0 and 1 were complete.
    cache = array_cache.ArrayCache(str(tmp_path))
    assert [int(cache[i]["span"][1]) for i in range(23)] == [3 + i % 5 for i in range(23)]
    with pytest.raises(array_cache.CacheMismatch, match="llm"):
        array_cache.write_cache(str(tmp_path), 23, fake_encode, {"llm": "other"}, shard_size=5)


def test_two_processes_split_shards(tmp_path):
    for process in range(2):
        array_cache.write_cache(str(tmp_path), 23, fake_encode, {"llm": "tiny"}, shard_size=5,
                                process_index=process, process_count=2)
    cache = array_cache.ArrayCache(str(tmp_path))
    assert [int(cache[i]["span"][1]) for i in range(23)] == [3 + i % 5 for i in range(23)]
