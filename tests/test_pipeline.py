"""Training pipeline: process shards, exact restore, buckets, bad records, caption dropout."""
import io
import json

import numpy as np
import pytest
from PIL import Image

from configs import common
from lidit_jax.data import batch_plan, images, pipeline, records

# Record set for the arrayrecord tests: three aspect ratios, 5 % bad records.
_SIZES = [(16, 32), (32, 16), (24, 24)]
_BAD = {7: "truncated", 23: "empty caption", 41: "1x1", 62: "missing caption", 88: "bad json"}


def _jpeg(height, width, value):
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), value, np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _entry(index):
    height, width = _SIZES[index % 3]
    image, caption = _jpeg(height, width, index), f"record {index}"
    kind = _BAD.get(index)
    if kind == "truncated":
        image = image[:len(image) // 2]
    elif kind == "empty caption":
        caption = "  "
    elif kind == "1x1":
        image = _jpeg(1, 1, 0)
    elif kind == "bad json":
        return b"\x05\x00\x00\x00{oops" + image
    entry = records.encode_record(image, caption, {}, "jpeg")
    if kind == "missing caption":
        entry = entry.replace(b'"caption"', b'"caxtion"')
    return entry


@pytest.fixture(scope="module")
def record_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("records"))
    records.write_records(out, 100, _entry, records_per_shard=40)
    return out


def _config(**overrides):
    config = common.get_config().data
    config.update(overrides)
    return config


def _take(iterator, count):
    return [next(iterator) for _ in range(count)]


def test_process_shards_are_disjoint_and_cover_the_epoch():
    config = _config(source="shapes", shapes_num_records=64, caption_dropout=0.0)
    seen = []
    for process in range(2):
        iterator = pipeline.make_train_iterator(config, global_batch_size=8, seed=5,
                                                process_index=process, process_count=2)
        batches = _take(iterator, 8)  # 8 x 4 = one epoch's half.
        seen.append(np.concatenate([b["record_id"] for b in batches]).tolist())
        assert all(b["image"].shape == (4, 32, 32, 3) for b in batches)
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(64))


def test_epochs_are_reshuffled():
    config = _config(source="shapes", shapes_num_records=32)
    iterator = pipeline.make_train_iterator(config, global_batch_size=32, seed=0,
                                            process_index=0, process_count=1)
    first, second = (b["record_id"].tolist() for b in _take(iterator, 2))
    assert sorted(first) == sorted(second) == list(range(32)) and first != second


def test_batch_fields():
    config = _config(source="shapes", shapes_num_records=40)
    def twice(i, dropped):
        return {"twice": np.int32(2 * i), "nested": [{"dropped": np.bool_(dropped)}]}

    batch = next(pipeline.make_train_iterator(config, global_batch_size=4, seed=0,
                                              process_index=0, process_count=1,
                                              record_transform=twice))
    assert batch["image"].dtype == np.float32 and batch["image"].shape == (4, 32, 32, 3)
    assert -1 <= batch["image"].min() and batch["image"].max() <= 1
    assert batch["caption"].dtype == object and batch["caption_dropped"].dtype == bool
    assert batch["record_id"].dtype == np.int64
    np.testing.assert_array_equal(batch["twice"], 2 * batch["record_id"])
    np.testing.assert_array_equal(batch["nested"][0]["dropped"], batch["caption_dropped"])


def test_restored_iterator_continues_exactly(record_dir):
    config = _config(source="arrayrecord", path=record_dir, buckets="16x32,32x16,24x24",
                     caption_dropout=0.5)
    make = lambda: pipeline.make_train_iterator(config, global_batch_size=4, seed=3,  # noqa: E731
                                                process_index=0, process_count=1)
    reference = make()
    _take(reference, 5)
    state = json.loads(json.dumps(reference.get_state()))
    assert state["step"] == 5
    expected = _take(reference, 30)  # Crosses an epoch boundary (21 batches per epoch).
    restored = make()
    restored.set_state(state)
    for want, got in zip(expected, _take(restored, 30)):
        np.testing.assert_array_equal(want["record_id"], got["record_id"])
        np.testing.assert_array_equal(want["caption"], got["caption"])
        np.testing.assert_array_equal(want["image"], got["image"])
    assert restored.counters() == reference.counters()
    other = pipeline.make_train_iterator(config, global_batch_size=8, seed=3,
                                         process_index=0, process_count=1)
    with pytest.raises(ValueError, match="global_batch_size"):
        other.set_state(state)


