"""The project's single attention entry point.

Every attention in lidit_jax (LLM encoders, refiners, DiT, VAE) calls `dot_product_attention`, so
the kernel choice is made in one place:

  xla     XLA ops that materialise [batch, heads, q_len, kv_len] logits; on TPU and GPU with a
          backward that recomputes the probabilities from a saved log-sum-exp
          (`_xla_attention`), on CPU head-major with autodiff's backward
          (`cpu_paths.head_major_attention`), with a `bias` (T5) jax.nn's. Right for short
          sequences (text, 256 px images) and on CPU.
  cudnn   cuDNN flash attention through jax.nn.dot_product_attention (NVIDIA GPUs only).
  splash  Pallas TPU splash attention (flash attention with block-sparse masks): never builds
          the logits; inside `shard_map` over the mesh's batch and head axes. Off TPU the same
          kernel runs in Pallas interpret mode (slow, for tests).
  auto    splash on TPU, cuDNN on NVIDIA GPUs (head_dim <= 128 and a 16-bit dtype), XLA
          elsewhere, and XLA for any sequence shorter than AUTO_MIN_SEQ_LEN.

splash and auto agree with xla to float32 rounding (tests/test_attention.py, forward and
gradients), including rows whose keys are all masked, which return zeros. The cudnn path has not
been run here (no GPU): its key compaction is checked through jax.nn's XLA path, and its lowering
for CUDA is checked to pass padding as key lengths, with no bias.
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from lidit_jax.hardware import target_device
from lidit_jax.nn.cpu_paths import head_major_attention
from lidit_jax.parallel import sharding

IMPLEMENTATIONS = ("xla", "cudnn", "splash", "auto")
# Below this many query or key tokens `auto` keeps XLA: the [q, kv] logits are small (256 x 256
# per head at 256 px) and a fused kernel's padding to 128-token tiles and launch cost more than
# they save. LI-DiT-1B at 256 px (256 image, 512 text tokens) stays on XLA; self-attention at
# 512 px (1024 tokens) and 1024 px (4096 tokens) switches; cross-attention to <= 512 text
# tokens stays on XLA at every size (its logits grow only linearly with the image).
AUTO_MIN_SEQ_LEN = 1024
# Default splash tiles (tokens); config.model.splash_block_q/kv override them for the DiT.
DEFAULT_BLOCK_SIZES = (512, 512)
# TPU tiles are 128 lanes wide: sequences are padded to a multiple of this (and of the block).
_LANE = 128


def select_implementation(q_len, kv_len, head_dim, dtype, platform, device_kind=""):
    """What `implementation="auto"` runs for these shapes on `platform` ('tpu', 'gpu', 'cpu')."""
    if min(q_len, kv_len) < AUTO_MIN_SEQ_LEN:
        return "xla"
    if platform == "tpu":
        return "splash"
    # cuDNN's fused attention: NVIDIA only (not ROCm), head_dim <= 128, fp16 / bf16 inputs.
    nvidia = platform in ("gpu", "cuda") and "nvidia" in device_kind.lower()
    if nvidia and head_dim <= 128 and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "xla"


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
    block_sizes=None,
):
    """Multi-head (or grouped-query) scaled dot-product attention.

    Args:
      query: [batch, q_len, heads, head_dim] (logical "batch", "length", "heads", "head_dim").
      key, value: [batch, kv_len, kv_heads, head_dim]; `heads` must be a multiple of `kv_heads`.
      key_mask: optional [batch, kv_len] bool, True for keys that may be attended to (padding False).
        A query row whose keys are all masked returns zeros instead of NaN.
      causal: query i attends to keys <= i (q_len == kv_len).
      sliding_window: with `causal`, query i also only sees keys > i - sliding_window (an int,
        or a traced int inside a scan over layers: splash then runs XLA, see below).
      scale: logits multiplier; default 1/sqrt(head_dim).
      bias: optional additive logits bias broadcastable to [batch, heads, q_len, kv_len] (T5's
        relative position bias); splash has none, so a biased call runs XLA.
      implementation: one of IMPLEMENTATIONS.
      block_sizes: splash only, (block_q, block_kv) tokens; default DEFAULT_BLOCK_SIZES.

    Returns:
      [batch, q_len, heads, head_dim] in query's dtype.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}; known: {IMPLEMENTATIONS}")
    batch, q_len, heads, head_dim = query.shape
    kv_len, kv_heads = key.shape[1], key.shape[2]
    if heads % kv_heads:
        raise ValueError(f"query heads {heads} not a multiple of key/value heads {kv_heads}")
    if sliding_window is not None and not causal:
        raise ValueError("sliding_window needs causal=True")
    if causal and q_len != kv_len:
        raise ValueError(f"causal attention needs q_len == kv_len, got {q_len} and {kv_len}")
    if scale is None:
        scale = head_dim**-0.5
    if implementation == "auto":
        implementation = select_implementation(q_len, kv_len, head_dim, query.dtype,
                                               *target_device())

    if implementation == "splash" and bias is not None:
        implementation = "xla"
    if implementation == "splash" and not isinstance(sliding_window, (int, type(None))):
        # Splash plans its block-sparse mask at trace time; a traced window (the LLMs' scan
        # over layers, global layers given a huge window) cannot be planned, so XLA runs it.
        implementation = "xla"
    if implementation == "splash":
        out = _splash_sharded(query, key, value, key_mask, causal, sliding_window, scale,
                              block_sizes or DEFAULT_BLOCK_SIZES)
    else:
        out = _materialized_attention(query, key, value, key_mask, causal, sliding_window,
                                      scale, bias, implementation)
    if key_mask is not None:
        # Rows with no visible key: kernels average all values (or give NaN); make them zero.
        any_visible = jnp.any(key_mask, axis=-1)[:, None, None, None]
        out = jnp.where(any_visible, out, jnp.zeros_like(out))
    return out


