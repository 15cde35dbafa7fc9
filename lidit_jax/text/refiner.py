"""The paper's text side in the denoiser: linguistic token refiners, the collaborative refiner.

Per LLM k, with frozen states s_k [batch, len_k, width_k] and its attention mask:
  pooled_k = proj_k(masked mean of norm(s_k))                        [batch, embed]
  c_k      = t_emb + pooled_k                 (the gate condition of branch k)
  x_k      = in_proj_k(norm(s_k))                                    [batch, len_k, embed]
  x_k      = depth x [x += g_attn(c_k) * SelfAttn(LN(x)),  x += g_ffn(c_k) * FFN(LN(x))]
             (bidirectional, padding-masked; gates zero-initialised, so each block starts as the
             identity; text.refiner.gating=False: plain residuals; causal=True: the ablation's
             causal attention mask. The gates still see c_k, the whole caption's mean, so later
             words reach earlier tokens through them: docs/ablation.md, "Text-only readout",
             measures that channel)
Collaborative fusion (K >= 1), branch k modulated by c_k = t_emb + pooled_k (the paper: "the
same input as the gating network"; text.collaborative.modulation="mean": every branch by
t_emb + mean_k pooled_k):
  x_k      = collaborative.depth x [x += gate * CrossAttn(query = mod(LN(x_k)),
                                                  key/value = the other branches' tokens),
                                    x += gate * FFN(mod(LN(x_k)))]   (adaLN shift/scale/gate)
  With K = 1 there is no other branch to attend to, so each block is its adaLN FFN alone
  (adding LLMs later changes the blocks, not the fusion setting).
Then each branch keeps only its prompt tokens (text.drop_instruction; instruction and template
tokens shaped the refinement but are not attended to by the DiT), gathered to the front of its
len_k (= text.max_length) slots with a mask, and the branches are concatenated on the
token axis:
  tokens [batch, sum_k len_k, embed], token_mask [batch, sum_k len_k], pooled = mean_k pooled_k.

Empty prompts (caption dropout, the unconditional half of classifier-free guidance) select no
token; such a branch keeps its last real token visible instead (with a chat template, the
end-of-turn / assistant-header token, whose causal LLM state has read the whole template), so
every row the DiT cross-attends to has a visible key and no attention kernel ever sees an empty
row. Rows with no real token at all (never produced by the tokenizer) keep their last position.

Precision: parameters in `param_dtype`, matmuls in `dtype`, residual streams, norms and the
outputs in float32.
"""
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lidit_jax.nn.layers import MLP, Attention, RMSNorm, layer_norm, linear, modulate
from lidit_jax.parallel.sharding import constrain
from lidit_jax.text.features import LayerPool, encoder_names, pools_layers

TEXT_TOKENS = ("batch", "text_length", "embed")
FUSIONS = ("single", "concat", "collaborative")
MODULATIONS = ("per_branch", "mean")  # text.collaborative.modulation
zeros_init = nnx.initializers.zeros_init()


def masked_mean(x, mask):
    """x [batch, len, dim], mask [batch, len] bool -> [batch, dim] float32 (0 for empty rows)."""
    x = jnp.where(mask[..., None], x.astype(jnp.float32), 0.0)
    count = jnp.sum(mask, axis=1, keepdims=True).astype(jnp.float32)
    return jnp.sum(x, axis=1) / jnp.maximum(count, 1.0)


def keep_one_key(mask):
    """[batch, len] bool; rows with no True get position 0 visible (HunyuanVideo's guard), so a
    softmax never runs over nothing and gradients stay finite whatever the attention kernel."""
    return mask.at[:, 0].set(mask[:, 0] | ~jnp.any(mask, axis=1))


