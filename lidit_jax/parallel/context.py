"""Context (sequence) parallelism: attention over a sequence sharded on the `context` mesh axis.

A 1024 px LI-DiT image is 4096 tokens; with `config.mesh.context = c` every token-wise layer
(projections, FFN, norms) holds 4096 / c tokens per chip (the rules table maps the logical
`length` axis to `context`), and only self-attention needs the whole sequence. Two ways to give
it that, chosen by `config.model.context_parallel`, both inside `jax.shard_map` over
(batch axes, `context`, head axes), so they compose with data, FSDP and tensor parallelism:

  ulysses  all-to-all q, k, v from [b, L/c, h, d] to [b, L, h/c, d] (sequence <-> heads), run
           the configured kernel on whole sequences of h/c heads, all-to-all back. Four
           all-to-alls of the activations per attention; needs heads / tensor divisible by c.
  ring     keep the queries in place and pass the key/value chunks round the ring with
           `ppermute` (c - 1 hops), merging each chunk's partial result by its log-sum-exp
           (flash attention's online softmax, across chips). No head constraint; the chunk
           transfers overlap the chunk computations; XLA attention per chunk, float32.
"""
import functools

import jax
import jax.numpy as jnp

from lidit_jax.nn import attention as attention_lib
from lidit_jax.parallel import sharding

STRATEGIES = ("none", "ulysses", "ring")
AXIS = "context"
# Logit of a masked key: finite (unlike -inf) so that a chunk whose keys are all masked merges
# with weight exp(-1e30 - lse) = 0 and no inf - inf ever reaches the gradients.
_MASKED_LOGIT = -1e30


def context_size():
    """Size of the `context` axis of the mesh in context (1 outside a mesh or without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or AXIS not in mesh.axis_names:
        return 1
    return mesh.shape[AXIS]


def context_parallel_attention(query, key, value, *, strategy, key_mask=None, causal=False,
                               scale=None, implementation="xla", block_sizes=None):
    """Self-attention whose sequence axis is sharded over the mesh's `context` axis.

    Same arguments and result as `nn.attention.dot_product_attention` (query, key, value
    [batch, len, heads, head_dim], key_mask [batch, len]); falls back to it when the mesh has no
    `context` axis larger than 1 or `strategy` is 'none'.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"model.context_parallel={strategy!r}; known: {STRATEGIES}")
    local = functools.partial(attention_lib.dot_product_attention, scale=scale,
                              implementation=implementation, block_sizes=block_sizes)
    size = context_size()
    if strategy == "none" or size == 1:
        return local(query, key, value, key_mask=key_mask, causal=causal)
    if scale is None:
        scale = query.shape[-1]**-0.5
    if query.shape[1] != key.shape[1]:
        raise ValueError(f"context parallelism is for self-attention; got {query.shape[1]} "
                         f"queries and {key.shape[1]} keys")
    if query.shape[1] % size:
        raise ValueError(f"sequence length {query.shape[1]} is not divisible by mesh.context="
                         f"{size}; pick image sizes whose token count it divides")

    mesh = jax.sharding.get_abstract_mesh()
    rules = sharding._current_rules() or ()
    P = jax.sharding.PartitionSpec
    batch_axes = sharding.logical_to_mesh_spec(("batch",), rules, mesh, query.shape[:1])[0]
    heads_axes = sharding.logical_to_mesh_spec(("heads",), rules, mesh, query.shape[2:3])[0]
    kv_heads_axes = sharding.logical_to_mesh_spec(("kv_heads",), rules, mesh, key.shape[2:3])[0]
    if heads_axes != kv_heads_axes:
        heads_axes = kv_heads_axes = None  # Shards must keep whole GQA groups.
    q_spec = P(batch_axes, AXIS, heads_axes, None)
    kv_spec = P(batch_axes, AXIS, kv_heads_axes, None)

    if strategy == "ulysses":
        local_heads = query.shape[2] // _axes_size(mesh, heads_axes)
        local_kv_heads = key.shape[2] // _axes_size(mesh, kv_heads_axes)
        if local_heads % size or local_kv_heads % size:
            raise ValueError(
                f"model.context_parallel=ulysses: {local_heads} query / {local_kv_heads} key "
                f"heads per tensor shard are not divisible by mesh.context={size}; use "
                "model.context_parallel=ring or a smaller mesh.context")
        body = functools.partial(_ulysses, attend=functools.partial(local, causal=causal))
    else:
        if causal:
            raise ValueError("model.context_parallel=ring has no causal mask (the DiT needs "
                             "none); use ulysses for causal attention")
        body = functools.partial(_ring, size=size, scale=scale)

    args, in_specs = [query, key, value], [q_spec, kv_spec, kv_spec]
    if key_mask is not None:
        args.append(key_mask)
        in_specs.append(P(batch_axes, AXIS))
    out = jax.shard_map(body, mesh=mesh, in_specs=tuple(in_specs), out_specs=q_spec,
                        check_vma=False)(*args)
    if key_mask is not None:
        any_visible = jnp.any(key_mask, axis=-1)[:, None, None, None]
        out = jnp.where(any_visible, out, jnp.zeros_like(out))
    return out


