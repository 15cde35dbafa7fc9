"""What the train step eats: global batches of images (or latents) and LLM text states.

`TrainInputs` owns the input pipeline, the frozen text encoders (or their cache) and the image
space (pixels, a VAE, or the VAE's latent cache), and turns each host-local batch into global
arrays sharded along the `batch` logical axis. The batch contract, which `--mode=compile` also
lowers the step for (`abstract_batch`):
  {"x0": [batch, H, W, C] float32 (scaled latents or pixels in [-1, 1]),
   "text": {"states": [[batch, L, width_k] bf16] (attention_pool: [batch, L, layers, width_k]),
            "masks": [[batch, L] bool],
            "prompt_masks": [[batch, L] bool]}}
"""
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from lidit_jax import configuration
from lidit_jax.data import array_cache, pipeline
from lidit_jax.diffusion import latent_cache
from lidit_jax.diffusion.vae import make_image_space
from lidit_jax.parallel import sharding
from lidit_jax.text import cache as text_cache
from lidit_jax.text.encoder import PromptEncoder, as_text_inputs
from lidit_jax.train.checkpoint import encoder_fingerprints


def abstract_batch(config, mesh, state_shapes, channels, image_hw):
    """ShapeDtypeStructs, with their shardings, of one global training batch (see above).

    state_shapes: per encoder, the trailing shape of its states after [batch, L]: (width,), or
    (num_layers + 1, width) for layer="attention_pool" (text/features.py).
    """
    batch_spec = sharding.logical_to_mesh_spec(("batch",), config.mesh.rules)

    def on_batch(shape, dtype):
        spec = PartitionSpec(*batch_spec, *([None] * (len(shape) - 1)))
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

    batch, text_len = config.train.batch_size, config.text.max_length
    return {
        "x0": on_batch((batch, *image_hw, channels), jnp.float32),
        "text": {
            "states": [on_batch((batch, text_len, *shape), jnp.bfloat16)
                       for shape in state_shapes],
            "masks": [on_batch((batch, text_len), jnp.bool_) for _ in state_shapes],
            "prompt_masks": [on_batch((batch, text_len), jnp.bool_) for _ in state_shapes],
        },
    }


class TrainInputs:

    def __init__(self, config, workdir, mesh):
        self.config = config
        self.mesh = mesh
        self.image_space = make_image_space(config.vae)
        self.channels = self.image_space.channels
        size = config.data.image_size // self.image_space.downsample
        self.image_hw = (size, size)
        names = configuration.encoder_names(config)
        self.encoders = [PromptEncoder.from_config(config, name) for name in names]
        self.llm_widths = [encoder.width for encoder in self.encoders]
        # The caches must have been made from these records (their count is compared too).
        num_records = len(pipeline.make_source(config.data))
        self.cached = None
        if config.text.cache_dir:
            root = text_cache.cache_root(config, workdir)
            self.cached = [text_cache.CachedTextStates(
                root / encoder.name, config.text.max_length,
                expected=text_cache.expected_metadata(encoder, config, num_records))
                for encoder in self.encoders]
        latents = None
        if config.vae.latent_cache_dir:
            latents = latent_cache.CachedLatents(
                array_cache.resolve(config.vae.latent_cache_dir, workdir),
                expected=latent_cache.expected_metadata(self.image_space, config.data,
                                                        num_records))
        self.dataset = pipeline.make_train_iterator(config.data,
                                                    global_batch_size=config.train.batch_size,
                                                    seed=config.seed, latents=latents)
        self._fingerprints = encoder_fingerprints(self.encoders, self.image_space)
        self._batch_shardings = jax.tree.map(
            lambda x: x.sharding,
            abstract_batch(config, mesh, [encoder.state_shape for encoder in self.encoders],
                           self.channels, self.image_hw))

    # ---- Identity of the frozen encoders (checkpoints refuse to resume with others) ----------
    def fingerprints(self):
        return self._fingerprints

    def release_encoders(self):
        """Drops the LLMs, and their device memory, once the text cache serves every batch."""
        if self.cached is None:
            raise ValueError("without text.cache_dir the LLMs encode every batch")
        self.encoders = None

    # ---- Batches --------------------------------------------------------------------------
    def batch_shardings(self):
        return self._batch_shardings

    def next_batch(self):
        local = next(self.dataset)
        self.last_record_ids = np.asarray(local["record_id"])
        if self.cached is not None:
            per_llm = [reader.lookup(local["record_id"], local["caption_dropped"])
                       for reader in self.cached]
        else:
            per_llm = [jax.device_get(encoder.encode(list(local["caption"])))
                       for encoder in self.encoders]
        latents = local["latent"] if "latent" in local else self.image_space.encode(local["image"])
        x0 = np.asarray(self.image_space.scale(latents))
        return jax.tree.map(
            lambda array, sharding: jax.make_array_from_process_local_data(
                sharding, np.asarray(array)),
            {"x0": x0, "text": as_text_inputs(per_llm)}, self._batch_shardings)

    def global_record_ids(self):
        """Record ids of the last global batch, in batch order (all processes' rows)."""
        if jax.process_count() == 1:
            return self.last_record_ids
        return np.asarray(multihost_utils.process_allgather(self.last_record_ids, tiled=True))

    def encode_prompts(self, prompts):
        """Fixed prompts -> replicated text inputs (the LLMs run online for these)."""
        per_llm = [jax.device_get(encoder.encode(list(prompts))) for encoder in self.encoders]
        return as_text_inputs(per_llm)

    # ---- Data position and counters ---------------------------------------------------------
    def get_state(self):
        return self.dataset.get_state()

    def set_state(self, state):
        self.dataset.set_state(state)

    def counters(self):
        return dict(self.dataset.counters()) if hasattr(self.dataset, "counters") else {}

    def close(self):
        close = getattr(self.dataset, "close", None)
        if close is not None:
            close()