def _materialized_attention(query, key, value, key_mask, causal, sliding_window, scale, bias,
                            implementation):
    """The xla and cudnn implementations, masks built from `key_mask`, `causal` and the window:
    cuDNN through jax.nn.dot_product_attention; XLA through `_xla_attention` when compiling for
    TPU or GPU, `cpu_paths.head_major_attention` for CPU, and jax.nn's XLA path with a bias.

    cuDNN takes padding as key lengths (`_key_length_attention`) wherever the keys' order does
    not matter (no causal mask, no bias): a boolean mask would reach it as a dense
    [batch, 1, q_len, kv_len] bias whose gradient it computes too. Causal calls with padding (the
    frozen LLMs, forward only) keep the mask. A static sliding window is cuDNN's
    `local_window_size`; a traced one (the LLMs' scan over layers) becomes part of the mask.
    """
    batch, q_len = query.shape[:2]
    kv_len = key.shape[1]
    if implementation == "cudnn" and key_mask is not None and not causal and bias is None:
        return _key_length_attention(query, key, value, key_mask, scale, implementation)
    mask = None if key_mask is None else jnp.broadcast_to(
        key_mask[:, None, None, :], (batch, 1, q_len, kv_len))
    local_window = None
    if sliding_window is not None:
        if isinstance(sliding_window, int) and implementation == "cudnn":
            local_window = (sliding_window - 1, 0)
        else:
            q_pos = jnp.arange(q_len)[:, None]
            k_pos = jnp.arange(kv_len)[None, :]
            window = (k_pos <= q_pos) & (k_pos > q_pos - sliding_window)
            mask = window[None, None] if mask is None else mask & window[None, None]
    if implementation == "xla" and bias is None:
        if causal:
            causal_mask = jnp.tril(jnp.ones((q_len, kv_len), bool))[None, None]
            mask = causal_mask if mask is None else mask & causal_mask
        if target_device()[0] == "cpu":
            return head_major_attention(query, key, value, mask, scale)
        return _xla_attention(query, key, value, mask, scale)
    return jax.nn.dot_product_attention(
        query, key, value, bias=bias, mask=mask, is_causal=causal, scale=scale,
        local_window_size=local_window, implementation=implementation)


