"""nnx.Linear's contraction on CPU (`nn.layers.dense_dot_general`): same values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lidit_jax.nn import layers


def test_cpu_dense_matches_dot_general_forward_and_gradients():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 5, 16)), jnp.float32)
    dense = layers.linear(16, 8, ("embed", "mlp"), rngs=nnx.Rngs(0))
    plain = nnx.Linear(16, 8, rngs=nnx.Rngs(0))
    nnx.update(plain, nnx.state(dense))

    def loss(module, x):
        return jnp.sum(jnp.tanh(module(x)) * jnp.arange(8.0))

    value, (grad_module, grad_x) = jax.value_and_grad(loss, argnums=(0, 1))(dense, x)
    expected, (expected_module, expected_x) = jax.value_and_grad(loss, argnums=(0, 1))(plain, x)
    np.testing.assert_allclose(value, expected, rtol=1e-6)
    np.testing.assert_allclose(grad_x, expected_x, rtol=1e-5, atol=1e-6)
    for got, want in zip(jax.tree.leaves(nnx.state(grad_module)),
                         jax.tree.leaves(nnx.state(expected_module))):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_cpu_dense_is_what_cpu_compiles():
    # The CPU program's weight gradient carries the barrier (a TPU or GPU target gets plain
    # lax.dot_general: the layer tests compiled for v5e in test_aot run that path).
    dense = layers.linear(16, 8, ("embed", "mlp"), rngs=nnx.Rngs(0))
    x = jnp.ones((4, 16))
    grad = jax.jit(jax.grad(lambda m, x: jnp.sum(m(x) ** 2)))  # The weight gradient.
    assert "opt-barrier" in grad.lower(dense, x).as_text(dialect="hlo")
