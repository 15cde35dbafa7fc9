"""The project's single attention entry point.

Every attention in lidit_jax (LLM encoders, refiners, DiT, VAE) calls `dot_product_attention`, so
the kernel choice (XLA everywhere, cuDNN flash attention on NVIDIA GPUs) is made in one place.
"""
import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "cudnn")


def dot_product_attention(
    query,
    key,
    value,
    *,
    key_mask=None,
    causal=False,
    sliding_window=None,
    scale=None,
    bias=None,
    implementation="xla",
):
    """Multi-head (or grouped-query) scaled dot-product attention.

    Args:
      query: [batch, q_len, heads, head_dim].
      key, value: [batch, kv_len, kv_heads, head_dim]; `heads` must be a multiple of `kv_heads`.
      key_mask: optional [batch, kv_len] bool, True for keys that may be attended to (padding False).
        A query row whose keys are all masked returns zeros instead of NaN.
      causal: query i attends to keys <= i (q_len == kv_len).
      sliding_window: with `causal`, query i also only sees keys > i - sliding_window.
      scale: logits multiplier; default 1/sqrt(head_dim).
      bias: optional additive logits bias broadcastable to [batch, heads, q_len, kv_len] (T5's
        relative position bias).
      implementation: one of IMPLEMENTATIONS.

    Returns:
      [batch, q_len, heads, head_dim] in query's dtype.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}; known: {IMPLEMENTATIONS}")
    batch, q_len, heads, head_dim = query.shape
    kv_len, kv_heads = key.shape[1], key.shape[2]
    if heads % kv_heads:
        raise ValueError(f"query heads {heads} not a multiple of key/value heads {kv_heads}")
    if scale is None:
        scale = head_dim**-0.5

    mask = None
    if key_mask is not None:
        mask = jnp.broadcast_to(key_mask[:, None, None, :], (batch, 1, q_len, kv_len))
    if sliding_window is not None:
        if not causal:
            raise ValueError("sliding_window needs causal=True")
        q_pos = jnp.arange(q_len)[:, None]
        k_pos = jnp.arange(kv_len)[None, :]
        window = (k_pos <= q_pos) & (k_pos > q_pos - sliding_window)
        mask = window[None, None] if mask is None else mask & window[None, None]
        causal = False  # The window already holds the causal constraint.

    out = jax.nn.dot_product_attention(
        query,
        key,
        value,
        bias=bias,
        mask=mask,
        is_causal=causal,
        scale=scale,
        implementation=implementation,
    )
    if key_mask is not None:
        # Rows with no visible key: XLA would average all values; make them exactly zero.
        any_visible = jnp.any(key_mask, axis=-1)[:, None, None, None]
        out = jnp.where(any_visible, out, jnp.zeros_like(out))
    return out