def gather_selected(x, select, fallback):
    """Moves the selected tokens of each row to the front, in order.

    x [batch, len, embed]; select, fallback [batch, len] bool (fallback: used for rows where
    nothing is selected). Returns tokens [batch, len, embed] (zeros after the kept ones) and
    their mask [batch, len] bool.
    """
    select = jnp.where(jnp.any(select, axis=1, keepdims=True), select, fallback)
    order = jnp.argsort(~select, axis=1, stable=True)
    tokens = jnp.take_along_axis(x, order[..., None], axis=1)
    mask = jnp.arange(x.shape[1])[None, :] < jnp.sum(select, axis=1, keepdims=True)
    return jnp.where(mask[..., None], tokens, 0.0), mask


def last_real_token(mask):
    """[batch, len] bool -> one-hot [batch, len] of the last True position (the last position
    for rows with none)."""
    length = mask.shape[1]
    last = length - 1 - jnp.argmax(mask[:, ::-1], axis=1)
    return jnp.arange(length)[None, :] == last[:, None]


class TokenRefinerBlock(nnx.Module):
    """Pre-norm self-attention + FFN over one LLM's tokens, residual branches gated by c_k."""

    def __init__(self, width, refiner_config, *, dtype, param_dtype, rngs):
        r = refiner_config
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attn_norm = RMSNorm(width, param_dtype=param_dtype)
        # implementation "auto": text sequences (text.max_length) are short enough that it
        # keeps XLA, whose arbitrary masks cost nothing extra.
        self.attention = Attention(width, r.heads, implementation="auto", **kwargs)
        self.mlp_norm = RMSNorm(width, param_dtype=param_dtype)
        self.mlp = MLP(width, int(width * r.mlp_ratio), activation="gelu_tanh", **kwargs)
        # Zero-initialised: both gates start at 0, so the block starts as the identity.
        self.gates = (linear(width, 2 * width, ("embed", "modulation"), kernel_init=zeros_init,
                             **kwargs) if r.gating else None)
        self.causal = r.causal

    def __call__(self, x, key_mask, c):
        """x [batch, len, embed] float32; key_mask [batch, len]; c [batch, embed]."""
        if self.gates is None:
            attn_gate = mlp_gate = 1.0
        else:
            attn_gate, mlp_gate = jnp.split(
                self.gates(jax.nn.silu(c)).astype(jnp.float32)[:, None, :], 2, axis=-1)
        h = self.attention(self.attn_norm(x), key_mask=key_mask, causal=self.causal)
        x = constrain(x + attn_gate * h.astype(jnp.float32), TEXT_TOKENS)
        h = self.mlp(self.mlp_norm(x))
        return constrain(x + mlp_gate * h.astype(jnp.float32), TEXT_TOKENS)


class TokenRefiner(nnx.Module):
    """The linguistic token refiner of one LLM: [batch, len, width_k] -> [batch, len, embed].

    Also owns the pooled-text projection (masked mean of the normed states -> embed), which is
    both this branch's share of the DiT's text vector and, plus t_emb, its gate condition.
    """

    def __init__(self, llm_width, width, refiner_config, *, dtype, param_dtype, rngs):
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # LLM hidden states (un-normed, layer -3) carry a few huge outlier channels; RMS
        # normalisation keeps the projections' inputs on one scale.
        self.input_norm = (RMSNorm(llm_width, param_dtype=param_dtype)
                           if refiner_config.input_norm else None)
        self.input_proj = linear(llm_width, width, ("channels", "embed"), **kwargs)
        self.pool_proj = linear(llm_width, width, ("channels", "embed"), **kwargs)
        self.blocks = nnx.List([TokenRefinerBlock(width, refiner_config, **kwargs)
                                for _ in range(refiner_config.depth)])

    def pooled(self, states, mask):
        """states [batch, len, width_k], mask [batch, len] -> [batch, embed] float32."""
        normed = states if self.input_norm is None else self.input_norm(states)
        return self.pool_proj(masked_mean(normed, mask)).astype(jnp.float32)

    def __call__(self, states, mask, c):
        """states [batch, len, width_k]; mask [batch, len] bool; c [batch, embed] float32.
        Returns [batch, len, embed] float32 (padding positions hold finite, unused values)."""
        normed = states if self.input_norm is None else self.input_norm(states)
        x = self.input_proj(normed).astype(jnp.float32)
        # Garbage in padding slots (e.g. inf) must not reach the real tokens through 0 * inf.
        x = constrain(jnp.where(mask[..., None], x, 0.0), TEXT_TOKENS)
        key_mask = keep_one_key(mask)
        for block in self.blocks:
            x = block(x, key_mask, c)
        return x