def _compact_keys(key, value, key_mask):
    """Visible keys moved to the front of each example, in their order: (key, value, lengths).

    key, value [batch, kv_len, kv_heads, head_dim], key_mask [batch, kv_len] bool; lengths
    [batch] int32, at least 1. The DiT's text context is several right-padded branches
    concatenated, so its padding sits in the middle too and no length describes it in place;
    without a causal mask attention does not depend on the keys' order. A row with no visible
    key keeps one (padding) key, so no kernel normalises over nothing; dot_product_attention
    zeroes that row.
    """
    order = jnp.argsort(~key_mask, axis=1, stable=True)[:, :, None, None]
    key, value = (jnp.take_along_axis(x, order, axis=1) for x in (key, value))
    lengths = jnp.maximum(jnp.sum(key_mask, axis=1, dtype=jnp.int32), 1)
    return key, value, lengths


def _key_length_attention(query, key, value, key_mask, scale, implementation):
    """Non-causal attention with padding as `key_value_seq_lengths` after `_compact_keys`: no
    bias and no bias gradient in cuDNN. `implementation` is jax.nn's ('cudnn'; 'xla' in tests,
    which checks the compaction against the masked reference without a GPU)."""
    key, value, lengths = _compact_keys(key, value, key_mask)
    return jax.nn.dot_product_attention(query, key, value, key_value_seq_lengths=lengths,
                                        scale=scale, implementation=implementation)


# ---- xla ---------------------------------------------------------------------------------------
# XLA materialises the [batch, heads, q_len, kv_len] logits either way; what it keeps for the
# backward is the choice. Autodiff of jax.nn.dot_product_attention keeps the float32 softmax
# output and the 16-bit probabilities (6 bytes per logit, written forward and read backward);
# here the backward recomputes the probabilities from q, k and the float32 log-sum-exp per query
# row, as flash attention does, so nothing of [q_len, kv_len] size outlives the forward. For
# LI-DiT-1B on TPU v5p (256 image and 512 text tokens, head_dim 72) the cost model's step is
# faster and needs less HBM per chip (benchmarks/tpu_estimates.md, LI-DiT-1B on v5p:4x4x4, the
# "log-sum-exp" row against the one before). On CPU, where the
# step is bound by compute rather than memory traffic, the recomputation made the PixArt-shape
# train step 4.5 % slower than jax.nn's path (3.5 % slower than `cpu_paths.head_major_attention`).


