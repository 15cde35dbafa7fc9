"""Converts image-caption data into the record format (lidit_jax.data.records).

  python -m lidit_jax.data.convert --input=PATH --output=DIR --format=FORMAT
      [--records_per_shard=10000] [--image_key=image --caption_key=caption --label_key=]

Formats (each an input with len() and [i] -> dict(image, caption, metadata)):
  folder      images (jpg/jpeg/png/webp/bmp) with same-name .txt captions, searched recursively
  manifest    a .jsonl or .csv file with columns image_key (path, relative to the manifest's
              folder) and caption_key
  webdataset  a .tar file, a folder of .tar shards or a glob; samples are members sharing a key
              (name up to the first dot) with an image (jpg/jpeg/png/webp) and a caption (.txt, or
              .json with a caption_key field)
  tfds        a TFDS builder directory (with dataset_info.json) or a registered name, readable
              with tfds.data_source (ArrayRecord files); images as encoded bytes or uint8 arrays;
              without a caption feature, ClassLabel label_key gives "a photo of {class}"
Encoded images are kept as they are (validated by decoding); arrays are stored as PNG. Bad
inputs are skipped and counted, the first few logged. The output is resumable: complete shards
are kept. The last line printed is `records=<int> skipped=<int>`.
"""
import csv
import glob
import io
import json
import os
import tarfile

import numpy as np
from absl import logging
from PIL import Image

from lidit_jax.data import images, records

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
_LOGGED_SKIPS = 10


