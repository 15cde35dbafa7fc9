"""Shapes data: ground truth matches pixels, captions name every object, records are pure."""
import subprocess
import sys

import numpy as np
import pytest

from lidit_jax.data import images, records, shapes


@pytest.mark.parametrize("layout", list(shapes.LAYOUTS))
def test_masks_distinct_per_slot(layout):
    for image_size in (32, 48, 64):
        masks = shapes.masks(image_size, layout)
        for slot in range(len(shapes.LAYOUTS[layout].slots)):
            flat = masks[slot].reshape(len(shapes.SHAPES) * len(shapes.SIZES), -1)
            assert len({m.tobytes() for m in flat}) == len(flat), (image_size, slot)
            assert flat.sum(1).min() >= 15  # Even small shapes have enough pixels to read.


@pytest.mark.parametrize("layout", list(shapes.LAYOUTS))
def test_detect_recovers_ground_truth(layout):
    source = shapes.ShapesSource(3000, seed=7, layout=layout)
    wrong = [i for i in range(len(source)) if shapes.detect(source[i]["image"], layout)
             != shapes.expected_detection(source[i]["metadata"])]
    assert not wrong, f"detect() disagrees with the metadata on records {wrong[:10]}"
    counts = {len(source[i]["metadata"]["objects"]) for i in range(len(source))}
    assert counts == set(range(1, len(shapes.LAYOUTS[layout].slots) + 1))


@pytest.mark.parametrize("layout", list(shapes.LAYOUTS))
def test_detect_robust_to_mild_noise_and_float_range(layout):
    source = shapes.ShapesSource(300, seed=3, image_size=48, layout=layout)
    rng = np.random.default_rng(0)
    for i in range(len(source)):
        record = source[i]
        noisy = record["image"].astype(np.float32) / 127.5 - 1 + rng.normal(0, 0.08, (48, 48, 3))
        assert shapes.detect(noisy, layout) == shapes.expected_detection(record["metadata"]), i


def test_detect_empty_image():
    assert shapes.detect(np.full((32, 32, 3), 40, np.uint8)) == [None, None, None]
    assert shapes.detect(np.full((32, 32, 3), 40, np.uint8), "grid") == [None] * 4


def test_records_are_pure_functions_of_seed_and_index():
    a, b = shapes.ShapesSource(50, seed=1), shapes.ShapesSource(50, seed=1)
    for i in (0, 17, 49):
        assert a[i]["caption"] == b[i]["caption"]
        np.testing.assert_array_equal(a[i]["image"], b[i]["image"])
    other = shapes.ShapesSource(50, seed=2)
    assert [a[i]["caption"] for i in range(20)] != [other[i]["caption"] for i in range(20)]
    with pytest.raises(IndexError):
        a[50]


@pytest.mark.parametrize("layout", list(shapes.LAYOUTS))
def test_captions_name_every_object_at_its_word_index(layout):
    source = shapes.ShapesSource(2000, seed=0, layout=layout)
    templates, counts = set(), 0
    for i in range(len(source)):
        record = source[i]
        words = [w.strip(",") for w in record["caption"].split()]
        for obj in record["metadata"]["objects"]:
            noun = words[obj["word_index"]]
            assert noun.startswith(obj["shape"]), (record["caption"], obj)
            assert words[obj["word_index"] - 1] == obj["colour"]
            assert words[obj["word_index"] - 2] == obj["size"]
        templates.add(record["metadata"]["template"])
        counts += any(w in ("two", "three", "four") for w in words)
    assert templates == set(shapes.LAYOUTS[layout].templates)
    assert (counts > 50) == (1 in templates)


def test_late_binding_captions_put_every_slot_after_the_objects():
    slots = ("bottom right", "top left", "top right")
    objects = [{"colour": c, "shape": "circle", "size": "large", "slot": slot}
               for c, slot in zip(("red", "blue", "green"), slots)]
    caption, positions = shapes.caption_for(objects[:2], 3, layout="grid_late")
    assert caption == ("a large red circle and a large blue circle, in the bottom right and top "
                       "left respectively")
    assert positions == [3, 8]
    caption, _ = shapes.caption_for(objects, 3, layout="grid_late")
    assert caption.endswith("circle, in the bottom right, top left and top right respectively")
    assert shapes.caption_for(objects[:1], 3, layout="grid_late")[0] == (
        "a large red circle, in the bottom right")


