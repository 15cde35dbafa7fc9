"""The latent cache: the VAE encoder runs once over a data set's images, never in training.

`vae.latent_cache_dir` (relative paths are inside the workdir) is a `lidit_jax.data.array_cache`
directory. Record i holds {"latent": bf16 [h, w, channels]}: the VAE posterior mean, unscaled,
of image i preprocessed exactly as training would (resize to cover its aspect-ratio bucket,
center crop, [-1, 1]), so h, w = bucket / vae downsample. A record whose image cannot be read
holds an empty latent [0, 0, channels]; training skips it as it skips a bad image. bf16 halves
the disk (a 256 px SD3 latent is 32 KiB) at a rounding of at most 2^-8 (0.4 %) relative, far
below the VAE's own reconstruction error.

metadata.json records the VAE weights fingerprint, the preprocessing (image size, buckets,
resize method) and the data set; a config that differs in any of these is refused with the
field that differs.
"""
import jax
import ml_dtypes
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from lidit_jax.data import array_cache, batch_plan, encode_order, images, pipeline
from lidit_jax.parallel import mesh as mesh_lib

LATENT_DTYPE = ml_dtypes.bfloat16
# Bump when the image preprocessing changes, so old caches are refused.
PREPROCESSING = "resize_center_crop/v1"
# Batches of records per window read ahead: grouped by bucket within it, so a batch is full
# unless its bucket holds under batch_size of the window's records.
WINDOW_BATCHES = 4


def expected_metadata(vae, data_config, num_records):
    """What a latent cache for this VAE, preprocessing and data set must record."""
    buckets = images.parse_buckets(data_config.buckets, data_config.image_size)
    return {"vae": vae.fingerprint, "latent_channels": int(vae.channels),
            "downsample": int(vae.downsample), "dtype": np.dtype(LATENT_DTYPE).name,
            "preprocessing": {"method": PREPROCESSING, "buckets": [list(b) for b in buckets]},
            "data": pipeline.source_identity(data_config, num_records)}


def write_latent_cache(vae, config, workdir, source, *, batch_size=32, process_index=0,
                       process_count=1, progress=None, read=None):
    """Encodes every image of `source` with `vae` into `vae.latent_cache_dir` (resumable), the
    batches sharded over this process's devices (`sharded_stages`).

    read: index -> (raw record, (height, width) from its image header); default reads `source`
      (--mode=encode passes `image_sizes.EncodedSizes.read`, which keeps the sizes).
    Returns the number of records this process wrote (0 when the cache was complete).
    """
    def read_source(index):
        raw = source[index]
        return raw, batch_plan.header_size(raw)

    directory = array_cache.resolve(config.vae.latent_cache_dir, workdir)
    return array_cache.write_cache(
        directory, len(source), sharded_stages(vae, config.data, read or read_source, batch_size),
        expected_metadata(vae, config.data, len(source)), batch_size=batch_size,
        process_index=process_index, process_count=process_count, progress=progress)


def sharded_stages(vae, data_config, read, batch_size, mesh=None):
    """The VAE encoder as `encode_order.Stages`: a reader thread reads a window of records,
    decodes and resizes each to its bucket and groups them by bucket; the caller's thread
    dispatches each batch sharded over `mesh`'s devices (default: this process's,
    `mesh_lib.local_mesh`); a writer thread fetches the means as bf16.

    A batch is padded (with copies of its last image) to the device count times a power of two,
    so each bucket compiles log2(batch_size / devices) + 1 shapes at most.
    """
    buckets = images.parse_buckets(data_config.buckets, data_config.image_size)
    mesh = mesh_lib.local_mesh() if mesh is None else mesh
    devices = mesh.devices.size
    batch_sharding = NamedSharding(mesh, PartitionSpec(mesh.axis_names))
    vae.replicate(mesh)
    empty = np.zeros((0, 0, vae.channels), LATENT_DTYPE)

    def pixels(index):  # -> (bucket, uint8 [H, W, 3]) or None for an unreadable image.
        raw, size = read(index)
        if min(size) <= 0:
            return None
        bucket = int(batch_plan.assign_buckets([size], buckets)[0]) if len(buckets) > 1 else 0
        try:
            image, _ = pipeline.parse_record(raw)
        except images.BadRecord:
            return None
        return bucket, images.resize_center_crop(image, *buckets[bucket])

    def prepare(indices):
        by_bucket, bad = {}, []
        for index, found in zip(indices, encode_order.read_all(pixels, indices)):
            if found is None:
                bad.append(index)
            else:
                by_bucket.setdefault(found[0], []).append((index, found[1]))
        batches = [([index], None) for index in bad]
        for group in by_bucket.values():
            for start in range(0, len(group), batch_size):
                chunk = group[start:start + batch_size]
                batches.append(([index for index, _ in chunk],
                                _padded(np.stack([image for _, image in chunk]), devices)))
        return batches

    def compute(batch):  # uint8 [n, H, W, 3] -> means [n, h, w, c] on the devices.
        if batch is None:  # Unreadable images: nothing for the device.
            return None
        # uint8 to the devices and [-1, 1] there: a quarter of the bytes a float32 batch moves.
        return vae.encode(images.to_model_range(jax.device_put(batch, batch_sharding)))

    def finish(indices, means):
        if means is None:
            return [{"latent": empty} for _ in indices]
        means = np.asarray(means, np.float32)[:len(indices)].astype(LATENT_DTYPE)
        return [{"latent": mean} for mean in means]

    return encode_order.Stages(prepare=prepare, compute=compute, finish=finish,
                               window=WINDOW_BATCHES * batch_size)


def _padded(batch, devices):
    """uint8 [n, H, W, 3] -> uint8 [devices * 2^k >= n, H, W, 3], the last image repeated (its
    means are dropped)."""
    per_device = -(-len(batch) // devices)
    padded = devices * (1 << (per_device - 1).bit_length())
    return np.concatenate([batch, np.repeat(batch[-1:], padded - len(batch), axis=0)])


class CachedLatents:
    """record id -> float32 latent [h, w, channels] (unscaled); picklable for Grain workers.

    Raises images.BadRecord for a record whose image could not be encoded, so the input
    pipeline substitutes it like any bad record.
    """

    def __init__(self, directory, expected=None):
        self.cache = array_cache.ArrayCache(directory)
        if expected is not None:
            self.cache.check(expected)

    def __call__(self, record_id):
        latent = self.cache[int(record_id)]["latent"]
        if latent.size == 0:
            raise images.BadRecord("its image could not be read when the latent cache was made")
        return latent.astype(np.float32)