class FolderInput:
    """Images with same-name .txt captions under a folder (sorted by relative path)."""

    def __init__(self, root):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"--input={root} is not a folder")
        self.root = root
        self.paths = sorted(
            os.path.relpath(os.path.join(folder, name), root)
            for folder, _, names in os.walk(root) for name in names
            if name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        path = os.path.join(self.root, self.paths[index])
        caption_path = os.path.splitext(path)[0] + ".txt"
        if not os.path.exists(caption_path):
            raise images.BadRecord(f"{path} has no caption file {caption_path}")
        with open(path, "rb") as f, open(caption_path, "rb") as c:
            return {"image": f.read(), "caption": c.read().strip(),
                    "metadata": {"source": self.paths[index]}}


class ManifestInput:
    """Rows of a JSONL or CSV manifest: image path (relative to the manifest) and caption."""

    def __init__(self, path, image_key="image", caption_key="caption"):
        self.folder = os.path.dirname(os.path.abspath(path))
        self.image_key, self.caption_key = image_key, caption_key
        with open(path, newline="", encoding="utf-8") as f:
            if path.endswith(".jsonl"):
                self.rows = [json.loads(line) for line in f if line.strip()]
            elif path.endswith(".csv"):
                self.rows = list(csv.DictReader(f))
            else:
                raise ValueError(f"manifest {path} must end in .jsonl or .csv")
        if self.rows and not {image_key, caption_key} <= set(self.rows[0]):
            raise KeyError(f"manifest {path} has columns {sorted(self.rows[0])}; set "
                           f"--image_key/--caption_key (now {image_key!r}, {caption_key!r})")

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        row = self.rows[index]
        path = os.path.join(self.folder, row[self.image_key])
        with open(path, "rb") as f:
            return {"image": f.read(), "caption": row[self.caption_key],
                    "metadata": {"source": row[self.image_key]}}


class WebDatasetInput:
    """Samples of WebDataset tar shards (members grouped by key, in shard then member order)."""

    def __init__(self, pattern, caption_key="caption"):
        if os.path.isdir(pattern):
            paths = sorted(glob.glob(os.path.join(pattern, "*.tar")))
        else:
            paths = sorted(glob.glob(pattern))
        if not paths:
            raise FileNotFoundError(f"no .tar shards at --input={pattern}")
        self.caption_key = caption_key
        self.samples = []  # (tar path, key, {extension: member name})
        for path in paths:
            with tarfile.open(path) as tar:
                grouped = {}
                for member in tar.getmembers():
                    if member.isfile():
                        folder, name = os.path.split(member.name)
                        key, _, extension = name.partition(".")
                        members = grouped.setdefault(os.path.join(folder, key), {})
                        members[extension.lower()] = member.name
            self.samples.extend((path, key, members) for key, members in grouped.items())
        self._tars = {}

    def __len__(self):
        return len(self.samples)

    def _read(self, path, name):
        if path not in self._tars:
            self._tars[path] = tarfile.open(path)
        return self._tars[path].extractfile(name).read()

    def __getitem__(self, index):
        path, key, members = self.samples[index]
        image_name = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
        if image_name is None:
            raise images.BadRecord(f"{path}: sample {key} has no image ({sorted(members)})")
        if "txt" in members:
            caption = self._read(path, members["txt"]).strip()
        elif "json" in members:
            caption = json.loads(self._read(path, members["json"])).get(self.caption_key)
        else:
            raise images.BadRecord(f"{path}: sample {key} has no .txt or .json caption")
        return {"image": self._read(path, image_name), "caption": caption,
                "metadata": {"source": f"{os.path.basename(path)}:{key}"}}

    def __getstate__(self):
        return dict(self.__dict__, _tars={})


class TfdsSource:
    """A TFDS data set read through tfds.data_source: len(), [i] -> dict(image, caption, metadata).

    path: a builder directory (holding dataset_info.json) or a registered data set name.
    """

    def __init__(self, path, image_key="image", caption_key="caption", label_key="", split="train"):
        import tensorflow_datasets as tfds  # Heavy; only for this source.
        if os.path.exists(os.path.join(path, "dataset_info.json")):
            builder = tfds.builder_from_directory(path)
        else:
            builder = tfds.builder(path)
        self.source = builder.as_data_source(split=split)
        features = builder.info.features
        self.image_key, self.label_key = image_key, label_key
        self.caption_key = caption_key if caption_key in features else None
        self.label_names = None
        if image_key not in features:
            raise KeyError(f"TFDS {path} has no image feature {image_key!r}; features: "
                           f"{sorted(features)} (set data.tfds_image_key / --image_key)")
        if self.caption_key is None:
            if label_key not in features:
                raise KeyError(f"TFDS {path} has neither caption feature {caption_key!r} nor label "
                               f"{label_key!r}; features: {sorted(features)}")
            self.label_names = features[label_key].names
        self.path = path

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        example = self.source[int(index)]
        if self.caption_key is not None:
            caption = example[self.caption_key]
        else:
            name = self.label_names[int(example[self.label_key])]
            caption = "a photo of " + name.replace("_", " ")
        image = example[self.image_key]
        if isinstance(image, np.ndarray) and image.dtype == object:
            image = image.item()
        return {"image": image, "caption": caption, "metadata": {"source": f"{self.path}[{index}]"}}

    def caption(self, index):
        """Caption of record `index` (for the text cache); "" for a bad record, never trained on."""
        try:
            return images.check_caption(self[index]["caption"])
        except images.BadRecord:
            return ""

    def __repr__(self):
        return f"TfdsSource({self.path!r})"


def make_input(input_format, path, *, image_key="image", caption_key="caption", label_key=""):
    if input_format == "folder":
        return FolderInput(path)
    if input_format == "manifest":
        return ManifestInput(path, image_key, caption_key)
    if input_format == "webdataset":
        return WebDatasetInput(path, caption_key)
    if input_format == "tfds":
        return TfdsSource(path, image_key, caption_key, label_key)
    raise ValueError(f"--format={input_format!r}; choose folder, manifest, webdataset or tfds")


def to_entry(example):
    """Input dict(image, caption, metadata) -> record bytes; raises BadRecord for bad input."""
    caption = images.check_caption(example["caption"])
    image = example["image"]
    if isinstance(image, np.ndarray):
        images.check_array(image)
        return records.encode_record(records.encode_image(image, "png"), caption,
                                     example["metadata"], "png")
    image = bytes(image)
    images.decode(image)  # Validates: a record set holds only decodable images.
    image_format = Image.open(io.BytesIO(image)).format.lower()
    return records.encode_record(image, caption, example["metadata"], image_format)


def convert(inputs, output, records_per_shard=10000):
    """Writes `inputs` as a record set in `output`; returns (records, skipped)."""
    skipped = []

    def make_entry(index):
        try:
            return to_entry(inputs[index])
        except (images.BadRecord, OSError, KeyError, ValueError) as error:
            skipped.append(index)
            if len(skipped) <= _LOGGED_SKIPS:
                logging.warning("skipping input %d: %s: %s", index, type(error).__name__, error)
            return None
    return records.write_records(output, len(inputs), make_entry,
                                 records_per_shard=records_per_shard)


def main(argv):
    del argv
    inputs = make_input(FLAGS.format, FLAGS.input, image_key=FLAGS.image_key,
                        caption_key=FLAGS.caption_key, label_key=FLAGS.label_key)
    written, skipped = convert(inputs, FLAGS.output, FLAGS.records_per_shard)
    shards = len(records.shard_paths(FLAGS.output))
    print(f"converted {FLAGS.input} ({FLAGS.format}, {len(inputs)} inputs) -> {FLAGS.output} "
          f"({shards} shards)")
    print(f"records={written} skipped={skipped}")


if __name__ == "__main__":
    from absl import app, flags
    flags.DEFINE_string("input", None, "input path (see the module docstring)", required=True)
    flags.DEFINE_string("output", None, "output folder for ArrayRecord shards", required=True)
    flags.DEFINE_enum("format", None, ["folder", "manifest", "webdataset", "tfds"],
                      "input format", required=True)
    flags.DEFINE_string("image_key", "image", "manifest column / TFDS feature of the image")
    flags.DEFINE_string("caption_key", "caption", "manifest column / JSON field / TFDS feature "
                        "of the caption")
    flags.DEFINE_string("label_key", "", "TFDS ClassLabel feature for 'a photo of {class}'")
    flags.DEFINE_integer("records_per_shard", 10000, "records per output shard")
    FLAGS = flags.FLAGS
    app.run(main)
