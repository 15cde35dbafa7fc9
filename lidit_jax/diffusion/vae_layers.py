"""The AutoencoderKL network of diffusers, in Flax NNX with NHWC activations.

Module and parameter names follow diffusers' state dict (`encoder.down_blocks.0.resnets.1.conv1`),
so loading is a rename of the leaf (`weight` -> `kernel`/`scale`) plus a layout change; see
`lidit_jax.diffusion.vae`. Convolution kernels are HWIO [kernel_h, kernel_w, conv_in, conv_out];
norms carry `norm`. GroupNorm runs in float32 whatever the compute dtype (torch's fp16 VAEs
overflow there otherwise).
"""
import jax
import jax.numpy as jnp
from flax import nnx

from lidit_jax.nn import layers
from lidit_jax.nn.attention import dot_product_attention


class Conv2d(nnx.Module):
    """torch.nn.Conv2d on NHWC input; `padding` is ((top, bottom), (left, right))."""

    def __init__(self, in_channels, out_channels, kernel_size, *, stride=1, padding=None,
                 dtype, param_dtype, rngs):
        shape = (kernel_size, kernel_size, in_channels, out_channels)
        self.kernel = nnx.Param(
            nnx.initializers.lecun_normal()(rngs.params(), shape, param_dtype),
            out_sharding=("kernel_h", "kernel_w", "conv_in", "conv_out"))
        self.bias = nnx.Param(jnp.zeros((out_channels,), param_dtype), out_sharding=("conv_out",))
        half = kernel_size // 2
        self.padding = padding if padding is not None else ((half, half), (half, half))
        self.stride = stride
        self.dtype = dtype

    def __call__(self, x, padding=None):
        """[batch, height, width, conv_in] -> [batch, height', width', conv_out]; `padding`
        overrides the layer's own (the tiled decoder passes "VALID" for tiles with a halo)."""
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), self.kernel[...].astype(self.dtype),
            window_strides=(self.stride, self.stride),
            padding=self.padding if padding is None else padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + self.bias[...].astype(self.dtype)


class GroupNorm(nnx.Module):
    """torch.nn.GroupNorm over channels-last input (biased variance, float32 inside)."""

    def __init__(self, num_groups, channels, *, eps, param_dtype):
        if channels % num_groups:
            raise ValueError(f"GroupNorm: {channels} channels not divisible by norm_num_groups "
                             f"{num_groups}")
        self.scale = nnx.Param(jnp.ones((channels,), param_dtype), out_sharding=("norm",))
        self.bias = nnx.Param(jnp.zeros((channels,), param_dtype), out_sharding=("norm",))
        self.num_groups = num_groups
        self.eps = eps

    def __call__(self, x):
        """[batch, ..., channels] -> same shape and dtype."""
        return self.normalize(x, *self.statistics(x))

    def grouped(self, x):
        """[batch, ..., channels] -> float32 [batch, ..., groups, channels / groups]."""
        return x.astype(jnp.float32).reshape(*x.shape[:-1], self.num_groups, -1)

    def statistics(self, x):
        """[batch, ..., channels] -> (mean, variance), each float32 [batch, groups]."""
        grouped = self.grouped(x)
        axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
        mean = grouped.mean(axis=axes)
        var = jnp.square(grouped - _expand(mean, x.ndim)).mean(axis=axes)
        return mean, var

    def normalize(self, x, mean, var):
        """Normalise `x` [batch, ..., channels] with given per-group statistics [batch, groups]
        (the whole image's, when `x` is one tile of it), then scale and shift."""
        normed = (self.grouped(x) - _expand(mean, x.ndim)) * jax.lax.rsqrt(
            _expand(var, x.ndim) + self.eps)
        out = (normed.reshape(x.shape) * self.scale[...].astype(jnp.float32)
               + self.bias[...].astype(jnp.float32))
        return out.astype(x.dtype)


def _expand(stat, ndim):
    """[batch, groups] -> [batch, 1 (x spatial dims), groups, 1], to broadcast over grouped x."""
    return stat.reshape(stat.shape[0], *([1] * (ndim - 2)), stat.shape[1], 1)


