"""Converters: one small image-caption set as folder, manifest, WebDataset and TFDS gives the same
records; bad inputs are skipped and counted; output is resumable; the CLI's last line."""
import csv
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from configs import common
from lidit_jax.data import convert, images, pipeline, records

_CAPTIONS = ["a red car", "two cats", "a small blue circle", "sunset über the sea", "a dog",
             "tree"]


def _png(index):
    rng = np.random.default_rng(index)
    image = rng.integers(0, 256, (12 + index, 16, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


_BAD_IMAGE = _png(99)[:40]  # Truncated: must be skipped.


def _names():
    return [f"img{i:02d}" for i in range(len(_CAPTIONS))]


def _write_folder(root):
    os.makedirs(root)
    for index, (name, caption) in enumerate(zip(_names(), _CAPTIONS)):
        open(os.path.join(root, name + ".png"), "wb").write(_png(index))
        open(os.path.join(root, name + ".txt"), "w", encoding="utf-8").write(caption + "\n")
    open(os.path.join(root, "broken.png"), "wb").write(_BAD_IMAGE)
    open(os.path.join(root, "broken.txt"), "w").write("broken")
    return root


def _write_manifests(root):
    folder = _write_folder(root)
    rows = [{"image": n + ".png", "caption": c} for n, c in zip(_names(), _CAPTIONS)]
    rows.append({"image": "broken.png", "caption": "broken"})
    with open(os.path.join(folder, "m.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    with open(os.path.join(folder, "m.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, ["image", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    return os.path.join(folder, "m.jsonl"), os.path.join(folder, "m.csv")


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write_webdataset(root):
    os.makedirs(root)
    for shard in range(2):  # Two shards; half the captions in .json.
        with tarfile.open(os.path.join(root, f"shard-{shard}.tar"), "w") as tar:
            for index in range(shard, len(_CAPTIONS), 2):
                key = f"sample{index:02d}"
                _add(tar, key + ".png", _png(index))
                caption = _CAPTIONS[index]
                if index % 4 < 2:
                    _add(tar, key + ".txt", caption.encode())
                else:
                    _add(tar, key + ".json", json.dumps({"caption": caption}).encode())
            if shard == 1:
                _add(tar, "broken.png", _BAD_IMAGE)
                _add(tar, "broken.txt", b"broken")
                _add(tar, "orphan.txt", b"no image")  # A second bad sample.
    return root


def _write_tfds(root, with_captions=True):
    import tensorflow_datasets as tfds

    class TinyPairs(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = {"image": tfds.features.Tensor(shape=(), dtype=np.object_),
                        "label": tfds.features.ClassLabel(names=["red_car", "cat"])}
            if with_captions:
                features["caption"] = tfds.features.Text()
            return tfds.core.DatasetInfo(builder=self,
                                         features=tfds.features.FeaturesDict(features))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for index, caption in enumerate(_CAPTIONS):
                example = {"image": _png(index), "label": index % 2}
                if with_captions:
                    example["caption"] = caption
                yield index, example
            yield "broken", dict({"image": _BAD_IMAGE, "label": 0},
                                 **({"caption": "broken"} if with_captions else {}))

    builder = TinyPairs(data_dir=root, file_format="array_record")
    builder.download_and_prepare()
    return builder.data_dir


def _decoded(directory):
    source = records.ArrayRecordSource(directory)
    out = []
    for index in range(len(source)):
        record = records.decode_record(source[index])
        out.append((record["caption"], images.decode(record["image_bytes"]).tobytes()))
    return sorted(out)


def test_all_formats_give_the_same_records(tmp_path):
    expected = sorted((c, images.decode(_png(i)).tobytes()) for i, c in enumerate(_CAPTIONS))
    jsonl, csv_path = _write_manifests(str(tmp_path / "manifest"))
    inputs = {
        "folder": convert.make_input("folder", _write_folder(str(tmp_path / "folder"))),
        "jsonl": convert.make_input("manifest", jsonl),
        "csv": convert.make_input("manifest", csv_path),
        "webdataset": convert.make_input("webdataset", _write_webdataset(str(tmp_path / "wds"))),
        "tfds": convert.make_input("tfds", _write_tfds(str(tmp_path / "tfds"))),
    }
    for name, source in inputs.items():
        out = str(tmp_path / ("out_" + name))
        written, skipped = convert.convert(source, out, records_per_shard=4)
        assert written == len(_CAPTIONS), name
        assert skipped == (2 if name == "webdataset" else 1), name
        assert _decoded(out) == expected, name


def test_tfds_class_labels_and_pipeline_source(tmp_path):
    directory = _write_tfds(str(tmp_path / "tfds"), with_captions=False)
    source = convert.TfdsSource(directory, label_key="label")
    captions = sorted(source[i]["caption"] for i in range(len(source)))
    assert captions == ["a photo of cat"] * 3 + ["a photo of red car"] * 4
    config = common.get_config().data
    config.update(source="tfds", path=directory, tfds_label_key="label", image_size=16,
                  caption_dropout=0.0)
    iterator = pipeline.make_train_iterator(config, global_batch_size=6, seed=0,
                                            process_index=0, process_count=1)
    batch = next(iterator)
    assert batch["image"].shape == (6, 16, 16, 3) and iterator.counters()["skipped"] == 1
    assert set(batch["caption"]) == {"a photo of cat", "a photo of red car"}
    with pytest.raises(KeyError, match="neither caption"):
        convert.TfdsSource(directory)


@pytest.mark.slow
def test_cli_resumes_and_reports(tmp_path):
    folder = _write_folder(str(tmp_path / "folder"))
    out = str(tmp_path / "out")
    command = [sys.executable, "-m", "lidit_jax.data.convert", f"--input={folder}",
               f"--output={out}", "--format=folder", "--records_per_shard=3"]
    first = subprocess.run(command, capture_output=True, text=True, check=True)
    assert first.stdout.strip().splitlines()[-1] == "records=6 skipped=1"
    stamps = {name: os.path.getmtime(os.path.join(out, name)) for name in os.listdir(out)
              if name.endswith(".arrayrecord")}
    assert len(stamps) == 3
    os.remove(os.path.join(out, sorted(stamps)[1]))
    second = subprocess.run(command, capture_output=True, text=True, check=True)
    assert second.stdout.strip().splitlines()[-1] == "records=6 skipped=1"
    for name in sorted(stamps)[::2]:  # Complete shards were kept, not rewritten.
        assert os.path.getmtime(os.path.join(out, name)) == stamps[name]
    assert sorted(os.listdir(out)) == sorted(
        [*stamps, *(name + ".spans.npy" for name in stamps), "image_sizes.npy", "manifest.json"])
