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
import ml_dtypes
import numpy as np

from lidit_jax.data import array_cache, batch_plan, images, pipeline

LATENT_DTYPE = ml_dtypes.bfloat16
# Bump when the image preprocessing changes, so old caches are refused.
PREPROCESSING = "resize_center_crop/v1"


def expected_metadata(vae, data_config, num_records):
    """What a latent cache for this VAE, preprocessing and data set must record."""
    buckets = images.parse_buckets(data_config.buckets, data_config.image_size)
    return {"vae": vae.fingerprint, "latent_channels": int(vae.channels),
            "downsample": int(vae.downsample), "dtype": np.dtype(LATENT_DTYPE).name,
            "preprocessing": {"method": PREPROCESSING, "buckets": [list(b) for b in buckets]},
            "data": pipeline.source_identity(data_config, num_records)}


def write_latent_cache(vae, config, workdir, source, *, batch_size=32, process_index=0,
                       process_count=1, progress=None):
    """Encodes every image of `source` with `vae` into `vae.latent_cache_dir` (resumable).

    Returns the number of records this process wrote (0 when the cache was complete).
    """
    buckets = images.parse_buckets(config.data.buckets, config.data.image_size)
    bucket_of_record = batch_plan.record_buckets(source, buckets)
    empty = np.zeros((0, 0, vae.channels), LATENT_DTYPE)

    def encode_batch(indices):
        # One VAE call per bucket present in the batch (one static shape per call).
        pixels = {}
        for index in indices:
            bucket = int(bucket_of_record[index])
            if bucket == batch_plan.UNREADABLE:
                continue
            try:
                image, _ = pipeline.parse_record(source[index])
            except images.BadRecord:
                continue
            pixels.setdefault(bucket, []).append(
                (index, images.resize_center_crop(image, *buckets[bucket])))
        latents = {}
        for group in pixels.values():
            batch = images.to_model_range(np.stack([image for _, image in group]))
            means = np.asarray(vae.encode(batch), np.float32).astype(LATENT_DTYPE)
            latents.update((index, mean) for (index, _), mean in zip(group, means))
        return [{"latent": latents.get(index, empty)} for index in indices]

    directory = array_cache.resolve(config.vae.latent_cache_dir, workdir)
    return array_cache.write_cache(
        directory, len(source), encode_batch, expected_metadata(vae, config.data, len(source)),
        batch_size=batch_size, process_index=process_index, process_count=process_count,
        progress=progress)


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