class ResnetBlock2D(nnx.Module):
    """diffusers ResnetBlock2D without time embedding: norm-SiLU-conv twice, plus a 1x1
    `conv_shortcut` on the residual when the channel count changes."""

    def __init__(self, in_channels, out_channels, *, groups, eps, dtype, param_dtype, rngs):
        conv = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = GroupNorm(groups, in_channels, eps=eps, param_dtype=param_dtype)
        self.conv1 = Conv2d(in_channels, out_channels, 3, **conv)
        self.norm2 = GroupNorm(groups, out_channels, eps=eps, param_dtype=param_dtype)
        self.conv2 = Conv2d(out_channels, out_channels, 3, **conv)
        self.conv_shortcut = (Conv2d(in_channels, out_channels, 1, **conv)
                              if in_channels != out_channels else None)

    def __call__(self, x):
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Downsample2D(nnx.Module):
    """Pad bottom/right by one, then a 3x3 stride-2 convolution (diffusers, padding=0)."""

    def __init__(self, channels, *, dtype, param_dtype, rngs):
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=((0, 1), (0, 1)),
                           dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        return self.conv(x)


class Upsample2D(nnx.Module):
    """Nearest-neighbour x2, then a 3x3 convolution."""

    def __init__(self, channels, *, dtype, param_dtype, rngs):
        self.conv = Conv2d(channels, channels, 3, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, padding=None):
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2), padding)


class SpatialAttention(nnx.Module):
    """The mid-block self-attention over all pixels: one head of width `channels`, GroupNorm
    first, residual added back (diffusers Attention with residual_connection=True)."""

    def __init__(self, channels, *, groups, eps, dtype, param_dtype, rngs):
        self.group_norm = GroupNorm(groups, channels, eps=eps, param_dtype=param_dtype)
        dense = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.to_q = layers.linear(channels, channels, ("conv_in", "conv_out"), **dense)
        self.to_k = layers.linear(channels, channels, ("conv_in", "conv_out"), **dense)
        self.to_v = layers.linear(channels, channels, ("conv_in", "conv_out"), **dense)
        self.to_out = layers.linear(channels, channels, ("conv_in", "conv_out"), **dense)

    def __call__(self, x, query_chunk=0):
        """[batch, height, width, channels] -> same. `query_chunk` > 0 attends that many query
        pixels at a time (each still sees every key): memory for the logits falls from
        (height * width)^2 to query_chunk * height * width, the result is the same."""
        batch, height, width, channels = x.shape
        h = self.group_norm(x).reshape(batch, height * width, 1, channels)
        query, key, value = self.to_q(h), self.to_k(h), self.to_v(h)
        tokens = height * width
        if 0 < query_chunk < tokens:
            chunks = -(-tokens // query_chunk)
            query = jnp.pad(query, ((0, 0), (0, chunks * query_chunk - tokens), (0, 0), (0, 0)))
            query = query.reshape(batch, chunks, query_chunk, 1, channels).swapaxes(0, 1)
            out = jax.lax.map(lambda q: dot_product_attention(q, key, value), query)
            out = out.swapaxes(0, 1).reshape(batch, chunks * query_chunk, 1, channels)[:, :tokens]
        else:
            out = dot_product_attention(query, key, value)
        return x + self.to_out(out).reshape(x.shape).astype(x.dtype)


class MidBlock(nnx.Module):
    """UNetMidBlock2D: resnet, (attention), resnet at constant width."""

    def __init__(self, channels, *, add_attention, **kw):
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, **kw) for _ in range(2)])
        self.attentions = nnx.List([SpatialAttention(channels, **kw)] if add_attention else [])

    def __call__(self, x, query_chunk=0):
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x, query_chunk)
        return self.resnets[1](x)


class EncoderBlock(nnx.Module):
    """DownEncoderBlock2D: `num_layers` resnets, then an optional stride-2 downsample."""

    def __init__(self, in_channels, out_channels, num_layers, add_downsample, *, dtype,
                 param_dtype, rngs, **kw):
        conv = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, **kw, **conv)
            for i in range(num_layers)])
        self.downsamplers = nnx.List([Downsample2D(out_channels, **conv)] if add_downsample
                                     else [])

    def __call__(self, x):
        for module in (*self.resnets, *self.downsamplers):
            x = module(x)
        return x


