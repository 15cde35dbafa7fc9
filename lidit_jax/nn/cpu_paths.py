"""XLA:CPU fast paths, all in one place, and why they exist.

The CPU demo, the tests and the toy ablations train on a few CPU cores, where XLA:CPU's code for
some ops is several times slower than a matmul of the same work. Each path below is chosen by
the compile target (`hardware.target_device`, so a `--mode=compile` for a TPU topology on a CPU
host takes the TPU's path) and computes the same values; TPU and GPU programs are unchanged.

  dense_dot_general      nnx.Linear's contraction; its backward keeps XLA:CPU's transposes out
                         of the fusions that produce them (1.10x on the PixArt-shape step)
  conv_general_dilated   nnx.Conv's stride-1 'SAME' odd-window convolution (the position
                         ResBlock); its kernel gradient is one matmul over patches (1.2x)
  head_major_attention   XLA attention with heads before tokens, every matmul a plain batched
                         one (125 -> 99 ms for self-attention at the PixArt shape)
  scan_unroll            the DiT's scan over blocks, unrolled on CPU (16 % at the PixArt shape)

Two more live where they must: `lidit_jax/host_allocator.py` re-executes a CPU training process
with tcmalloc settings before JAX starts, and `train/step.py` runs no length-1 scan over
micro-batches (XLA:CPU runs loop bodies unthreaded; on TPU and GPU both compile the same).
Measurements: docs/performance.md.
"""
import jax
import jax.numpy as jnp

from lidit_jax.hardware import target_device


def compiling_for_cpu():
    """Whether the computation being traced is compiled for CPU devices."""
    return target_device()[0] == "cpu"


def scan_unroll(depth):
    """`unroll` for a scan over `depth` layers: all of them on CPU (XLA:CPU runs a loop body's
    ops one after another and copies every layer's residuals into stacked buffers), 1 elsewhere
    (a loop compiles faster and holds less memory)."""
    return depth if compiling_for_cpu() else 1


@jax.custom_vjp
def _dense_with_separate_transposes(x, kernel):
    """x [..., in] @ kernel [in, out], whose backward keeps XLA:CPU's transposes apart."""
    return jnp.einsum("...i,io->...o", x, kernel)


def _dense_forward(x, kernel):
    return _dense_with_separate_transposes(x, kernel), (x, kernel)


def _dense_backward(residuals, grad):
    x, kernel = residuals
    # The weight gradient x^T grad needs one operand transposed. XLA:CPU fuses that transposed
    # copy into the fusion producing it (a layer-norm/adaLN backward with ~20 operands) and
    # emits the fusion in the transposed order, reading every operand with a stride of the
    # width; behind the barrier the transpose is a copy of its own (tiled). 1.10x on the
    # PixArt-shape train step, 1.11x on the demo's (docs/performance.md).
    rows, grad_rows = jax.lax.optimization_barrier(
        (x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])))
    return (jnp.einsum("...o,io->...i", grad, kernel),
            jnp.einsum("ti,to->io", rows, grad_rows))


_dense_with_separate_transposes.defvjp(_dense_forward, _dense_backward)


def dense_dot_general(inputs, kernel, dimension_numbers, precision=None,
                      preferred_element_type=None, out_sharding=None):
    """nnx.Linear's contraction ([..., in] x [in, out]): `lax.dot_general`, except when compiling
    for CPU, where `_dense_backward` spares XLA:CPU its strided transposing fusions. The choice
    follows the compile target (`hardware.target_device`), so TPU and GPU programs are unchanged."""
    plain = (dimension_numbers == (((inputs.ndim - 1,), (0,)), ((), ()))
             and precision is None and preferred_element_type is None and out_sharding is None)
    if plain and compiling_for_cpu():
        return _dense_with_separate_transposes(inputs, kernel)
    return jax.lax.dot_general(inputs, kernel, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type,
                               out_sharding=out_sharding)


_NHWC_HWIO = jax.lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1),
                                          out_spec=(0, 3, 1, 2))


