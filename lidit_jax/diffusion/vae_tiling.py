"""Tiled VAE decode that equals the untiled decode, for images too large to decode at once.

Decoding tiles independently (diffusers' `tiled_decode`) changes the picture: each tile
normalises with its own GroupNorm statistics and attends only within itself, so tiles need
overlap and blending and still drift from the whole-image decode. Here the decoder instead runs
sweep by sweep over one grid of tiles:
  - the latent-resolution part (post_quant_conv, conv_in, mid block) is small and runs whole,
    its attention in query chunks of one tile;
  - above it, every activation lives in host memory (`_Plane`); each tile goes to the device
    with a one-pixel halo for the 3x3 convolutions (zeros outside the image, as the
    convolution's own padding sees), and each GroupNorm normalises with statistics reduced over
    all tiles of the previous sweep (`_Statistics`) before any tile is normalised.
The device holds one tile per call; the result equals the untiled decode up to float summation
order (~1e-6 relative in float32).
"""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def tiled_decode(graphdef, state, latents, tile_latent):
    """Unscaled latents [batch, h, w, latent] -> images [batch, h*f, w*f, 3] float32 (numpy).

    graphdef, state: an `AutoencoderKL` (vae_layers) split by nnx.split; tile_latent: tile side
    in latent pixels (the tile doubles with each upsampling, so output tiles are
    tile_latent * f pixels).
    """
    model = nnx.merge(graphdef, state)
    decoder = model.decoder
    x, mean, var = _latent_stage(graphdef, state, jnp.asarray(latents), tile_latent ** 2)
    plane = _Plane.from_image(np.asarray(x, np.float32), tile_latent)
    # Every GroupNorm of a diffusers VAE has config.norm_num_groups groups.
    sweep = functools.partial(_sweep, dtype=model.dtype,
                              groups=decoder.conv_norm_out.num_groups)
    for block in decoder.up_blocks:
        for resnet in block.resnets:
            hidden = plane.like(resnet.conv1.kernel.shape[-1])
            hidden_mean, hidden_var = sweep(resnet, _resnet_first, plane, hidden, mean, var)
            out = plane.like(resnet.conv2.kernel.shape[-1])
            mean, var = sweep(resnet, _resnet_second, hidden, out, hidden_mean, hidden_var,
                              residual=plane)
            plane = out
        for upsampler in block.upsamplers:
            out = plane.like(plane.data.shape[-1], scale=2)
            mean, var = sweep(upsampler, _upsample, plane, out)
            plane = out
    images = plane.like(decoder.conv_out.kernel.shape[-1])
    sweep(decoder, _output, plane, images, mean, var)
    return images.image()


