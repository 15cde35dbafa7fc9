"""Input pipeline throughput: does the Grain pipeline keep the demo's train step fed?

    python -m benchmarks.input_pipeline [--smoke] [--repeats=3]

Two figures, each against a reference measured in the same process:
  1. demo: images/s of `make_train_iterator` on the demo's own data config (generated shapes,
     32 px, configs/demo_shapes.py) over the images/s the demo's train step consumes (the same
     config's jitted step at its batch of 32, float32, cached-text-sized states). Goal >= 5x, so
     the input never stalls a step.
  2. photos: the pipeline over JPEG records (photo-like, 320x480 and 480x320, decoded, resized
     and center-cropped to 256 px) vs a bare loop doing the same with PIL and no Grain.
"""
import os
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

from benchmarks import train_step  # noqa: E402
from benchmarks.timing import (  # noqa: E402
    interleaved_seconds, load_average, smoke_and_repeats_main)
from configs import common, demo_shapes  # noqa: E402
from lidit_jax.data import images, pipeline, records  # noqa: E402

DEMO_LLM_WIDTH = 576  # SmolLM2-135M.


def _photo(index):
    """A smooth, photo-like image (JPEG-compressible, unlike noise)."""
    height, width = (320, 480) if index % 2 else (480, 320)
    rng = np.random.default_rng(index)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    phases = rng.uniform(0, 6, 3)
    image = np.stack([np.sin(6 * x + 4 * y + p) for p in phases], -1) * 100 + 128
    image += rng.normal(0, 8, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def bare_loop(source, size):
    """images/s of PIL decode + resize + center crop + float conversion, one record at a time."""
    start = time.perf_counter()
    for index in range(len(source)):
        image = images.decode(records.decode_record(source[index])["image_bytes"])
        images.to_model_range(images.resize_center_crop(image, size, size))
    return len(source) / (time.perf_counter() - start)


def pipeline_rate(data_config, batch, num_images):
    """images/s of `make_train_iterator` after its first batch (worker start-up excluded)."""
    iterator = pipeline.make_train_iterator(data_config, global_batch_size=batch, seed=0,
                                            process_index=0, process_count=1)
    next(iterator)
    steps = max(1, num_images // batch)
    start = time.perf_counter()
    for _ in range(steps):
        next(iterator)
    rate = steps * batch / (time.perf_counter() - start)
    iterator.close()
    return rate


def demo_record(smoke, repeats):
    config = demo_shapes.get_config()
    batch = config.train.batch_size
    if smoke:
        config.model.update(depth=1, width=32, heads=2)
        config.text.update(max_length=8)
        config.text.refiner.update(depth=1, heads=2)
        batch = 4
    config.train.batch_size = batch
    data_rate = pipeline_rate(config.data, batch, batch if smoke else 40 * batch)
    rng = np.random.default_rng(0)
    size, length = config.data.image_size, config.text.max_length
    arrays = {"x0": rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32),
              "states": rng.normal(size=(batch, length, DEMO_LLM_WIDTH)).astype(np.float32),
              "mask": np.ones((batch, length), bool)}
    step, _ = train_step.ours_step(config, arrays, DEMO_LLM_WIDTH)
    seconds = interleaved_seconds({"step": step}, 1 if smoke else repeats)["step"]
    step_rate = batch / seconds
    return {"name": "demo", "pipeline_images_per_s": data_rate,
            "train_step_images_per_s": step_rate, "ratio": data_rate / step_rate,
            "num_workers": config.data.num_workers, "batch": batch, "image": size}


def photos_record(smoke, directory):
    num, size, batch = (8, 32, 4) if smoke else (256, 256, 16)
    encode = lambda i: records.encode_record(  # noqa: E731
        records.encode_image(_photo(i), "jpeg", quality=90), f"photo {i}", {}, "jpeg")
    records.write_records(directory, num, encode, records_per_shard=num)
    bare = bare_loop(records.ArrayRecordSource(directory), size)
    config = common.get_config().data
    config.update(source="arrayrecord", path=directory, image_size=size, num_workers=0,
                  caption_dropout=0.1)
    rate = pipeline_rate(config, batch, num)
    return {"name": "photos", "pipeline_images_per_s": rate, "bare_pil_images_per_s": bare,
            "ratio": rate / bare, "num_workers": 0, "batch": batch, "image": size}


def run(smoke=False, repeats=3):
    load = load_average()
    with tempfile.TemporaryDirectory() as directory:
        out = [demo_record(smoke, repeats), photos_record(smoke, directory)]
    return [dict(record, load_average=load) for record in out]


if __name__ == "__main__":
    smoke_and_repeats_main(__doc__, run, "tiny shapes, one repeat")
