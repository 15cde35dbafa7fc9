"""Context (sequence) parallelism: attention over a sequence sharded on the `context` mesh axis.

A 1024 px LI-DiT image is 4096 tokens; with `config.mesh.context = c` every token-wise layer
(projections, FFN, norms) holds 4096 / c tokens per chip (the rules table maps the logical
`length` axis to `context`), and only self-attention needs the whole sequence. Three ways to give
it that, chosen by `config.model.context_parallel`, all inside `jax.shard_map` over
(batch axes, `context`, head axes), so they compose with data, FSDP and tensor parallelism:

  all_gather  keep the queries in place, all-gather the keys and values (and key_mask) over
           `context` and run the configured kernel (splash on TPU, cuDNN on GPU) on the local
           [b, L/c] queries against all [b, L] keys. The backward is autodiff's: the kernel's
           own gradients, then a reduce-scatter of dK, dV. MaxText's default. No head
           constraint; costs the gathered K/V, 2 * L * kv_heads * head_dim per batch row per
           device (kept for the kernel's backward unless model.remat recomputes it), and the
           gather is not overlapped with the attention.
  ulysses  all-to-all q, k, v from [b, L/c, h, d] to [b, L, h/c, d] (sequence <-> heads), run
           the configured kernel on whole sequences of h/c heads, all-to-all back. Four
           all-to-alls of the activations per attention, 4 (c - 1) / c^2 of [L, h, d] sent per
           device (all_gather sends 2 (c - 1) / c of [L, kv_h, d]: the same at c = 2, ulysses
           less beyond); needs heads / tensor divisible by c.
  ring     keep the queries in place and pass the key/value chunks round the ring with
           `ppermute` (c - 1 hops), merging each chunk's partial result by its log-sum-exp
           (flash attention's online softmax, across chips). No head constraint; the chunk
           transfers overlap the chunk computations, and no device ever holds more than one
           [L/c] chunk of K/V. Each hop runs nn/attention.py's float32 XLA log-sum-exp
           attention (never splash or cuDNN: `model.attention` is ignored); a custom VJP keeps
           only q, k, v, the output and its float32 log-sum-exp per row ([b, L/c] rows) and
           runs the ring again for the gradients, recomputing each chunk's probabilities.

Which: all_gather while the gathered K/V fits (the DiT: 4096 tokens), since it runs the fused
kernel; ulysses for large c when the heads divide; ring only for sequences whose whole K/V does
not fit on one device. Causal attention: ulysses only (the DiT needs none).
"""
import functools

import jax
import jax.numpy as jnp

from lidit_jax.hardware import target_device
from lidit_jax.nn import attention as attention_lib
from lidit_jax.parallel import sharding

STRATEGIES = ("none", "all_gather", "ulysses", "ring")
AXIS = "context"


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
                "model.context_parallel=all_gather (or ring) or a smaller mesh.context")
        body = functools.partial(_ulysses, attend=functools.partial(local, causal=causal))
    elif causal:
        raise ValueError(f"model.context_parallel={strategy} has no causal mask (the DiT needs "
                         "none); use ulysses for causal attention")
    elif strategy == "all_gather":
        if implementation == "auto":
            # Choose for the whole sequence, as unsharded attention would: the local L/c
            # queries must not drop a long sequence under AUTO_MIN_SEQ_LEN onto XLA's logits.
            implementation = attention_lib.select_implementation(
                query.shape[1], key.shape[1], query.shape[-1], query.dtype,
                *target_device())
        attend = functools.partial(local, implementation=implementation)
        body = functools.partial(_all_gather, attend=attend)
    else:
        body = functools.partial(_ring_body, size=size, scale=scale)

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


