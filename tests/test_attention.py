"""The one attention entry point: splash (Pallas interpret mode on CPU) and auto against XLA.

Shapes stay tiny: interpret mode runs the TPU kernel's grid step by step in Python-level XLA
ops (~10 s per case with gradients on 2 shared cores).
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from lidit_jax.nn import attention
from lidit_jax.nn.layers import Attention
from lidit_jax.parallel import sharding
from train_helpers import make_mesh

RTOL = 2e-3  # The Contract: every implementation agrees with "xla" to 2e-3 relative (float32).


def _inputs(batch, q_len, kv_len, heads, kv_heads, head_dim=32, seed=0):
    rng = np.random.default_rng(seed)
    arr = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    return (arr(batch, q_len, heads, head_dim), arr(batch, kv_len, kv_heads, head_dim),
            arr(batch, kv_len, kv_heads, head_dim), arr(batch, q_len, heads, head_dim))


def _relative_error(expected, actual):
    return float(jnp.max(jnp.abs(expected - actual)) / jnp.max(jnp.abs(expected)))


def _forward_and_grads(implementation, q, k, v, cotangent, **kwargs):
    def loss(q, k, v):
        out = attention.dot_product_attention(q, k, v, implementation=implementation, **kwargs)
        return jnp.sum(out * cotangent), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def _assert_matches_xla(implementation, q, k, v, cotangent, **kwargs):
    expected, expected_grads = _forward_and_grads("xla", q, k, v, cotangent, **kwargs)
    out, grads = _forward_and_grads(implementation, q, k, v, cotangent, **kwargs)
    assert _relative_error(expected, out) < RTOL
    for name, g_xla, g in zip("qkv", expected_grads, grads):
        assert _relative_error(g_xla, g) < RTOL, name
    return out


def _jax_nn_reference(q, k, v, key_mask=None, causal=False, sliding_window=None):
    """jax.nn.dot_product_attention (autodiff through its softmax) with our masks' meaning."""
    t, s = q.shape[1], k.shape[1]
    mask = jnp.ones((1, 1, t, s), bool)
    if key_mask is not None:
        mask = mask & key_mask[:, None, None, :]
    positions_q, positions_k = jnp.arange(t)[:, None], jnp.arange(s)[None]
    if causal:
        mask = mask & (positions_k <= positions_q)
    if sliding_window is not None:
        mask = mask & (positions_k > positions_q - sliding_window)
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    if key_mask is not None:
        out = jnp.where(jnp.any(key_mask, -1)[:, None, None, None], out, 0)
    return out


# (q_len, kv_len, heads, kv_heads, kwargs)
XLA_CASES = {
    "cross_attention_with_an_all_masked_row": (12, 40, 2, 2, "key_mask"),
    "causal_gqa": (24, 24, 4, 2, {"causal": True}),
    "sliding_window_mqa": (24, 24, 4, 1, {"causal": True, "sliding_window": 5}),
}


@pytest.mark.parametrize("platform", ["tpu", "cpu"])
@pytest.mark.parametrize("case", sorted(XLA_CASES))
def test_xla_attention_matches_jax_nn(case, platform, monkeypatch):
    # Compiled for TPU/GPU, "xla" keeps only the log-sum-exp for its backward and recomputes the
    # probabilities (a custom_vjp); for CPU it runs head-major under autodiff. Both the same
    # function as jax.nn's: forward and gradients to float32 rounding.
    monkeypatch.setattr(attention, "target_device", lambda: (platform, ""))
    q_len, kv_len, heads, kv_heads, kwargs = XLA_CASES[case]
    q, k, v, cotangent = _inputs(2, q_len, kv_len, heads, kv_heads, seed=3)
    if kwargs == "key_mask":
        kwargs = {"key_mask": jnp.asarray(np.arange(kv_len)[None] < np.array([[17], [0]]))}

    def grads(attend):
        return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(attend(q, k, v) * cotangent),
                                          argnums=(0, 1, 2)))(q, k, v)

    attend = lambda q, k, v: attention.dot_product_attention(q, k, v, **kwargs)  # noqa: E731
    primitives = {e.primitive.name for e in jax.make_jaxpr(attend)(q, k, v).eqns}
    # The log-sum-exp path on TPU; on CPU no custom backward.
    assert ("custom_vjp_call" in primitives) == (platform == "tpu")
    (loss, ours) = grads(attend)
    (expected_loss, expected) = grads(lambda q, k, v: _jax_nn_reference(q, k, v, **kwargs))
    assert abs(float(loss - expected_loss)) < 1e-5 * abs(float(expected_loss)) + 1e-5
    for name, g_ref, g in zip("qkv", expected, ours):
        assert _relative_error(g_ref, g) < 1e-5, name