class CollaborativeBranch(nnx.Module):
    """One LLM's branch of a collaborative block: cross-attention to the other branches' tokens
    (none when it is the only branch) and an FFN, both with adaLN shift/scale/gate from c
    (zero-initialised: identity at start)."""

    def __init__(self, width, collaborative_config, *, cross_attention, dtype, param_dtype, rngs):
        cc = collaborative_config
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.context_norm = RMSNorm(width, param_dtype=param_dtype) if cross_attention else None
        self.attention = (Attention(width, cc.heads, implementation="auto", **kwargs)
                          if cross_attention else None)
        self.mlp = MLP(width, int(width * cc.mlp_ratio), activation="gelu_tanh", **kwargs)
        sublayers = 2 if cross_attention else 1
        self.modulation = linear(width, 3 * sublayers * width, ("embed", "modulation"),
                                 kernel_init=zeros_init, **kwargs)

    def __call__(self, x, context, context_mask, c):
        """x [batch, len, embed] f32; context [batch, ctx_len, embed] (the other branches) and
        context_mask [batch, ctx_len] (>= 1 True per row), both None without cross-attention;
        c [batch, embed]."""
        modulation = jnp.split(self.modulation(jax.nn.silu(c)).astype(jnp.float32),
                               self.modulation.kernel.shape[-1] // x.shape[-1], axis=-1)
        if self.attention is not None:
            attn_shift, attn_scale, attn_gate, *modulation = modulation
            h = self.attention(modulate(layer_norm(x), attn_shift, attn_scale),
                               self.context_norm(context), key_mask=context_mask)
            x = constrain(x + attn_gate[:, None, :] * h.astype(jnp.float32), TEXT_TOKENS)
        mlp_shift, mlp_scale, mlp_gate = modulation
        h = self.mlp(modulate(layer_norm(x), mlp_shift, mlp_scale))
        return constrain(x + mlp_gate[:, None, :] * h.astype(jnp.float32), TEXT_TOKENS)


class CollaborativeBlock(nnx.Module):
    """All K branches updated at once from the same inputs (no branch sees another's update)."""

    def __init__(self, num_branches, width, collaborative_config, *, dtype, param_dtype, rngs):
        self.branches = nnx.List([
            CollaborativeBranch(width, collaborative_config, cross_attention=num_branches > 1,
                                dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            for _ in range(num_branches)])

    def __call__(self, xs, masks, cs):
        """xs, masks: K x [batch, len_k, embed] / [batch, len_k] bool; cs: K x [batch, embed],
        each branch's modulation condition."""
        if len(xs) == 1:
            return [self.branches[0](xs[0], None, None, cs[0])]
        out = []
        for k, branch in enumerate(self.branches):
            others = [j for j in range(len(xs)) if j != k]
            context = jnp.concatenate([xs[j] for j in others], axis=1)
            context_mask = keep_one_key(jnp.concatenate([masks[j] for j in others], axis=1))
            out.append(branch(xs[k], context, context_mask, cs[k]))
        return out


class TextConditioner(nnx.Module):
    """Frozen LLM states of K LLMs -> the DiT's text tokens, their mask, and the pooled text vector.

    `TextConditioner(text_config, llm_widths, width, dtype=..., param_dtype=..., rngs=...)`:
    text_config = config.text (refiner, collaborative, fusion, drop_instruction); llm_widths =
    the hidden size of each LLM in branch order; width = the DiT's width (embed).
    """

    def __init__(self, text_config, llm_widths: Sequence[int], width: int, *,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        fusion = text_config.fusion
        if fusion not in FUSIONS:
            raise ValueError(f"text.fusion={fusion!r}; known: {FUSIONS}")
        if fusion == "single" and len(llm_widths) != 1:
            raise ValueError(f"text.fusion='single' needs exactly one LLM, got {len(llm_widths)}; "
                             "set text.fusion to 'concat' or 'collaborative'")
        if text_config.collaborative.modulation not in MODULATIONS:
            raise ValueError(f"text.collaborative.modulation="
                             f"{text_config.collaborative.modulation!r}; known: {MODULATIONS}")
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.refiners = nnx.List([TokenRefiner(w, width, text_config.refiner, **kwargs)
                                  for w in llm_widths])
        self.collaborative = (
            nnx.List([CollaborativeBlock(len(llm_widths), width, text_config.collaborative,
                                         **kwargs)
                      for _ in range(text_config.collaborative.depth)])
            if fusion == "collaborative" else None)
        self.drop_instruction = text_config.drop_instruction
        # Branches of encoders with layer="attention_pool" receive all their hidden states
        # [batch, len, S, width_k]; a learned LayerPool per branch reduces them (features.py).
        names = encoder_names(text_config)
        pooled = [k for k, name in enumerate(names) if pools_layers(text_config, name)]
        if pooled and len(names) != len(llm_widths):
            raise ValueError(f"text.encoders names {len(names)} encoders, {len(llm_widths)} "
                             "widths given")
        self.layer_pools = nnx.Dict({str(k): LayerPool(llm_widths[k], param_dtype=param_dtype)
                                     for k in pooled})
        self.per_branch_modulation = text_config.collaborative.modulation == "per_branch"

    def select(self, x, mask, prompt_mask):
        """The tokens of one branch the DiT attends to (its prompt's own tokens with
        text.drop_instruction), moved to the front: x [batch, len, ...] -> (x [batch, len, ...]
        with zeros after the kept tokens, kept [batch, len] bool). Also used to carry per-token
        side information (the readout's mention spans) along with the tokens."""
        select = mask & prompt_mask if self.drop_instruction else mask
        return gather_selected(x, select, fallback=last_real_token(mask))

    def __call__(self, states, masks, prompt_masks, t_emb):
        """Refines, fuses and selects the text tokens the DiT cross-attends to.

        Args:
          states: K x [batch, len_k, width_k], any float dtype (bf16 from the cache);
            [batch, len_k, S_k, width_k] for an encoder with layer="attention_pool".
          masks: K x [batch, len_k] bool attention masks (False on padding).
          prompt_masks: K x [batch, len_k] bool, True on the prompt's own tokens.
          t_emb: [batch, embed] timestep embedding.
        Returns:
          tokens [batch, sum_k len_k, embed] float32, token_mask [batch, sum_k len_k] bool,
          pooled [batch, embed] float32 (the text vector; t_emb not included).
        """
        if not len(states) == len(masks) == len(prompt_masks) == len(self.refiners):
            raise ValueError(f"{len(self.refiners)} LLM branches configured (text.encoders) but "
                             f"got {len(states)} states, {len(masks)} masks, "
                             f"{len(prompt_masks)} prompt masks")
        t_emb = t_emb.astype(jnp.float32)
        states = [self.layer_pools[str(k)](s) if str(k) in self.layer_pools else s
                  for k, s in enumerate(states)]
        pooled_k = [r.pooled(s, m) for r, s, m in zip(self.refiners, states, masks)]
        xs = [r(s, m, t_emb + p)
              for r, s, m, p in zip(self.refiners, states, masks, pooled_k)]
        pooled = sum(pooled_k) / len(pooled_k)
        if self.collaborative is not None:
            cs = ([t_emb + p for p in pooled_k] if self.per_branch_modulation
                  else [t_emb + pooled] * len(xs))
            for block in self.collaborative:
                xs = block(xs, masks, cs)

        tokens, token_masks = [], []
        for x, mask, prompt_mask in zip(xs, masks, prompt_masks):
            gathered, kept = self.select(x, mask, prompt_mask)
            tokens.append(gathered)
            token_masks.append(kept)
        tokens = constrain(jnp.concatenate(tokens, axis=1), TEXT_TOKENS)
        return tokens, jnp.concatenate(token_masks, axis=1), pooled