def _all_gather(query, key, value, key_mask=None, *, attend):
    """Per shard: queries [b, L/c, h, d] stay; keys, values [b, L/c, kv_h, d] -> [b, L, kv_h, d]
    and key_mask [b, L/c] -> [b, L] by all-gather; the kernel attends the local queries to all."""
    gather = functools.partial(jax.lax.all_gather, axis_name=AXIS, axis=1, tiled=True)
    key, value = gather(key), gather(value)
    if key_mask is not None:
        key_mask = gather(key_mask)
    return attend(query, key, value, key_mask=key_mask)


def _ulysses(query, key, value, key_mask=None, *, attend):
    """Per shard: [b, L/c, h, d] -> all-to-all -> [b, L, h/c, d] -> attention -> back."""
    to_heads = functools.partial(jax.lax.all_to_all, axis_name=AXIS, split_axis=2,
                                 concat_axis=1, tiled=True)
    query, key, value = to_heads(query), to_heads(key), to_heads(value)
    if key_mask is not None:
        key_mask = jax.lax.all_gather(key_mask, AXIS, axis=1, tiled=True)
    out = attend(query, key, value, key_mask=key_mask)
    return jax.lax.all_to_all(out, AXIS, split_axis=1, concat_axis=2, tiled=True)


def _ring_body(query, key, value, key_mask=None, *, size, scale):
    return _ring(query, key, value, key_mask, size, scale)


def _shift(x, size):
    """Each shard's `x` to the next shard round the ring."""
    return jax.lax.ppermute(x, AXIS, perm=[(i, (i + 1) % size) for i in range(size)])


def _key_mask_4d(key_mask):
    return None if key_mask is None else key_mask[:, None, None, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _ring(query, key, value, key_mask, size, scale):
    """Per shard: local queries [b, L/c, h, d] against every key/value chunk
    [b, L/c, kv_h, d] as the chunks pass round the ring; key_mask [b, L/c] or None."""
    return _ring_forward(query, key, value, key_mask, size, scale)[0]


def _ring_forward(query, key, value, key_mask, size, scale):
    residuals = (query, key, value, key_mask)
    out, lse = None, None
    for hop in range(size):
        # Start the next chunk's transfer before this chunk's compute, so the two overlap.
        incoming = _shift((key, value, key_mask), size) if hop < size - 1 else None
        chunk_out, chunk_lse = attention_lib.attention_with_lse(
            query, key, value, _key_mask_4d(key_mask), scale)
        if out is None:
            out, lse = chunk_out, chunk_lse
        else:
            merged = jnp.logaddexp(lse, chunk_lse)
            out = out * _row_weight(lse, merged) + chunk_out * _row_weight(chunk_lse, merged)
            lse = merged
        if incoming is not None:
            key, value, key_mask = incoming
    out = out.astype(query.dtype)
    return out, (*residuals, out, lse)


def _row_weight(lse, merged):
    """exp(lse - merged) per query row, [b, kv_h, t, g, 1] -> [b, t, h, 1] (out's layout)."""
    b, k, t, g, _ = lse.shape
    return jnp.exp(lse - merged).transpose(0, 2, 1, 3, 4).reshape(b, t, k * g, 1)


def _ring_backward(size, scale, residuals, d_out):
    """The ring again: each chunk's share of the gradients from the rows' final out and lse;
    the key/value gradients travel with their chunk and arrive home after `size` shifts."""
    query, key, value, key_mask, out, lse = residuals
    d_query, d_kv = 0.0, None
    for hop in range(size):
        incoming = _shift((key, value, key_mask), size) if hop < size - 1 else None
        d_q, d_k, d_v = attention_lib.attention_gradients(
            query, key, value, _key_mask_4d(key_mask), out, lse, d_out, scale)
        d_query = d_query + d_q
        d_kv = _shift((d_k, d_v) if d_kv is None else (d_kv[0] + d_k, d_kv[1] + d_v), size)
        if incoming is not None:
            key, value, key_mask = incoming
    d_key, d_value = d_kv
    return (d_query.astype(query.dtype), d_key.astype(key.dtype), d_value.astype(value.dtype),
            None)


_ring.defvjp(_ring_forward, _ring_backward)