def _grouped(query, kv_heads):
    """[b, t, heads, d] -> [b, t, kv_heads, group, d] (GQA: each key head serves a group)."""
    b, t, heads, d = query.shape
    return query.reshape(b, t, kv_heads, heads // kv_heads, d)


def _masked_logits(query, key, mask, scale):
    """float32 logits [b, kv_heads, t, group, s] (the order dot_general emits, so no transposed
    copy), masked entries at float32's minimum."""
    logits = jnp.einsum("btkgd,bskd->bktgs", _grouped(query, key.shape[2]), key,
                        preferred_element_type=jnp.float32) * scale
    if mask is not None:  # [b | 1, 1, t, s] -> [b | 1, 1, t, 1, s]
        logits = jnp.where(mask[:, :, :, None], logits, jnp.finfo(jnp.float32).min)
    return logits


def attention_with_lse(query, key, value, mask, scale):
    """Softmax attention and its float32 log-sum-exp per query row: (out [b, t, heads, d]
    float32, lse [b, kv_heads, t, group, 1]). query [b, t, heads, d], key/value
    [b, s, kv_heads, d], mask None or bool [b | 1, 1, t, s]; masked logits are float32's
    minimum, so a row with every key masked averages all values and its lse is that minimum:
    finite, and weighted exp(lse - lse_other) = 0 when merged with the same row over other
    keys of which one is visible (`lidit_jax.nn.context_parallel`'s ring)."""
    logits = _masked_logits(query, key, mask, scale)
    peak = jnp.max(logits, axis=-1, keepdims=True)
    unnormalized = jnp.exp(logits - peak)  # One exp per logit, as a softmax.
    total = jnp.sum(unnormalized, axis=-1, keepdims=True)
    probs = (unnormalized / total).astype(value.dtype)
    out = jnp.einsum("bktgs,bskd->btkgd", probs, value, preferred_element_type=jnp.float32)
    return out.reshape(query.shape), peak + jnp.log(total)


def attention_gradients(query, key, value, mask, out, lse, d_out, scale):
    """float32 (d_query, d_key, d_value) of `attention_with_lse`'s output, from the saved `out`
    and `lse` of the rows: the probabilities are recomputed, as flash attention does. Given the
    output and lse of attention over more keys than `key` (the ring's other chunks), the
    result is this chunk's share of the gradients, which sum over chunks."""
    kv_heads = key.shape[2]
    probs = jnp.exp(_masked_logits(query, key, mask, scale) - lse)  # float32, recomputed
    d_out_grouped = _grouped(d_out, kv_heads)
    d_value = jnp.einsum("bktgs,btkgd->bskd", probs.astype(value.dtype), d_out_grouped,
                         preferred_element_type=jnp.float32)
    d_probs = jnp.einsum("btkgd,bskd->bktgs", d_out_grouped, value,
                         preferred_element_type=jnp.float32)
    # softmax backward: dS = P * (dP - sum_s P dP), and sum_s P dP = sum_d out * d_out.
    row = jnp.einsum("btkgd,btkgd->bktg", _grouped(out, kv_heads).astype(jnp.float32),
                     d_out_grouped.astype(jnp.float32))
    d_logits = (probs * (d_probs - row[..., None]) * scale).astype(query.dtype)
    d_query = jnp.einsum("bktgs,bskd->btkgd", d_logits, key, preferred_element_type=jnp.float32)
    d_key = jnp.einsum("bktgs,btkgd->bskd", d_logits, _grouped(query, kv_heads),
                       preferred_element_type=jnp.float32)
    return d_query.reshape(query.shape), d_key, d_value


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _xla_attention(query, key, value, mask, scale):
    """softmax(q k^T * scale, masked) v: query [b, t, heads, d], key/value [b, s, kv_heads, d],
    mask None or bool [b | 1, 1, t, s]. A row with every key masked averages all values, as
    jax.nn.dot_product_attention does (dot_product_attention then zeroes it)."""
    return attention_with_lse(query, key, value, mask, scale)[0].astype(query.dtype)


def _xla_attention_forward(query, key, value, mask, scale):
    out, lse = attention_with_lse(query, key, value, mask, scale)
    out = out.astype(query.dtype)
    return out, (query, key, value, mask, out, lse)


def _xla_attention_backward(scale, residuals, d_out):
    query, key, value, mask, out, lse = residuals
    grads = attention_gradients(query, key, value, mask, out, lse, d_out, scale)
    return (*(g.astype(x.dtype) for g, x in zip(grads, (query, key, value))), None)


_xla_attention.defvjp(_xla_attention_forward, _xla_attention_backward)


# ---- splash ------------------------------------------------------------------------------------


def _round_up(n, multiple):
    return -(-n // multiple) * multiple


def splash_tiles(q_len, kv_len, block_sizes):
    """((block_q, block_kv), (q_pad, kv_pad)): the tiles splash runs (no larger than the
    lane-rounded sequence) and the sequence lengths padded to whole tiles."""
    block_q = min(block_sizes[0], _round_up(q_len, _LANE))
    block_kv = min(block_sizes[1], _round_up(kv_len, _LANE))
    return (block_q, block_kv), (_round_up(q_len, block_q), _round_up(kv_len, block_kv))


def _splash_sharded(query, key, value, key_mask, causal, sliding_window, scale, block_sizes):
    """Splash attention inside shard_map over the mesh's batch and head axes (from the rules).

    The sequence axes are gathered: each device holds whole sequences of its batch rows and
    heads, as the kernel needs (sequence sharding is `lidit_jax.nn.context_parallel`'s job).
    """
    attend = functools.partial(_splash_local, causal=causal, scale=scale,
                               block_sizes=block_sizes)
    mesh = jax.sharding.get_abstract_mesh()
    rules = sharding._current_rules()
    manual = not mesh.empty and any(
        t == jax.sharding.AxisType.Manual for t in mesh.axis_types)
    if mesh.empty or not rules or manual or mesh.size == 1:
        return attend(query, key, value, key_mask, sliding_window)
    P = jax.sharding.PartitionSpec
    spec = lambda x, axes: sharding.logical_to_mesh_spec(axes, rules, mesh, x.shape)  # noqa: E731
    q_spec = spec(query, ("batch", None, "heads", None))
    kv_spec = spec(key, ("batch", None, "kv_heads", None))
    if q_spec[2] != kv_spec[2]:
        # Query and key heads must split alike for each shard to keep whole GQA groups.
        q_spec, kv_spec = P(q_spec[0], None, None, None), P(kv_spec[0], None, None, None)
    args, in_specs = [query, key, value], [q_spec, kv_spec, kv_spec]
    if key_mask is not None:
        args.append(key_mask)
        in_specs.append(P(q_spec[0], None))

    def body(q, k, v, mask=None):
        return attend(q, k, v, mask, sliding_window)

    return jax.shard_map(body, mesh=mesh, in_specs=tuple(in_specs), out_specs=q_spec,
                         check_vma=False)(*args)


def _splash_mask(q_len, kv_len, heads, causal, sliding_window):
    """Splash's static mask for [heads, q_len, kv_len] (padded lengths): the kernel skips the
    blocks it rules out (causal: half the work; a window: all but a band)."""
    shape = (q_len, kv_len)
    if sliding_window is not None:
        one = splash_mask.LocalMask(shape, window_size=(sliding_window - 1, 0), offset=0)
    else:
        one = splash_mask.CausalMask(shape) if causal else splash_mask.FullMask(shape)
    return splash_mask.MultiHeadMask([one] * heads)


def _splash_local(query, key, value, key_mask, sliding_window, *, causal, scale, block_sizes):
    """Splash attention on arrays local to one device: [b, q, h, d], [b, kv, kv_h, d].

    Sequences are padded to whole tiles; padded keys are masked through segment ids (query id 1,
    key id 1 where visible, 0 for padding and masked keys), so they also carry `key_mask`.
    """
    batch, q_len, heads, head_dim = query.shape
    kv_len, kv_heads = key.shape[1], key.shape[2]
    (block_q, block_kv), (q_pad, kv_pad) = splash_tiles(q_len, kv_len, block_sizes)
    blocks = splash.BlockSizes(
        block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
        block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
        block_q_dq=block_q, block_kv_dq=block_kv)
    group = heads // kv_heads
    mask = _splash_mask(q_pad, kv_pad, group if kv_heads != heads else heads, causal,
                        sliding_window)
    make = splash.make_splash_mqa if kv_heads != heads else splash.make_splash_mha
    kernel = make(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1,
                  interpret=target_device()[0] != "tpu")

    # [b, len, h, d] -> [b, h, len_padded, d]; the scale folded into q (splash has none).
    q = jnp.pad((query * jnp.asarray(scale, query.dtype)).transpose(0, 2, 1, 3),
                ((0, 0), (0, 0), (0, q_pad - q_len), (0, 0)))
    k = jnp.pad(key.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, kv_pad - kv_len), (0, 0)))
    v = jnp.pad(value.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, kv_pad - kv_len), (0, 0)))
    segments = None
    if key_mask is not None or kv_pad != kv_len:
        visible = jnp.ones((batch, kv_len), bool) if key_mask is None else key_mask
        kv_ids = jnp.pad(visible.astype(jnp.int32), ((0, 0), (0, kv_pad - kv_len)))
        segments = splash.SegmentIds(q=jnp.ones((batch, q_pad), jnp.int32), kv=kv_ids)

    if kv_heads != heads:
        q = q.reshape(batch, kv_heads, group, q_pad, head_dim)

    def one_example(q, k, v, segment_ids):
        if kv_heads != heads:  # GQA: one MQA kernel call per key head and its query group.
            return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=segment_ids))(q, k, v)
        return kernel(q, k, v, segment_ids=segment_ids)

    out = jax.vmap(one_example)(q, k, v, segments)
    out = out.reshape(batch, heads, q_pad, head_dim)[:, :, :q_len]
    return out.transpose(0, 2, 1, 3).astype(query.dtype)

