"""Input pipeline throughput: the Grain pipeline vs a bare PIL decode-and-resize loop.

  python -m benchmarks.input_pipeline [--num=512] [--size=256] [--workers=0,1,2] [--batch=16]

Writes `num` JPEG records (photo-like, 320x480 and 480x320) to a temporary record set, then
measures images/s of (a) a plain loop that decodes each JPEG with PIL, resizes + center-crops it
to size x size and converts to float32, and (b) `make_train_iterator` at the same size for each
worker count, over the same records. Prints both and the ratio pipeline / bare loop.
"""
import os
import tempfile
import time

import numpy as np
from absl import app, flags

from configs import common
from lidit_jax.data import images, pipeline, records

flags.DEFINE_integer("num", 512, "records to write and read per measurement")
flags.DEFINE_integer("size", 256, "output image size")
flags.DEFINE_list("workers", ["0", "1", "2"], "Grain worker counts to measure")
flags.DEFINE_integer("batch", 16, "batch size")
FLAGS = flags.FLAGS


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
    start = time.perf_counter()
    for index in range(len(source)):
        image = images.decode(records.decode_record(source[index])["image_bytes"])
        images.to_model_range(images.resize_center_crop(image, size, size))
    return len(source) / (time.perf_counter() - start)


def pipeline_rate(directory, size, workers, batch, num):
    config = common.get_config().data
    config.update(source="arrayrecord", path=directory, image_size=size, num_workers=workers,
                  caption_dropout=0.1)
    iterator = pipeline.make_train_iterator(config, global_batch_size=batch, seed=0,
                                            process_index=0, process_count=1)
    next(iterator)  # Warm-up: worker start, first reads.
    steps = max(1, num // batch)
    start = time.perf_counter()
    for _ in range(steps):
        next(iterator)
    rate = steps * batch / (time.perf_counter() - start)
    iterator.close()
    return rate


def main(argv):
    del argv
    with tempfile.TemporaryDirectory() as directory:
        encode = lambda i: records.encode_record(  # noqa: E731
            records.encode_image(_photo(i), "jpeg", quality=90), f"photo {i}", {}, "jpeg")
        records.write_records(directory, FLAGS.num, encode, records_per_shard=FLAGS.num)
        bare = bare_loop(records.ArrayRecordSource(directory), FLAGS.size)
        print(f"bare PIL decode+resize+crop loop: {bare:.1f} images/s "
              f"({FLAGS.num} JPEG records -> {FLAGS.size}px, {os.cpu_count()} CPUs)")
        for workers in (int(w) for w in FLAGS.workers):
            rate = pipeline_rate(directory, FLAGS.size, workers, FLAGS.batch, FLAGS.num)
            print(f"pipeline num_workers={workers}: {rate:.1f} images/s, "
                  f"ratio to bare loop {rate / bare:.2f}")


if __name__ == "__main__":
    app.run(main)
