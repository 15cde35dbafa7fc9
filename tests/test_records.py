"""Record format: round trip, sharded writer (resume, skips), random-access reader."""
import json
import os
import struct

import numpy as np
import pytest

from lidit_jax.data import images, records


def _entry(index):
    image = np.full((12, 10, 3), index, np.uint8)
    return records.encode_record(records.encode_image(image, "png"), f"caption {index} é",
                                 {"index": index}, "png")


def test_round_trip():
    decoded = records.decode_record(_entry(3))
    assert decoded["caption"] == "caption 3 é" and decoded["metadata"] == {"index": 3}
    assert decoded["image_format"] == "png" and decoded["version"] == records.FORMAT_VERSION
    np.testing.assert_array_equal(images.decode(decoded["image_bytes"]),
                                  np.full((12, 10, 3), 3, np.uint8))


def test_decode_errors_name_the_problem():
    with pytest.raises(ValueError, match="runs past"):
        records.decode_record(_entry(1)[:10])
    header = json.dumps({"version": 99, "caption": "x", "image_format": "png"}).encode()
    with pytest.raises(ValueError, match="version 99"):
        records.decode_record(struct.pack("<I", len(header)) + header)


def test_writer_shards_skips_and_resumes(tmp_path):
    out = str(tmp_path / "set")
    make = lambda i: None if i % 7 == 3 else _entry(i)  # noqa: E731
    written, skipped = records.write_records(out, 25, make, records_per_shard=10)
    assert (written, skipped) == (21, 4)
    names = [f"records-{k:05d}-of-00003.arrayrecord" for k in range(3)]
    assert sorted(os.listdir(out)) == sorted(
        names + [n + ".spans.npy" for n in names] + ["image_sizes.npy", "manifest.json"])
    source = records.ArrayRecordSource(out)
    kept = [i for i in range(25) if i % 7 != 3]
    assert len(source) == 21
    assert [records.decode_record(source[k])["metadata"]["index"] for k in range(21)] == kept
    assert source.locate(20) == (os.path.join(out, names[2]), 3)  # Shards hold 9, 8 and 4.

    # Resume: complete shards are kept (make_entry is not called for them), missing ones rewritten.
    os.remove(os.path.join(out, names[1]))
    calls = []
    assert records.write_records(out, 25, lambda i: calls.append(i) or make(i),
                                 records_per_shard=10) == (21, 4)
    assert calls == list(range(10, 20))


def test_missing_shard_is_an_error(tmp_path):
    out = str(tmp_path / "set")
    records.write_records(out, 4, _entry, records_per_shard=2)
    os.remove(os.path.join(out, "records-00001-of-00002.arrayrecord"))
    os.remove(os.path.join(out, "records-00001-of-00002.arrayrecord.spans.npy"))
    source = records.ArrayRecordSource(out)  # The manifest: no shard is looked at when opening.
    assert records.decode_record(source[1])["caption"] == "caption 1 é"
    with pytest.raises(FileNotFoundError, match="records-00001-of-00002.arrayrecord is missing"):
        source[2]
    os.remove(os.path.join(out, records.MANIFEST_FILE))
    with pytest.raises(FileNotFoundError, match="incomplete"):
        records.ArrayRecordSource(out)
    with pytest.raises(FileNotFoundError, match="no records"):
        records.ArrayRecordSource(str(tmp_path))