def test_grid_late_design_is_balanced_by_construction():
    source = shapes.ShapesSource(64, seed=5, layout="grid_late")
    for start in range(0, 64, 8):  # Any 8 consecutive records: each (count, template) once.
        cells = [(len(source[i]["metadata"]["objects"]), source[i]["metadata"]["template"])
                 for i in range(start, start + 8)]
        assert sorted(cells) == [(n, t) for n in (1, 2, 3, 4) for t in (0, 3)]
    mention_orders = set()
    for i in range(64):
        objects = source[i]["metadata"]["objects"]
        assert len({o["colour"] for o in objects}) == len(objects)  # Distinct colours.
        assert [o["word_index"] for o in objects] == sorted(o["word_index"] for o in objects)
        mention_orders.add(tuple(shapes.LAYOUTS["grid"].slots.index(o["slot"]) for o in objects))
    # Mention order is drawn independently of slot order.
    assert any(list(order) != sorted(order) for order in mention_orders)


def test_count_and_relation_captions():
    objects = [{"colour": "yellow", "shape": "triangle", "size": "small", "slot": "left"},
               {"colour": "yellow", "shape": "triangle", "size": "small", "slot": "middle"},
               {"colour": "blue", "shape": "cross", "size": "large", "slot": "right"}]
    caption, positions = shapes.caption_for(objects, 1)
    assert caption == "two small yellow triangles and a large blue cross"
    assert positions == [3, 3, 8]
    caption, positions = shapes.caption_for(objects[1:], 2)
    assert caption == "a small yellow triangle to the left of a large blue cross"
    assert positions == [3, 11]
    caption, _ = shapes.caption_for(objects, 0)
    assert caption == ("a small yellow triangle on the left, a small yellow triangle in the middle "
                       "and a large blue cross on the right")


def test_grid_captions_name_the_quadrants():
    corners = ("top left", "top right", "bottom left", "bottom right")
    objects = [{"colour": c, "shape": "circle", "size": "large", "slot": slot}
               for c, slot in zip(("red", "green", "blue", "white"), corners)]
    caption, positions = shapes.caption_for(objects, 0, layout="grid")
    assert caption == ("a large red circle in the top left, a large green circle in the top right, "
                       "a large blue circle in the bottom left and a large white circle in the "
                       "bottom right")
    assert positions == [3, 11, 19, 28]
    # Relations read left to right, which the grid's slot order is not: the listing instead.
    assert shapes.caption_for(objects[:2], 2, layout="grid")[0].endswith("in the top right")
    caption, _ = shapes.caption_for([dict(objects[0], slot=slot) for slot in corners], 1,
                                    layout="grid")
    assert caption == "four large red circles"


def test_bad_image_size_and_layout():
    with pytest.raises(ValueError, match="image_size"):
        shapes.ShapesSource(10, image_size=16)
    with pytest.raises(ValueError, match="layout 'ring'"):
        shapes.ShapesSource(10, layout="ring")


def test_cli_writes_records(tmp_path):
    out = str(tmp_path / "shapes")
    result = subprocess.run([sys.executable, "-m", "lidit_jax.data.shapes", f"--output={out}",
                             "--num=30", "--seed=4", "--records_per_shard=20"],
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "records=30 skipped=0"
    stored, source = records.ArrayRecordSource(out), shapes.ShapesSource(30, seed=4)
    assert len(stored) == 30 and len(records.shard_paths(out)) == 2
    for index in (0, 29):
        record = records.decode_record(stored[index])
        assert record["caption"] == source[index]["caption"] == stored.caption(index)
        np.testing.assert_array_equal(images.decode(record["image_bytes"]), source[index]["image"])
        assert shapes.detect(images.decode(record["image_bytes"])) == shapes.expected_detection(
            record["metadata"])