def _axes_size(mesh, axes):
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    size = 1
    for axis in axes:
        size *= mesh.shape[axis]
    return size


def _ulysses(query, key, value, key_mask=None, *, attend):
    """Per shard: [b, L/c, h, d] -> all-to-all -> [b, L, h/c, d] -> attention -> back."""
    to_heads = functools.partial(jax.lax.all_to_all, axis_name=AXIS, split_axis=2,
                                 concat_axis=1, tiled=True)
    query, key, value = to_heads(query), to_heads(key), to_heads(value)
    if key_mask is not None:
        key_mask = jax.lax.all_gather(key_mask, AXIS, axis=1, tiled=True)
    out = attend(query, key, value, key_mask=key_mask)
    return jax.lax.all_to_all(out, AXIS, split_axis=1, concat_axis=2, tiled=True)


def _chunk_attention(query, key, value, key_mask):
    """Softmax attention of local queries over one key chunk, float32: (out, log-sum-exp).

    query [b, q, h, d] (already scaled), key/value [b, k, h, d], key_mask [b, k] or None.
    Returns out [b, q, h, d] (normalised within the chunk) and lse [b, h, q].
    """
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key.astype(jnp.float32))
    if key_mask is not None:
        logits = jnp.where(key_mask[:, None, None, :], logits, _MASKED_LOGIT)
    peak = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    weights = jnp.exp(logits - peak)
    total = jnp.sum(weights, axis=-1)  # >= 1: the peak contributes exp(0).
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, value.astype(jnp.float32))
    out = out / total.transpose(0, 2, 1)[..., None]
    return out, peak[..., 0] + jnp.log(total)


def _ring(query, key, value, key_mask=None, *, size, scale):
    """Per shard: local queries against every key/value chunk as they pass round the ring."""
    group = query.shape[2] // key.shape[2]
    if group > 1:
        key, value = jnp.repeat(key, group, axis=2), jnp.repeat(value, group, axis=2)
    q = query.astype(jnp.float32) * scale
    shift = functools.partial(jax.lax.ppermute, axis_name=AXIS,
                              perm=[(i, (i + 1) % size) for i in range(size)])
    out, lse = None, None
    for hop in range(size):
        # Start the next chunk's transfer before this chunk's compute, so the two overlap.
        incoming = shift((key, value, key_mask)) if hop < size - 1 else None
        chunk_out, chunk_lse = _chunk_attention(q, key, value, key_mask)
        if out is None:
            out, lse = chunk_out, chunk_lse
        else:
            merged = jnp.logaddexp(lse, chunk_lse)
            weight = lambda x: jnp.exp(x - merged).transpose(0, 2, 1)[..., None]  # noqa: E731
            out = out * weight(lse) + chunk_out * weight(chunk_lse)
            lse = merged
        if incoming is not None:
            key, value, key_mask = incoming
    return out.astype(query.dtype)