def _same_conv(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=_NHWC_HWIO)


@jax.custom_vjp
def _same_conv_with_patch_matmul(x, kernel):
    """Stride-1 'SAME' convolution, x [b, h, w, in] with kernel [kh, kw, in, out] (odd kh, kw),
    whose kernel gradient is one matmul over im2col patches."""
    return _same_conv(x, kernel)


def _same_conv_forward(x, kernel):
    return _same_conv(x, kernel), (x, kernel)


def _same_conv_backward(residuals, grad):
    x, kernel = residuals
    kh, kw, _, _ = kernel.shape
    b, h, w, _ = x.shape
    # XLA:CPU's kernel-gradient convolution ran at ~90 GFLOP/s where a matmul runs at ~290: the
    # 3x3 patches [b, h, w, kh*kw*in] (9x the input) times grad [b, h, w, out] is that matmul.
    # The input gradient is the forward convolution of grad with the kernel flipped in space,
    # in and out swapped. A 384-wide 3x3 convolution's backward: 1.2x faster (docs/performance.md).
    padded = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))  # 'SAME'
    patches = jnp.concatenate([padded[:, i:i + h, j:j + w] for i in range(kh) for j in range(kw)],
                              axis=-1)
    d_kernel = jnp.einsum("bhwk,bhwo->ko", patches, grad).reshape(kernel.shape)
    d_x = _same_conv(grad, jnp.flip(kernel, (0, 1)).swapaxes(2, 3))
    return d_x.astype(x.dtype), d_kernel.astype(kernel.dtype)


_same_conv_with_patch_matmul.defvjp(_same_conv_forward, _same_conv_backward)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None,
                         **kwargs):
    """nnx.Conv's convolution: `lax.conv_general_dilated`, except when compiling for CPU a
    stride-1 'SAME' NHWC convolution with an odd window (the position ResBlock's 3x3), whose
    backward `_same_conv_backward` computes with a matmul. TPU and GPU programs are unchanged."""
    plain = (tuple(window_strides) == (1, 1) and padding == "SAME"
             and tuple(lhs_dilation or (1, 1)) == (1, 1)
             and tuple(rhs_dilation or (1, 1)) == (1, 1)
             and dimension_numbers == _NHWC_HWIO and feature_group_count == 1
             and precision is None and kwargs.get("out_sharding") is None
             and kwargs.get("preferred_element_type") is None
             and all(k % 2 for k in rhs.shape[:2]))
    if plain and compiling_for_cpu():
        return _same_conv_with_patch_matmul(lhs, rhs)
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        precision=precision, **kwargs)


def head_major_attention(query, key, value, mask, scale):
    """XLA attention for CPU, shapes as `attention._xla_attention`'s: heads moved before the tokens
    ([b, kv_heads, group, t, d]) so every matmul is a plain batched one, then back.

    XLA:CPU runs jax.nn's token-major einsums as matmuls with a transposed operand or output
    (its P v emitted [b, heads, d, t] ran at 18 GFLOP/s in the train step); this order costs
    three small copies of q, k, v and one of the output. Self-attention at the PixArt shape
    ([32, 256, 6, 64]) forward and backward: 125 ms for jax.nn's, 99 here, 72 in PyTorch's
    fused CPU kernel (docs/performance.md). Autodiff's backward keeps the probabilities: a
    recomputing one (`_xla_attention`) is slower on CPU, which is bound by compute.
    """
    b, t, heads, d = query.shape
    kv_heads = key.shape[2]
    q = query.reshape(b, t, kv_heads, heads // kv_heads, d).transpose(0, 2, 3, 1, 4)
    k, v = (x.transpose(0, 2, 1, 3) for x in (key, value))  # [b, kv_heads, s, d]
    logits = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:  # [b | 1, 1, t, s] -> [b | 1, 1, 1, t, s]
        logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
    out = jnp.einsum("bkgts,bksd->bkgtd", probs, v, preferred_element_type=jnp.float32)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, heads, d).astype(query.dtype)