class _Plane:
    """An activation [batch, height, width, channels] in host memory on a grid of `tile`-pixel
    tiles, stored with a one-pixel zero border and zeros past the image up to whole tiles, so
    every tile with its halo has the same shape."""

    def __init__(self, batch, height, width, channels, tile):
        self.height, self.width, self.tile = height, width, tile
        self.rows, self.cols = -(-height // tile), -(-width // tile)
        self.data = np.zeros((batch, self.rows * tile + 2, self.cols * tile + 2, channels),
                             np.float32)

    @classmethod
    def from_image(cls, image, tile):
        """A plane holding `image` [batch, height, width, channels]."""
        plane = cls(*image.shape, tile)
        plane.data[:, 1:1 + plane.height, 1:1 + plane.width] = image
        return plane

    def like(self, channels, scale=1):
        """An empty (zero) plane on the same grid, `scale` times the resolution."""
        return _Plane(self.data.shape[0], self.height * scale, self.width * scale, channels,
                      self.tile * scale)

    def tiles(self):
        return itertools.product(range(self.rows), range(self.cols))

    def halo(self, i, j):
        """Tile (i, j) with a one-pixel halo: [batch, tile + 2, tile + 2, channels]."""
        t = self.tile
        return self.data[:, i * t:i * t + t + 2, j * t:j * t + t + 2]

    def core(self, i, j):
        """Tile (i, j) alone: [batch, tile, tile, channels]."""
        return self.halo(i, j)[:, 1:-1, 1:-1]

    def mask(self, i, j):
        """[1, tile + 2, tile + 2, 1] float32: 1 where the haloed tile lies on the image."""
        t = self.tile
        rows = np.arange(i * t - 1, i * t + t + 1)
        cols = np.arange(j * t - 1, j * t + t + 1)
        inside = (((rows >= 0) & (rows < self.height))[:, None]
                  & ((cols >= 0) & (cols < self.width))[None, :])
        return inside[None, :, :, None].astype(np.float32)

    def write(self, i, j, tile):
        self.core(i, j)[...] = tile

    def image(self):
        """[batch, height, width, channels]."""
        return self.data[:, 1:1 + self.height, 1:1 + self.width]


class _Statistics:
    """Per-(batch, group) mean and variance of one activation, merged tile by tile with Chan et
    al.'s parallel update in float64, so the result equals a whole-image reduction."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0.0, 0.0, 0.0

    def add(self, count, mean, m2):
        count = float(count)
        mean, m2 = np.asarray(mean, np.float64), np.asarray(m2, np.float64)
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta ** 2 * (self.count * count / total)
        self.count = total

    def result(self):
        """(mean, variance), each float32 [batch, groups]."""
        return (jnp.asarray(self.mean, jnp.float32),
                jnp.asarray(self.m2 / self.count, jnp.float32))


def _sweep(module, op, source, target, *args, dtype, groups, residual=None):
    """Run `op(module, groups, haloed tile, its mask, *args[, residual tile])` on every tile of
    `source`, writing each output tile into `target`; -> (mean, variance) [batch, groups] of the
    whole output when `op` returns tile statistics, else None."""
    graphdef, state = nnx.split(module)
    statistics = _Statistics()
    for i, j in source.tiles():
        extra = () if residual is None else (jnp.asarray(residual.core(i, j), dtype),)
        out, tile_statistics = _apply(graphdef, op, groups, state,
                                      jnp.asarray(source.halo(i, j), dtype), source.mask(i, j),
                                      *args, *extra)
        target.write(i, j, np.asarray(out, np.float32))
        if tile_statistics is not None:
            statistics.add(*tile_statistics)
    return statistics.result() if statistics.count else None


@functools.partial(jax.jit, static_argnums=(0, 3))
def _latent_stage(graphdef, state, latents, query_chunk):
    """-> (x [batch, h, w, width] after the mid block, and its GroupNorm mean and variance)."""
    model = nnx.merge(graphdef, state)
    x = model.decoder.latent_stage(model.decoder_input(latents), query_chunk)
    return (x, *model.decoder.up_blocks[0].resnets[0].norm1.statistics(x))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _apply(graphdef, op, groups, state, *args):
    """One tile through `op`; compiled once per module structure, op and tile shape."""
    return op(nnx.merge(graphdef, state), groups, *args)


def _core(mask):
    return mask[:, 1:-1, 1:-1]


def _tile_statistics(y, mask, groups):
    """(count, mean, sum of squared deviations) per (batch, group) of tile y [batch, t, t, c]
    over its image pixels (`mask` [1, t, t, 1]); count is per (batch, group)."""
    grouped = y.astype(jnp.float32).reshape(*y.shape[:-1], groups, -1)
    weight = mask[..., None]
    count = weight.sum() * grouped.shape[-1]
    mean = (grouped * weight).sum(axis=(1, 2, 4)) / jnp.maximum(count, 1.0)
    deviation = jnp.square(grouped - mean[:, None, None, :, None]) * weight
    return count, mean, deviation.sum(axis=(1, 2, 4))


def _norm_silu_conv(norm, conv, x, mask, mean, var):
    """conv(silu(norm(x))) on a haloed tile [batch, t + 2, t + 2, c] -> [batch, t, t, c'],
    the conv input zeroed off the image as the whole-image conv's zero padding."""
    return conv(jax.nn.silu(norm.normalize(x, mean, var)) * mask.astype(x.dtype),
                padding="VALID")


# Each op: (module, groups of the next GroupNorm, haloed tile, its mask, ...) -> (output tile with
# zeros off the image, its `_tile_statistics` or None).

def _resnet_first(resnet, groups, x, mask, mean, var):
    hidden = _norm_silu_conv(resnet.norm1, resnet.conv1, x, mask, mean, var)
    hidden = hidden * _core(mask).astype(hidden.dtype)
    return hidden, _tile_statistics(hidden, _core(mask), groups)


def _resnet_second(resnet, groups, hidden, mask, mean, var, x):
    out = _norm_silu_conv(resnet.norm2, resnet.conv2, hidden, mask, mean, var)
    if resnet.conv_shortcut is not None:
        x = resnet.conv_shortcut(x)
    out = (x + out) * _core(mask).astype(out.dtype)
    return out, _tile_statistics(out, _core(mask), groups)


def _upsample(upsampler, groups, x, mask):
    # Halo 1 at the input resolution is 2 after nearest x2: the VALID 3x3 conv leaves 1 to crop.
    out = upsampler(x, padding="VALID")[:, 1:-1, 1:-1]
    out_mask = jnp.repeat(jnp.repeat(_core(mask), 2, axis=1), 2, axis=2)
    out = out * out_mask.astype(out.dtype)
    return out, _tile_statistics(out, out_mask, groups)


def _output(decoder, groups, x, mask, mean, var):
    del groups  # The image has no norm after it.
    return _norm_silu_conv(decoder.conv_norm_out, decoder.conv_out, x, mask, mean, var), None