@pytest.mark.slow
def test_xla_attention_in_bfloat16_matches_jax_nn_to_bf16_rounding(monkeypatch):
    monkeypatch.setattr(attention, "target_device", lambda: ("tpu", ""))
    q, k, v, cotangent = (x.astype(jnp.bfloat16) for x in _inputs(2, 16, 32, 4, 2, seed=4))

    def grads(attend):
        return jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32)
                                                * cotangent.astype(jnp.float32)),
                        argnums=(0, 1, 2))(q, k, v)

    ours = grads(lambda q, k, v: attention.dot_product_attention(q, k, v))
    expected = grads(lambda q, k, v: _jax_nn_reference(q, k, v))
    for name, g_ref, g in zip("qkv", expected, ours):
        assert g.dtype == jnp.bfloat16
        # bf16 rounding of the probabilities and logit gradients (8 bits of mantissa).
        assert _relative_error(g_ref.astype(jnp.float32), g.astype(jnp.float32)) < 2e-2, name


def test_cudnn_key_compaction_matches_the_masked_reference():
    # cuDNN gets padding as key lengths after moving the visible keys to the front. Its
    # compaction and lengths run here through jax.nn's XLA path (no GPU): padding in the middle
    # (two right-padded text branches concatenated), random holes, an all-padding row, GQA.
    q, k, v, cotangent = _inputs(4, 12, 40, 4, 2, seed=11)
    branches = np.concatenate([np.arange(20) < 13, np.arange(20) < 6])
    holes = np.random.default_rng(12).random(40) < 0.5
    key_mask = jnp.asarray(np.stack([branches, holes, np.zeros(40, bool), np.ones(40, bool)]))
    scale = q.shape[-1]**-0.5

    def compacted(q, k, v, key_mask):
        out = attention._key_length_attention(q, k, v, key_mask, scale, "xla")
        return jnp.where(jnp.any(key_mask, -1)[:, None, None, None], out, 0)

    def grads(attend):
        return jax.jit(jax.value_and_grad(
            lambda q, k, v: jnp.sum(attend(q, k, v, key_mask=key_mask) * cotangent),
            argnums=(0, 1, 2)))(q, k, v)

    (loss, ours), (expected_loss, expected) = grads(compacted), grads(_jax_nn_reference)
    assert abs(float(loss - expected_loss)) < 1e-5 * abs(float(expected_loss))
    for name, g_ref, g in zip("qkv", expected, ours):
        assert _relative_error(g_ref, g) < 1e-5, name


def test_cudnn_gets_padding_as_key_lengths_not_a_bias(monkeypatch):
    # A boolean mask reaches cuDNN as a dense [batch, 1, q, kv] bias whose gradient it computes
    # as well (fmhaScaleBiasSoftmax*). Lowered for CUDA without a GPU: jax only asks for the
    # cuDNN version before it builds the custom calls.
    from jax._src.cudnn import fused_attention_stablehlo
    monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 91000)
    q, k, v, _ = (x.astype(jnp.bfloat16) for x in _inputs(2, 16, 24, 4, 2))
    key_mask = jnp.asarray(np.arange(24)[None] % 8 < np.array([[5], [8]]))

    def loss(q, k, v):
        out = attention.dot_product_attention(q, k, v, key_mask=key_mask,
                                              implementation="cudnn")
        return jnp.sum(out.astype(jnp.float32))

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, v).lower(
        lowering_platforms=("cuda",)).as_text()
    assert re.findall(r"custom_call @__cudnn\$(\w+)", text) == [
        "fmhaSoftmax", "fmhaSoftmaxBackward"]
    assert re.findall(r"mask_type\\22: \\22(\w+)", text) == ["PADDING", "PADDING"]
    assert "2x1x16x24" not in text  # no [batch, 1, q, kv] operand


# (q_len, kv_len, heads, kv_heads, kwargs): lengths that are not whole 128-token tiles are padded.
SPLASH_CASES = {
    "self_attention_padded_to_tiles": (100, 100, 2, 2, {}),
    "causal_gqa": (128, 128, 4, 2, {"causal": True}),
    "sliding_window_mqa": (128, 128, 4, 1, {"causal": True, "sliding_window": 16}),
}


