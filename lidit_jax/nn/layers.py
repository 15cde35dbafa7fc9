"""Basic layers whose parameters carry logical axis names.

Logical names (`embed`, `mlp`, `heads`, ...) are mapped to mesh axes by the config's rules table
(`configs/common.py`, `lidit_jax.parallel.sharding`); layers never name mesh axes themselves.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from lidit_jax.nn.attention import dot_product_attention
from lidit_jax.nn.context_parallel import context_parallel_attention
from lidit_jax.nn.cpu_paths import dense_dot_general
from lidit_jax.nn.positions import apply_rope
from lidit_jax.parallel.sharding import constrain

default_kernel_init = nnx.initializers.lecun_normal()


def linear(
    in_features,
    out_features,
    axes,
    *,
    rngs,
    use_bias=True,
    dtype=None,
    param_dtype=jnp.float32,
    kernel_init=default_kernel_init,
    bias_init=nnx.initializers.zeros_init(),
):
    """nnx.Linear whose kernel [in, out] carries logical `axes` and bias [out] carries axes[1];
    its contraction is `dense_dot_general`."""
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.with_partitioning(kernel_init, tuple(axes)),
        bias_init=nnx.with_partitioning(bias_init, (axes[1],)),
        dot_general=dense_dot_general,
        rngs=rngs,
    )


class RMSNorm(nnx.Module):
    """RMS normalisation over the last axis, computed in float32.

    `scale_offset` = 1 gives Gemma's convention (weight stored as w, applied as 1 + w); 0 gives
    Llama's (applied as w). Output is cast back to the input dtype.
    """

    def __init__(self, dim, *, eps=1e-6, scale_offset=0.0, param_dtype=jnp.float32, rngs=None):
        del rngs  # Deterministic init; kept for a uniform constructor signature.
        init_value = 0.0 if scale_offset else 1.0
        self.scale = nnx.Param(jnp.full((dim,), init_value, param_dtype), out_sharding=("norm",))
        self.eps = eps
        self.scale_offset = scale_offset

    def __call__(self, x):
        return rms_norm(x, self.scale[...], self.eps, self.scale_offset).astype(x.dtype)


def layer_norm(x, eps=1e-6):
    """Parameter-free LayerNorm over the last axis, in float32 (adaLN or gates carry the scale)."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(jnp.mean(jnp.square(x - mean), -1, keepdims=True) + eps)


def _rms_normalized(x, eps):
    """x / RMS(x) over the last axis, in float32."""
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


def normalize_rms(x, eps=1e-6):
    """Parameter-free RMS normalisation over the last axis (float32 inside), in x's dtype."""
    return _rms_normalized(x, eps).astype(x.dtype)


def rms_norm(x, weight, eps, offset):
    """RMS norm over the last axis in float32, the weight applied the way each family does:
    Llama/Qwen2 (offset 0) w * normed.astype(dtype); Gemma (offset 1) (normed * (1 + w)) cast.
    The one RMS norm of the frozen LLMs, T5 and `RMSNorm` (the DiT and refiners)."""
    normed = _rms_normalized(x, eps)
    if offset:
        return (normed * (offset + weight.astype(jnp.float32))).astype(x.dtype)
    return weight * normed.astype(x.dtype)


