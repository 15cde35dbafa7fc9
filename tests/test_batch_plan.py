"""Global batch plan: one bucket per batch, no repeats within an epoch, same on every process."""
import math

import numpy as np
import pytest

from lidit_jax.data import batch_plan, records, shapes


def test_assign_buckets_matches_nearest_bucket():
    buckets = [(256, 256), (192, 320), (320, 192)]
    rng = np.random.default_rng(0)
    sizes = rng.integers(8, 2000, (500, 2))
    expected = [min(range(3), key=lambda k: abs(math.log(h / w * buckets[k][1] / buckets[k][0])))
                for h, w in sizes]
    np.testing.assert_array_equal(batch_plan.assign_buckets(sizes, buckets), expected)
    assert batch_plan.assign_buckets([[0, 0]], buckets).tolist() == [batch_plan.UNREADABLE]


def test_epochs_hold_one_bucket_per_batch_and_no_repeats():
    rng = np.random.default_rng(1)
    bucket_of_record = rng.integers(-1, 3, 1000).astype(np.int32)  # Some unreadable (-1).
    plan = batch_plan.BatchPlan(bucket_of_record, 3, 16, seed=5)
    counts = np.bincount(bucket_of_record[bucket_of_record >= 0], minlength=3)
    assert plan.batches_per_epoch == (counts // 16).sum()
    epochs = [plan.epoch(e) for e in range(2)]
    for batches in epochs:
        assert batches.shape == (plan.batches_per_epoch, 16)
        assert len(np.unique(batches)) == batches.size  # No record twice in an epoch.
        assert (bucket_of_record[batches] >= 0).all()
        assert (bucket_of_record[batches] == bucket_of_record[batches[:, :1]]).all()
    assert not np.array_equal(epochs[0], epochs[1])  # Reshuffled per epoch.
    again = batch_plan.BatchPlan(bucket_of_record, 3, 16, seed=5)  # Another process.
    step = plan.batches_per_epoch + 3
    assert plan.batch(step)[0] == 1
    np.testing.assert_array_equal(again.batch(step)[1], epochs[1][3])


def test_too_few_records_for_a_batch():
    with pytest.raises(ValueError, match="batch_size=8"):
        batch_plan.BatchPlan(np.array([0, 1, 1, 0], np.int32), 2, 8, seed=0)


def test_record_sizes_from_headers(tmp_path):
    def entry(index):
        if index == 2:
            return b"\x05\x00\x00\x00{oops"
        image = np.zeros((10 + index, 20, 3), np.uint8)
        return records.encode_record(records.encode_image(image, "png"), "c", {}, "png")
    records.write_records(str(tmp_path), 4, entry, records_per_shard=4)
    sizes = batch_plan.record_sizes(records.ArrayRecordSource(str(tmp_path)))
    assert sizes.tolist() == [[10, 20], [11, 20], [0, 0], [13, 20]]
    cached = np.load(tmp_path / "image_sizes.npy")  # Reused by the next run.
    np.testing.assert_array_equal(cached, sizes)
    np.save(tmp_path / "image_sizes.npy", cached + 1)
    assert batch_plan.record_sizes(records.ArrayRecordSource(str(tmp_path)))[0].tolist() == [11, 21]
    shapes_sizes = batch_plan.record_sizes(shapes.ShapesSource(5, image_size=48))
    assert shapes_sizes.tolist() == [[48, 48]] * 5
