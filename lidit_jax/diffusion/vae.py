"""Image spaces: a diffusers AutoencoderKL (`VAE`) or raw pixels (`PixelSpace`).

Both expose the interface the training loop and sampler use:
  encode(images [batch, H, W, 3] in [-1, 1]) -> x [batch, H/downsample, W/downsample, channels]
  decode(x) -> images;  scale(x) / unscale(x) -> the diffusion model's normalised space;
  channels, downsample, fingerprint (identity of the weights, stored with checkpoints).

`load_vae` reads a diffusers folder (config.json + diffusion_pytorch_model.safetensors) for both
the SD 1.x/2.x/SDXL layout (4 channels, quant convs, scaling_factor) and the SD3/FLUX layout
(16 channels, no quant convs, scaling_factor and shift_factor).
"""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from safetensors import safe_open

from lidit_jax.fingerprint import file_fingerprint
from lidit_jax.diffusion.vae_layers import AutoencoderKL
from lidit_jax.diffusion.vae_tiling import tiled_decode

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
_REQUIRED_KEYS = ("in_channels", "out_channels", "latent_channels", "block_out_channels",
                  "layers_per_block", "norm_num_groups", "down_block_types", "up_block_types",
                  "scaling_factor")
# Checkpoints converted from the original SD code keep the pre-2023 attention names.
_LEGACY_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The parts of a diffusers AutoencoderKL config.json the network depends on."""
    in_channels: int
    out_channels: int
    latent_channels: int
    block_out_channels: tuple
    layers_per_block: int
    norm_num_groups: int
    scaling_factor: float
    shift_factor: float = 0.0
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    norm_eps: float = 1e-6  # Hard-coded in diffusers' Encoder/Decoder.

    @classmethod
    def from_json(cls, path):
        with open(path) as f:
            raw = json.load(f)
        for key in _REQUIRED_KEYS:
            if key not in raw:
                raise ValueError(f"{path}: missing config key {key!r} (not a diffusers "
                                 "AutoencoderKL config?)")
        blocks = len(raw["block_out_channels"])
        for key, supported in (("down_block_types", "DownEncoderBlock2D"),
                               ("up_block_types", "UpDecoderBlock2D")):
            types = list(raw[key])
            if len(types) != blocks:
                raise ValueError(f"{path}: {key} has {len(types)} entries, block_out_channels "
                                 f"{blocks}")
            for name in types:
                if name != supported:
                    raise ValueError(f"{path}: {key} entry {name!r} is not supported (only "
                                     f"{supported})")
        if any(width % raw["norm_num_groups"] for width in raw["block_out_channels"]):
            raise ValueError(f"{path}: norm_num_groups {raw['norm_num_groups']} does not divide "
                             f"every block_out_channels {raw['block_out_channels']}")
        # Per-channel latent statistics (Playground-v2.5-style) would need another scale(); refuse
        # rather than mis-scale the latents silently.
        for key in ("latents_mean", "latents_std"):
            if raw.get(key) is not None:
                raise ValueError(f"{path}: {key} is set; per-channel latent scaling is not "
                                 "supported (only scaling_factor and shift_factor)")
        if raw.get("act_fn", "silu") != "silu":
            raise ValueError(f"{path}: act_fn {raw['act_fn']!r} is not supported (only 'silu')")
        optional = {k: raw[k] for k in ("use_quant_conv", "use_post_quant_conv",
                                        "mid_block_add_attention") if raw.get(k) is not None}
        fields = {k: raw[k] for k in _REQUIRED_KEYS if not k.endswith("_types")}
        fields["block_out_channels"] = tuple(fields["block_out_channels"])
        return cls(**fields, **optional, shift_factor=float(raw.get("shift_factor") or 0.0))

    @property
    def downsample(self):
        return 2 ** (len(self.block_out_channels) - 1)


def _diffusers_name(path):
    """Our parameter path -> diffusers state-dict name (`...conv1.kernel` -> `...conv1.weight`)."""
    names = [str(p) for p in path]
    leaf = names[-1]
    names[-1] = {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)
    name = ".".join(names)
    return name.replace(".to_out.", ".to_out.0.")


def _to_ours(name, tensor, expected_shape, weights_file):
    """A torch-layout tensor -> our layout: conv OIHW -> HWIO, linear [out, in] -> [in, out]."""
    if tensor.ndim == 4:
        tensor = jnp.transpose(tensor, (2, 3, 1, 0))
    elif tensor.ndim == 2:
        tensor = tensor.T
    if tuple(tensor.shape) != tuple(expected_shape):
        raise ValueError(f"{weights_file}: tensor {name!r} has shape {tuple(tensor.shape)} in our "
                         f"(HWIO / [in, out]) layout, config.json implies {tuple(expected_shape)}")
    return tensor


def _read_tensor(handle, keys, name, weights_file):
    if name in keys:
        return handle.get_tensor(name), name
    for new, old in _LEGACY_ATTENTION.items():
        legacy = name.replace(f".{new}.", f".{old}.")
        if legacy != name and legacy in keys:
            tensor = handle.get_tensor(legacy)
            # Legacy files sometimes store these linears as 1x1 convs [out, in, 1, 1].
            return (tensor[:, :, 0, 0] if tensor.ndim == 4 else tensor), legacy
    raise ValueError(f"{weights_file}: missing tensor {name!r}")


def load_vae(path, dtype=jnp.float32, tile_size=0):
    """A diffusers AutoencoderKL folder -> `VAE` computing in `dtype` (GroupNorm in float32).

    `tile_size` (pixels) is the default for `VAE.decode`: latents larger than
    tile_size / downsample on either side are decoded tile by tile (`vae_tiling`, same result as
    decoding whole); 0 never tiles.
    """
    config_file = os.path.join(path, CONFIG_FILE)
    weights_file = os.path.join(path, WEIGHTS_FILE)
    for file in (config_file, weights_file):
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file} not found: vae.path must be a diffusers "
                                    "AutoencoderKL folder (config.json + "
                                    f"{WEIGHTS_FILE})")
    cfg = VAEConfig.from_json(config_file)
    abstract = nnx.eval_shape(lambda: AutoencoderKL(cfg, dtype=dtype, param_dtype=dtype,
                                                    rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    used = set()
    with safe_open(weights_file, framework="flax") as handle:
        keys = set(handle.keys())
        for path_tuple, variable in state.flat_state():
            name = _diffusers_name(path_tuple)
            tensor, found = _read_tensor(handle, keys, name, weights_file)
            used.add(found)
            variable.set_value(_to_ours(name, tensor, variable.shape, weights_file).astype(dtype))
    unused = sorted(keys - used)
    if unused:
        # Extra tensors mean config.json does not describe the file (e.g. use_quant_conv false
        # with quant_conv weights present); ignoring them would give wrong latents silently.
        raise ValueError(f"{weights_file}: {len(unused)} tensors not used by the config.json "
                         f"AutoencoderKL, e.g. {unused[:5]} (check use_quant_conv, "
                         "use_post_quant_conv, layers_per_block, block_out_channels)")
    model = nnx.merge(graphdef, state)
    return VAE(model, cfg, file_fingerprint([config_file, weights_file]), tile_size=tile_size)


class VAE:
    """A loaded AutoencoderKL with jitted encode/decode; see the module docstring."""

    def __init__(self, model, config, fingerprint, tile_size=0):
        self.config = config
        self.channels = config.latent_channels
        self.downsample = config.downsample
        self.fingerprint = fingerprint
        self.scaling_factor = config.scaling_factor
        self.shift_factor = config.shift_factor
        self.tile_size = tile_size
        self._graphdef, self._state = nnx.split(model)
        graphdef = self._graphdef
        # jax.jit caches one executable per input shape; the model is bound once here.
        self._moments = jax.jit(lambda state, x: nnx.merge(graphdef, state).moments(x))
        self._decode = jax.jit(lambda state, z: nnx.merge(graphdef, state).decode(z))

    def replicate(self, mesh):
        """Copies the weights to every device of `mesh`, once: `encode` of a batch sharded over
        `mesh` then copies no weights per call (--mode=encode, `latent_cache.sharded_stages`)."""
        self._state = jax.device_put(self._state, NamedSharding(mesh, PartitionSpec()))

    def _check(self, x, what, channels, multiple=1):
        if x.ndim != 4 or x.shape[-1] != channels:
            raise ValueError(f"VAE.{what} expects [batch, height, width, {channels}], got "
                             f"{tuple(x.shape)}")
        # Stride-2 convs round odd sizes up, so decode would not give the input size back.
        if x.shape[1] % multiple or x.shape[2] % multiple:
            raise ValueError(f"VAE.{what}: height and width {tuple(x.shape[1:3])} must be "
                             f"multiples of the downsampling {multiple}")

    def encode(self, images):
        """[batch, H, W, 3] in [-1, 1] -> posterior mean [batch, H/f, W/f, channels], unscaled."""
        images = jnp.asarray(images)
        self._check(images, "encode", self.config.in_channels, self.downsample)
        return self._moments(self._state, images)[0]

    def sample(self, images, key):
        """A posterior sample mean + std * N(0, 1) for `images`; same shapes as `encode`."""
        images = jnp.asarray(images)
        self._check(images, "sample", self.config.in_channels, self.downsample)
        mean, logvar = self._moments(self._state, images)
        return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)

    def decode(self, latents, tile_size=None):
        """Unscaled latents [batch, h, w, channels] -> images [batch, h*f, w*f, 3] float32.

        tile_size: pixels per decoder tile; None uses this VAE's default, 0 never tiles. The
          tiled decode (`vae_tiling`) gives the same images with device memory for one tile.
        """
        latents = jnp.asarray(latents)
        self._check(latents, "decode", self.channels)
        tile_size = self.tile_size if tile_size is None else tile_size
        tile_latent = max(tile_size // self.downsample, 1)
        if tile_size and max(latents.shape[1:3]) > tile_latent:
            return jnp.asarray(tiled_decode(self._graphdef, self._state, latents, tile_latent))
        return self._decode(self._state, latents)

    def scale(self, latents):
        """VAE latents -> the diffusion model's space: (z - shift_factor) * scaling_factor."""
        return (latents - self.shift_factor) * self.scaling_factor

    def unscale(self, x):
        """Inverse of `scale`."""
        return x / self.scaling_factor + self.shift_factor