class Attention(nnx.Module):
    """Multi-head attention with optional QK-RMSNorm: self-attention, or cross-attention given
    `context`. The DiT's self- and cross-attention and the text refiners' attention.

    Projections: q/k/v kernels [embed, heads*head_dim] (logical ("embed", "heads")), output
    [heads*head_dim, embed] ("heads", "embed"); q/k norm scales [head_dim] ("norm").
    `implementation` and `block_sizes` go to `dot_product_attention`; `context_parallel`
    (none | all_gather | ulysses | ring) routes self-attention through
    `lidit_jax.nn.context_parallel` when the mesh has a `context` axis larger than 1.
    """

    def __init__(self, width, heads, *, qk_norm=True, implementation="xla", block_sizes=None,
                 context_parallel="none", dtype=None, param_dtype=jnp.float32, rngs):
        if width % heads:
            raise ValueError(f"attention width {width} is not divisible by {heads} heads")
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.query = linear(width, width, ("embed", "heads"), **kwargs)
        self.key = linear(width, width, ("embed", "heads"), **kwargs)
        self.value = linear(width, width, ("embed", "heads"), **kwargs)
        self.out = linear(width, width, ("heads", "embed"), **kwargs)
        head_dim = width // heads
        self.q_norm = RMSNorm(head_dim, param_dtype=param_dtype) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, param_dtype=param_dtype) if qk_norm else None
        self.heads = heads
        self.implementation = implementation
        self.block_sizes = None if block_sizes is None else tuple(block_sizes)
        self.context_parallel = context_parallel

    def __call__(self, x, context=None, key_mask=None, *, causal=False, rope=None):
        """x [batch, len, embed]; context [batch, ctx_len, embed] (None: self-attention over x);
        key_mask [batch, ctx_len] bool; rope: (cos, sin) [len, head_dim/2] rotary tables
        (`nn.positions.rope_2d`) applied to q and k of self-attention. Returns
        [batch, len, embed]."""
        source = x if context is None else context
        split = lambda y: y.reshape(*y.shape[:2], self.heads, -1)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(source)), split(self.value(source))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        q = constrain(q, ("batch", "length", "heads", "head_dim"))
        kwargs = dict(implementation=self.implementation, block_sizes=self.block_sizes)
        if context is None and self.context_parallel != "none":
            out = context_parallel_attention(q, k, v, key_mask=key_mask, causal=causal,
                                             strategy=self.context_parallel, **kwargs)
        else:
            out = dot_product_attention(q, k, v, key_mask=key_mask, causal=causal, **kwargs)
        return self.out(out.reshape(*x.shape[:2], -1))


ACTIVATIONS = {
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
}


class MLP(nnx.Module):
    """Feed-forward block: [..., embed] -> [..., mlp] -> [..., embed].

    `gated=True` is the GLU form (SwiGLU for silu, GeGLU for gelu): act(x W_gate) * (x W_up) W_down.
    """

    def __init__(
        self,
        dim,
        hidden,
        *,
        activation="gelu_tanh",
        gated=False,
        use_bias=True,
        dtype=None,
        param_dtype=jnp.float32,
        rngs,
    ):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r}; known: {sorted(ACTIVATIONS)}")
        kwargs = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.up = linear(dim, hidden, ("embed", "mlp"), **kwargs)
        self.gate = linear(dim, hidden, ("embed", "mlp"), **kwargs) if gated else None
        self.down = linear(hidden, dim, ("mlp", "embed"), **kwargs)
        self.activation = activation

    def __call__(self, x):
        act = ACTIVATIONS[self.activation]
        h = act(self.gate(x)) * self.up(x) if self.gate is not None else act(self.up(x))
        return self.down(h)


def modulate(x, shift, scale):
    """adaLN: x [batch, len, dim] * (1 + scale [batch, dim]) + shift [batch, dim]."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


def timestep_frequencies(t, dim, max_period=10000.0):
    """Sinusoidal features of (possibly fractional) timesteps t [batch] -> [batch, dim], float32."""
    half = dim // 2
    freqs = jnp.exp(-jnp.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepEmbedder(nnx.Module):
    """Timestep t [batch] (0..1000 scale) -> [batch, dim] via sinusoids and a 2-layer SiLU MLP."""

    def __init__(self, dim, *, frequency_dim=256, dtype=None, param_dtype=jnp.float32, rngs):
        init = nnx.initializers.normal(0.02)
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=init, rngs=rngs)
        self.fc1 = linear(frequency_dim, dim, ("channels", "embed"), **kwargs)
        self.fc2 = linear(dim, dim, ("mlp", "embed"), **kwargs)
        self.frequency_dim = frequency_dim

    def __call__(self, t):
        h = timestep_frequencies(t, self.frequency_dim)
        return self.fc2(jax.nn.silu(self.fc1(h)))
