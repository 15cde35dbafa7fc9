"""The LI-DiT denoiser: a DiT whose blocks cross-attend to LLM text tokens refined in the loop.

    x [batch, H, W, C] --patchify (p x p)--> [batch, H/p, W/p, embed]
      --position code (model.position_embedding)--> [batch, len, embed]
      --depth x [self-attention, cross-attention to text, FFN], each sublayer
                 x += gate * sublayer(LN(x) * (1 + scale) + shift), (shift, scale, gate) from c
      --final adaLN + linear--> unpatchify --> prediction [batch, H, W, C]

Position codes, `model.position_embedding` (every one works at any height and width divisible by
the patch size, and with every attention implementation and context parallelism):
  resblock          the paper's: a conv ResBlock after patchify; position only from the zero
                    padding at the grid's borders, so a token more than two cells from an edge
                    cannot tell where it is (docs/denoiser.md measures what that costs)
  sincos            a 2-D sin-cos table added after patchify (DiT, PixArt)
  rope              2-D rotary embeddings of q and k in self-attention (Flux, SD3.5, Lumina)
  resblock+sincos, resblock+rope: the ResBlock with either (sin-cos added before it). `c` = timestep embedding + pooled text
vector (timestep embedding alone with model.pooled_text=False); each block owns its modulation (9 vectors: shift/scale/gate for 3 sublayers), gates and
the output layer start at zero (as in DiT), so the initial prediction is exactly zero.

Parameter count, per block of width d (biases and norms are O(d), ignored here):
  self-attention q, k, v, o        4 d^2
  cross-attention q, k, v, o       4 d^2   (the refined text tokens already have width d)
  FFN, ratio 4                     8 d^2
  adaLN modulation, 3 x (shift, scale, gate) from c: d -> 9 d      9 d^2
  ------------------------------------------------------------------
                                  25 d^2
  1B:  d=1152, depth 28: 25 * 1152^2 * 28 = 0.929e9  (the paper's name: 1B)
  10B: d=2816, depth 48: 25 * 2816^2 * 48 = 9.516e9  (the paper's name: 10B)
The paper gives the shapes and the names, no parameter counts.
A shared modulation (PixArt's adaLN-single, 16 d^2 per block) would give 0.59B / 6.1B, and a
DiT block without cross-attention (DiT-XL/2: 18 d^2 with 6-way modulation) 0.67B, so the
per-block 9-way modulation is both what the paper describes and what matches its names. Outside
the blocks: the position ResBlock (two 3x3 convs, 18 d^2), the timestep MLP (~d^2) and the final
layer (2 d^2) add ~3 % (1B) / ~1.8 % (10B); `lidit_jax.describe` prints the exact counts.

Precision: parameters in `model.param_dtype`, matmuls in `model.dtype` (bf16), norms and the
output in float32, the residual stream in `model.residual_dtype` (float32; bfloat16 halves its
memory traffic, as PyTorch autocast does for a bf16 DiT). Blocks are stacked on a leading
`layers` axis (created with nnx.vmap, applied with nnx.scan) so compile time does not grow with
depth.
"""
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lidit_jax.nn import cpu_paths
from lidit_jax.nn.layers import (MLP, Attention, RMSNorm, TimestepEmbedder, layer_norm, linear,
                                 modulate)
from lidit_jax.nn.positions import POSITION_EMBEDDINGS, rope_2d, sincos_2d
from lidit_jax.parallel.sharding import constrain
from lidit_jax.text.refiner import TextConditioner

REMAT_POLICIES = {
    "full": None,  # jax.checkpoint's default: save nothing, recompute the block in the backward.
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
}
TOKENS = ("batch", "length", "embed")
zeros_init = nnx.initializers.zeros_init()