class PixelSpace:
    """Diffusion directly on pixels: every map is the identity, 3 channels, downsample 1."""

    channels = 3
    downsample = 1
    fingerprint = "pixels"

    def encode(self, images):
        return jnp.asarray(images, jnp.float32)

    def sample(self, images, key):
        del key  # Pixels are deterministic.
        return self.encode(images)

    def decode(self, x, tile_size=None):
        del tile_size  # Nothing to tile.
        return jnp.asarray(x, jnp.float32)

    def scale(self, x):
        return x

    def unscale(self, x):
        return x


def make_image_space(vae_config):
    """config.vae -> PixelSpace (vae.path empty) or the loaded VAE, checked against the
    config's latent_channels / downsample (which describe and compile use without weights)."""
    if not vae_config.path:
        if vae_config.latent_channels != 3 or vae_config.downsample != 1:
            raise ValueError(
                f"vae.latent_channels={vae_config.latent_channels}, "
                f"vae.downsample={vae_config.downsample} describe a latent space but vae.path is "
                "empty: set vae.path to a diffusers AutoencoderKL folder (or use 3 and 1 for "
                "pixel space)")
        return PixelSpace()
    vae = load_vae(vae_config.path, tile_size=vae_config.tile_size)
    for key, got in (("latent_channels", vae.channels), ("downsample", vae.downsample)):
        if vae_config[key] != got:
            raise ValueError(f"vae.{key}={vae_config[key]} but the VAE at {vae_config.path} has "
                             f"{key} {got}: set vae.{key}={got}")
    return vae