def test_processes_agree_on_buckets_and_resume_from_one_state(record_dir):
    """Every step has one bucket on all processes; one saved state resumes any process count."""
    config = _config(source="arrayrecord", path=record_dir, buckets="16x32,32x16,24x24",
                     caption_dropout=0.0)
    make = lambda index, count: pipeline.make_train_iterator(  # noqa: E731
        config, global_batch_size=6, seed=8, process_index=index, process_count=count)
    single = make(0, 1)
    _take(single, 3)
    state = single.get_state()
    expected = _take(single, 12)
    parts = [make(p, 3) for p in range(3)]
    for part in parts:
        part.set_state(state)  # The primary host's state, restored on every host.
    for want, got in zip(expected, zip(*[_take(part, 12) for part in parts])):
        assert len({b["image"].shape for b in got}) == 1  # One bucket per global step.
        np.testing.assert_array_equal(want["record_id"],
                                      np.concatenate([b["record_id"] for b in got]))
        np.testing.assert_array_equal(want["image"], np.concatenate([b["image"] for b in got]))


def test_buckets_never_mix_and_bad_records_are_skipped(record_dir):
    config = _config(source="arrayrecord", path=record_dir, buckets="16x32,32x16,24x24",
                     caption_dropout=0.0)
    iterator = pipeline.make_train_iterator(config, global_batch_size=5, seed=1,
                                            process_index=0, process_count=1)
    ids = []
    for batch in _take(iterator, 36):  # Two epochs of 18 batches (3 buckets of 31-33 records).
        assert batch["image"].shape[1:3] in _SIZES
        for record_id, caption in zip(batch["record_id"], batch["caption"]):
            assert _SIZES[record_id % 3] == batch["image"].shape[1:3]
            assert caption == f"record {record_id}"
            ids.append(int(record_id))
    assert not set(ids) & set(_BAD)
    counters = iterator.counters()
    # Bad records without a readable header are left out of the plan up front; the others are
    # met and counted each time the plan reaches them (bucket remainders are left out).
    source = records.ArrayRecordSource(record_dir)
    headerless = [i for i in _BAD if batch_plan.header_size(source[i]) == (0, 0)]
    assert counters["unreadable"] == len(headerless) >= 1
    assert 1 <= counters["skipped"] <= 2 * (len(_BAD) - len(headerless))
    assert counters["records"] == len(ids)


def test_every_good_record_arrives_once_per_epoch(record_dir):
    config = _config(source="arrayrecord", path=record_dir, caption_dropout=0.0,
                     image_size=24)  # One square bucket: everything is cropped to 24x24.
    iterator = pipeline.make_train_iterator(config, global_batch_size=5, seed=2,
                                            process_index=0, process_count=1)
    ids = np.concatenate([b["record_id"] for b in _take(iterator, 20)]).tolist()
    # Each of the 5 bad records' rows took another good record of its batch instead.
    assert set(ids) == set(range(100)) - set(_BAD) and len(ids) == 100
    assert iterator.counters() == {"records": 100, "skipped": len(_BAD), "unreadable": 0}


def test_caption_dropout_rate_and_determinism():
    config = _config(source="shapes", shapes_num_records=2000, caption_dropout=0.3)
    make = lambda: pipeline.make_train_iterator(config, global_batch_size=100, seed=4,  # noqa: E731
                                                process_index=0, process_count=1)
    batches = _take(make(), 20)
    dropped = np.concatenate([b["caption_dropped"] for b in batches])
    captions = np.concatenate([b["caption"] for b in batches])
    assert 0.26 < dropped.mean() < 0.34
    assert all(c == "" for c in captions[dropped]) and all(captions[~dropped])
    again = _take(make(), 20)
    np.testing.assert_array_equal(dropped, np.concatenate([b["caption_dropped"] for b in again]))


def test_workers_give_the_same_batches(record_dir):
    config = _config(source="arrayrecord", path=record_dir, buckets="16x32,32x16,24x24")
    batches = {}
    for workers in (0, 2):
        config.num_workers = workers
        iterator = pipeline.make_train_iterator(config, global_batch_size=4, seed=9,
                                                process_index=0, process_count=1)
        batches[workers] = _take(iterator, 12)
        state = iterator.get_state()
        json.dumps(state)
        iterator.close()
    for a, b in zip(batches[0], batches[2]):
        np.testing.assert_array_equal(a["record_id"], b["record_id"])
        np.testing.assert_array_equal(a["image"], b["image"])


def test_parse_record_rejects_bad_inputs():
    good = _jpeg(16, 16, 0)
    huge = io.BytesIO()
    Image.new("1", (9000, 8000)).save(huge, format="PNG")  # 72 Mpixel, a few kB.
    cases = {"caption is not UTF-8": {"image": good, "caption": b"\xff\xfe"},
             "more than": {"image": huge.getvalue(), "caption": "huge"},
             "smaller than": {"image": np.zeros((1, 1, 3), np.uint8), "caption": "tiny"},
             "unreadable record": {"caption": "no image"}}
    for message, raw in cases.items():
        with pytest.raises(images.BadRecord, match=message):
            pipeline.parse_record(raw)
    image, caption = pipeline.parse_record({"image": good, "caption": b"ok \xc3\xa9"})
    assert image.shape == (16, 16, 3) and caption == "ok é"