@pytest.mark.parametrize("case", sorted(SPLASH_CASES))
def test_splash_matches_xla_forward_and_gradients(case):
    q_len, kv_len, heads, kv_heads, kwargs = SPLASH_CASES[case]
    _assert_matches_xla("splash", *_inputs(2, q_len, kv_len, heads, kv_heads), **kwargs)


def test_splash_padded_cross_attention_with_an_all_masked_row():
    q, k, v, cotangent = _inputs(2, 128, 40, 2, 2)
    # Row 0 sees 13 of 40 text keys; row 1 none: it must come back as zeros, as from XLA.
    key_mask = jnp.asarray(np.arange(40)[None] < np.array([[13], [0]]))
    out = _assert_matches_xla("splash", q, k, v, cotangent, key_mask=key_mask)
    assert not np.any(np.asarray(out[1]))


def test_splash_with_a_traced_sliding_window_matches_xla():
    # The LLMs scan over layers with the window as a per-layer value (global layers: huge);
    # splash cannot plan a traced mask and hands those to XLA: same numbers, no error.
    q, k, v, _ = _inputs(1, 128, 128, 2, 2)

    def run(implementation, window):
        return jax.jit(lambda q, k, v, w: attention.dot_product_attention(
            q, k, v, causal=True, sliding_window=w, implementation=implementation))(q, k, v, window)

    for window in (8, 1 << 30):
        assert _relative_error(run("xla", window), run("splash", window)) < RTOL


def test_splash_inside_shard_map_over_batch_and_heads():
    mesh = make_mesh(2, 2, 2)  # data x fsdp carry the batch, tensor the heads
    rules = common.DEFAULT_SHARDING_RULES
    q, k, v, cotangent = _inputs(4, 128, 128, 4, 4)
    key_mask = jnp.asarray(np.arange(128)[None] < np.array([[128], [5], [77], [1]]))
    expected = attention.dot_product_attention(q, k, v, key_mask=key_mask)
    with jax.set_mesh(mesh), sharding.axis_rules(rules):
        out = jax.jit(lambda q, k, v, m: attention.dot_product_attention(
            q, k, v, key_mask=m, implementation="splash"))(q, k, v, key_mask)
        text = jax.jit(lambda q, k, v, m: attention.dot_product_attention(
            q, k, v, key_mask=m, implementation="splash")).lower(q, k, v, key_mask).as_text()
    assert _relative_error(expected, out) < RTOL
    assert "shard_map" in text or "sdy.manual_computation" in text


@pytest.mark.parametrize("q_len,platform,kind,head_dim,dtype,expected", [
    (4096, "tpu", "TPU v5p", 128, jnp.bfloat16, "splash"),
    (256, "tpu", "TPU v5p", 128, jnp.bfloat16, "xla"),  # short: XLA's logits are small
    (4096, "gpu", "NVIDIA H100 80GB HBM3", 72, jnp.bfloat16, "cudnn"),
    (4096, "gpu", "NVIDIA H200", 128, jnp.float16, "cudnn"),
    (4096, "gpu", "NVIDIA H100 80GB HBM3", 72, jnp.float32, "xla"),  # cuDNN: 16-bit only
    (4096, "gpu", "NVIDIA H100 80GB HBM3", 256, jnp.bfloat16, "xla"),  # head_dim > 128
    (4096, "gpu", "AMD Instinct MI300X", 128, jnp.bfloat16, "xla"),  # not NVIDIA
    (4096, "cpu", "cpu", 128, jnp.bfloat16, "xla"),
])
def test_auto_dispatch(q_len, platform, kind, head_dim, dtype, expected):
    assert attention.select_implementation(q_len, q_len, head_dim, dtype, platform,
                                           kind) == expected


def test_auto_on_cpu_is_xla():
    q, k, v, _ = _inputs(1, 16, 16, 2, 2)
    np.testing.assert_array_equal(attention.dot_product_attention(q, k, v, implementation="auto"),
                                  attention.dot_product_attention(q, k, v))
    with pytest.raises(ValueError, match="known"):
        attention.dot_product_attention(q, k, v, implementation="flash")


def test_one_attention_module_and_layer_norm_for_dit_and_refiners():
    from lidit_jax.diffusion import dit
    from lidit_jax.nn import layers
    from lidit_jax.text import refiner
    assert dit.Attention is refiner.Attention is Attention
    assert dit.layer_norm is refiner.layer_norm is layers.layer_norm