class DecoderBlock(nnx.Module):
    """UpDecoderBlock2D: `num_layers` resnets, then an optional nearest x2 upsample."""

    def __init__(self, in_channels, out_channels, num_layers, add_upsample, *, dtype,
                 param_dtype, rngs, **kw):
        conv = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, **kw, **conv)
            for i in range(num_layers)])
        self.upsamplers = nnx.List([Upsample2D(out_channels, **conv)] if add_upsample else [])

    def __call__(self, x):
        for module in (*self.resnets, *self.upsamplers):
            x = module(x)
        return x


class Encoder(nnx.Module):
    """Images [batch, H, W, in_channels] -> moments [batch, H/f, W/f, 2 * latent_channels]."""

    def __init__(self, cfg, *, dtype, param_dtype, rngs):
        kw = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps, dtype=dtype,
                  param_dtype=param_dtype, rngs=rngs)
        widths = cfg.block_out_channels
        self.conv_in = Conv2d(cfg.in_channels, widths[0], 3, dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs)
        self.down_blocks = nnx.List([
            EncoderBlock(widths[max(i - 1, 0)], widths[i], cfg.layers_per_block,
                         i < len(widths) - 1, **kw)
            for i in range(len(widths))])
        self.mid_block = MidBlock(widths[-1], add_attention=cfg.mid_block_add_attention, **kw)
        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, widths[-1], eps=cfg.norm_eps,
                                       param_dtype=param_dtype)
        self.conv_out = Conv2d(widths[-1], 2 * cfg.latent_channels, 3, dtype=dtype,
                               param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """Latents [batch, h, w, latent_channels] -> images [batch, h*f, w*f, out_channels]."""

    def __init__(self, cfg, *, dtype, param_dtype, rngs):
        kw = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps, dtype=dtype,
                  param_dtype=param_dtype, rngs=rngs)
        widths = tuple(reversed(cfg.block_out_channels))
        self.conv_in = Conv2d(cfg.latent_channels, widths[0], 3, dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs)
        self.mid_block = MidBlock(widths[0], add_attention=cfg.mid_block_add_attention, **kw)
        self.up_blocks = nnx.List([
            DecoderBlock(widths[max(i - 1, 0)], widths[i], cfg.layers_per_block + 1,
                         i < len(widths) - 1, **kw)
            for i in range(len(widths))])
        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, widths[-1], eps=cfg.norm_eps,
                                       param_dtype=param_dtype)
        self.conv_out = Conv2d(widths[-1], cfg.out_channels, 3, dtype=dtype,
                               param_dtype=param_dtype, rngs=rngs)

    def __call__(self, z):
        x = self.latent_stage(z)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))

    def latent_stage(self, z, query_chunk=0):
        """The part at latent resolution: conv_in and the mid block -> [batch, h, w, width]."""
        return self.mid_block(self.conv_in(z), query_chunk)


class AutoencoderKL(nnx.Module):
    """Encoder + decoder with the optional 1x1 `quant_conv` / `post_quant_conv` (SD 1.x/2.x/XL
    have them; SD3/FLUX do not)."""

    def __init__(self, cfg, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs):
        self.encoder = Encoder(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.decoder = Decoder(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        two_c, c = 2 * cfg.latent_channels, cfg.latent_channels
        conv = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.quant_conv = Conv2d(two_c, two_c, 1, **conv) if cfg.use_quant_conv else None
        self.post_quant_conv = Conv2d(c, c, 1, **conv) if cfg.use_post_quant_conv else None
        self.dtype = dtype

    def moments(self, images):
        """[batch, H, W, 3] in [-1, 1] -> (mean, logvar), each [batch, H/f, W/f, latent] f32;
        logvar clamped to [-30, 20] as diffusers' DiagonalGaussianDistribution does."""
        h = self.encoder(images.astype(self.dtype))
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, latents):
        """[batch, h, w, latent] (unscaled) -> [batch, h*f, w*f, 3] float32."""
        return self.decoder(self.decoder_input(latents)).astype(jnp.float32)

    def decoder_input(self, latents):
        """Unscaled latents -> the decoder's input (compute dtype, post_quant_conv applied)."""
        z = latents.astype(self.dtype)
        return z if self.post_quant_conv is None else self.post_quant_conv(z)