def patchify(x, patch):
    """[batch, H, W, C] -> [batch, H/p, W/p, p*p*C] (patch pixels in (row, col, channel) order)."""
    b, height, width, channels = x.shape
    if height % patch or width % patch:
        raise ValueError(f"image {height}x{width} is not divisible by model.patch_size={patch}; "
                         f"resize or crop to a multiple of {patch}")
    x = x.reshape(b, height // patch, patch, width // patch, patch, channels)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, height // patch, width // patch, -1)


def unpatchify(x, patch, channels):
    """[batch, h, w, p*p*C] -> [batch, h*p, w*p, C]; the inverse of `patchify`."""
    b, h, w, _ = x.shape
    x = x.reshape(b, h, w, patch, patch, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * patch, w * patch, channels)


class DiTBlock(nnx.Module):
    """Self-attention, cross-attention to the text tokens, FFN; each with adaLN shift/scale/gate."""

    def __init__(self, width, heads, mlp_ratio, *, qk_norm, implementation, dtype, param_dtype,
                 rngs, block_sizes=None, context_parallel="none"):
        attention = dict(qk_norm=qk_norm, implementation=implementation, block_sizes=block_sizes,
                         dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # Only the self-attention sees the whole (context-sharded) image sequence.
        self.self_attention = Attention(width, heads, context_parallel=context_parallel,
                                        **attention)
        self.cross_attention = Attention(width, heads, **attention)
        self.mlp = MLP(width, int(width * mlp_ratio), activation="gelu_tanh", dtype=dtype,
                       param_dtype=param_dtype, rngs=rngs)
        # Zero-initialised: shift = scale = gate = 0, so every block starts as the identity.
        self.modulation = linear(width, 9 * width, ("embed", "modulation"), dtype=dtype,
                                 param_dtype=param_dtype, kernel_init=zeros_init, rngs=rngs)

    def modulation_vectors(self, c):
        """c [batch, embed] -> 9 x [batch, embed]: (shift, scale, gate) for attn, cross, FFN."""
        return jnp.split(self.modulation(jax.nn.silu(c)), 9, axis=-1)

    def __call__(self, x, c, context, context_mask, rope=None):
        """x [batch, len, embed] in model.residual_dtype; c [batch, embed]; context
        [batch, text_len, embed]; rope: (cos, sin) [len, head_dim/2] or None."""
        (sa_shift, sa_scale, sa_gate, ca_shift, ca_scale, ca_gate,
         ff_shift, ff_scale, ff_gate) = self.modulation_vectors(c)
        h = self.self_attention(modulate(layer_norm(x), sa_shift, sa_scale), rope=rope)
        # Each update is added in float32 and stored in the stream's dtype (model.residual_dtype).
        x = constrain((x + sa_gate[:, None, :] * h).astype(x.dtype), TOKENS)
        h = self.cross_attention(modulate(layer_norm(x), ca_shift, ca_scale), context,
                                 key_mask=context_mask)
        x = constrain((x + ca_gate[:, None, :] * h).astype(x.dtype), TOKENS)
        h = self.mlp(modulate(layer_norm(x), ff_shift, ff_scale))
        return constrain((x + ff_gate[:, None, :] * h).astype(x.dtype), TOKENS)


class PositionResBlock(nnx.Module):
    """x + conv3x3(SiLU(RMSNorm(conv3x3(SiLU(RMSNorm(x)))))) on the token grid [batch, h, w, embed].

    The zero padding at the borders is what tells a token where it is, for any grid size.
    """

    def __init__(self, width, *, dtype, param_dtype, residual_dtype, rngs):
        def conv():
            return nnx.Conv(
                width, width, (3, 3), padding="SAME", dtype=dtype, param_dtype=param_dtype,
                kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                                  ("kernel_h", "kernel_w", "conv_in", "conv_out")),
                bias_init=nnx.with_partitioning(zeros_init, ("conv_out",)),
                conv_general_dilated=cpu_paths.conv_general_dilated, rngs=rngs)

        self.norm1 = RMSNorm(width, param_dtype=param_dtype)
        self.conv1 = conv()
        self.norm2 = RMSNorm(width, param_dtype=param_dtype)
        self.conv2 = conv()
        self.residual_dtype = residual_dtype

    def __call__(self, grid):
        h = self.conv1(jax.nn.silu(self.norm1(grid)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return (grid.astype(jnp.float32) + h).astype(self.residual_dtype)


class FinalLayer(nnx.Module):
    """adaLN (shift, scale from c) + linear to patch pixels; both zero-initialised."""

    def __init__(self, width, out_features, *, dtype, param_dtype, rngs):
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=zeros_init, rngs=rngs)
        self.modulation = linear(width, 2 * width, ("embed", "modulation"), **kwargs)
        self.out = linear(width, out_features, ("embed", "channels"), **kwargs)

    def __call__(self, x, c):
        shift, scale = jnp.split(self.modulation(jax.nn.silu(c)), 2, axis=-1)
        return self.out(modulate(layer_norm(x), shift, scale))


class DiTBackbone(nnx.Module):
    """The DiT proper: patchify, position code, blocks, final layer, unpatchify.

    Call as `backbone(x, c, context, context_mask)`:
      x [batch, H, W, in_channels], c [batch, embed] (timestep embedding + text vector),
      context [batch, text_len, embed] text tokens, context_mask [batch, text_len] bool.
    Returns [batch, H, W, in_channels] float32.
    """

    def __init__(self, model_config, in_channels, *, rngs):
        m = model_config
        self.patch = m.patch_size
        self.in_channels = in_channels
        self.depth = m.depth
        self.scan_layers = m.scan_layers
        if m.remat not in ("none", *REMAT_POLICIES):
            raise ValueError(f"model.remat={m.remat!r}; use one of none, "
                             f"{', '.join(REMAT_POLICIES)}")
        self.remat = m.remat
        dtype, param_dtype = jnp.dtype(m.dtype), jnp.dtype(m.param_dtype)
        patch_features = m.patch_size**2 * in_channels
        self.patch_embed = linear(patch_features, m.width, ("channels", "embed"), dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs)
        if m.position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(f"model.position_embedding={m.position_embedding!r}; use one of "
                             f"{', '.join(POSITION_EMBEDDINGS)}")
        codes = m.position_embedding.split("+")
        self.sincos, self.rope = "sincos" in codes, "rope" in codes
        self.head_dim = m.width // m.heads
        self.residual_dtype = jnp.dtype(m.residual_dtype)
        self.position = (PositionResBlock(m.width, dtype=dtype, param_dtype=param_dtype,
                                          residual_dtype=self.residual_dtype, rngs=rngs)
                         if "resblock" in codes else None)

        def make_block(block_rngs):
            return DiTBlock(m.width, m.heads, m.mlp_ratio, qk_norm=m.qk_norm,
                            implementation=m.attention, dtype=dtype, param_dtype=param_dtype,
                            rngs=block_rngs, block_sizes=(m.splash_block_q, m.splash_block_kv),
                            context_parallel=m.context_parallel)

        if m.scan_layers:
            # One block's variables with a leading [depth] axis, logical name 'layers'.
            make_stacked = nnx.split_rngs(splits=m.depth)(nnx.vmap(
                make_block, in_axes=(0,), out_axes=0,
                transform_metadata={nnx.PARTITION_NAME: "layers"}))
            self.blocks = make_stacked(rngs)
        else:
            self.blocks = nnx.List([make_block(rngs) for _ in range(m.depth)])
        self.final = FinalLayer(m.width, patch_features, dtype=dtype, param_dtype=param_dtype,
                                rngs=rngs)

    def _apply_blocks(self, x, c, context, context_mask, rope):
        def apply_block(x, block, c, context, context_mask, rope):
            return block(x, c, context, context_mask, rope)

        if self.remat != "none":
            apply_block = nnx.remat(apply_block, policy=REMAT_POLICIES[self.remat])
        if self.scan_layers:
            scan = nnx.scan(apply_block, in_axes=(nnx.Carry, 0, None, None, None, None),
                            out_axes=nnx.Carry, unroll=cpu_paths.scan_unroll(self.depth),
                            transform_metadata={nnx.PARTITION_NAME: "layers"})
            return scan(x, self.blocks, c, context, context_mask, rope)
        for block in self.blocks:
            x = apply_block(x, block, c, context, context_mask, rope)
        return x

    def embed_patches(self, x):
        """x [batch, H, W, C] -> token grid [batch, H/p, W/p, embed] with the absolute position
        codes (sin-cos, ResBlock) applied, in model.residual_dtype."""
        grid = self.patch_embed(patchify(x, self.patch))
        if self.sincos:
            _, h, w, width = grid.shape
            grid = grid.astype(jnp.float32) + sincos_2d(h, w, width)
        if self.position is not None:
            return self.position(grid)
        return grid.astype(self.residual_dtype)

    def __call__(self, x, c, context, context_mask):
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"DiT input has shape {x.shape}; expected [batch, H, W, "
                             f"{self.in_channels}] (NHWC, in_channels={self.in_channels})")
        if context.shape[-1] != c.shape[-1]:
            raise ValueError(f"text tokens have width {context.shape[-1]}, the DiT {c.shape[-1]}")
        grid = self.embed_patches(x)
        b, h, w, width = grid.shape
        tokens = constrain(grid.reshape(b, h * w, width), TOKENS)
        context = constrain(context, ("batch", "text_length", "embed"))
        rope = rope_2d(h, w, self.head_dim) if self.rope else None
        tokens = self._apply_blocks(tokens, c, context, context_mask, rope)
        out = self.final(tokens, c).reshape(b, h, w, -1)
        return unpatchify(out, self.patch, self.in_channels).astype(jnp.float32)


class LIDiT(nnx.Module):
    """LI-DiT: timestep embedder + text conditioner (token/collaborative refiners) + DiT backbone.

    `LIDiT(config, llm_widths, in_channels, rngs=...)`: `llm_widths` = hidden size of each
    configured LLM (branch order of `text.encoders`); in_channels = 3 in pixel space, the VAE's
    latent channels (4, 16) otherwise.
    """

    def __init__(self, config, llm_widths: Sequence[int], in_channels: int, *, rngs):
        m = config.model
        dtype, param_dtype = jnp.dtype(m.dtype), jnp.dtype(m.param_dtype)
        self.time_embed = TimestepEmbedder(m.width, dtype=dtype, param_dtype=param_dtype,
                                           rngs=rngs)
        self.text = TextConditioner(config.text, list(llm_widths), m.width, dtype=dtype,
                                    param_dtype=param_dtype, rngs=rngs)
        self.backbone = DiTBackbone(m, in_channels, rngs=rngs)
        self.pooled_text = m.pooled_text

    def __call__(self, x, t, text):
        """Predicts the objective's target (epsilon, v or flow velocity) for a noisy x.

        Args:
          x: [batch, H, W, C] noisy image or latent (NHWC); H, W multiples of the patch size.
          t: [batch] float, the model time on a 0..1000 scale (DDPM: the step index scaled to
            1000 steps; flow: t * 1000), see `objectives.Objective.model_time`.
          text: one dict per LLM, {'states': [batch, len_k, width_k], 'mask': [batch, len_k]
            bool, 'prompt_mask': [batch, len_k] bool} (train/inputs.py).
        Returns:
          [batch, H, W, C] float32.
        """
        t_emb = self.time_embed(t)
        states, masks, prompt_masks = ([e[k] for e in text]
                                       for k in ("states", "mask", "prompt_mask"))
        tokens, token_mask, pooled = self.text(states, masks, prompt_masks, t_emb)
        c = t_emb.astype(jnp.float32)
        if self.pooled_text:  # Off: text reaches the DiT through cross-attention only.
            c = c + pooled.astype(jnp.float32)
        return self.backbone(x, c, tokens, token_mask)
