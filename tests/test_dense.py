"""nnx.Linear's and nnx.Conv's contractions on CPU (`nn.cpu_paths.dense_dot_general`,
`nn.cpu_paths.conv_general_dilated`): the same values and gradients as lax's."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lidit_jax.nn import cpu_paths, layers


def _assert_same_loss_and_gradients(ours, plain, x, outputs, rtol, atol):
    """`plain` takes `ours`' parameters; then a loss over `outputs` channels, its gradients
    for the parameters and for x agree to rtol / atol."""
    nnx.update(plain, nnx.state(ours))

    def loss(module, x):
        return jnp.sum(jnp.tanh(module(x)) * jnp.arange(float(outputs)))

    value, (grad_module, grad_x) = jax.value_and_grad(loss, argnums=(0, 1))(ours, x)
    expected, (expected_module, expected_x) = jax.value_and_grad(loss, argnums=(0, 1))(plain, x)
    np.testing.assert_allclose(value, expected, rtol=rtol)
    np.testing.assert_allclose(grad_x, expected_x, rtol=rtol, atol=atol)
    for got, want in zip(jax.tree.leaves(nnx.state(grad_module)),
                         jax.tree.leaves(nnx.state(expected_module))):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


def test_cpu_dense_matches_dot_general_forward_and_gradients():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 5, 16)), jnp.float32)
    dense = layers.linear(16, 8, ("embed", "mlp"), rngs=nnx.Rngs(0))
    # atol: float32 round-off of gradients up to ~9 summed over 15 rows (~1e-6), whichever
    # order XLA's code generation sums them in.
    _assert_same_loss_and_gradients(dense, nnx.Linear(16, 8, rngs=nnx.Rngs(0)), x, 8,
                                    rtol=1e-5, atol=1e-5)


def test_cpu_dense_is_what_cpu_compiles():
    # The CPU program's weight gradient carries the barrier (a TPU or GPU target gets plain
    # lax.dot_general: the layer tests compiled for v5e in test_aot run that path).
    dense = layers.linear(16, 8, ("embed", "mlp"), rngs=nnx.Rngs(0))
    x = jnp.ones((4, 16))
    grad = jax.jit(jax.grad(lambda m, x: jnp.sum(m(x) ** 2)))  # The weight gradient.
    assert "opt-barrier" in grad.lower(dense, x).as_text(dialect="hlo")


@pytest.mark.parametrize("kernel_size,strides", [((3, 3), 1), ((5, 3), 1), ((3, 3), 2)])
def test_cpu_conv_matches_lax_forward_and_gradients(kernel_size, strides):
    # Stride 1 takes the patch-matmul backward (a custom_vjp); stride 2 falls back to lax.
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 7, 6, 8)), jnp.float32)
    kwargs = dict(strides=strides, padding="SAME", rngs=nnx.Rngs(0))
    ours = nnx.Conv(8, 12, kernel_size, conv_general_dilated=cpu_paths.conv_general_dilated,
                    **kwargs)
    _assert_same_loss_and_gradients(ours, nnx.Conv(8, 12, kernel_size, **kwargs), x, 12,
                                    rtol=1e-4, atol=1e-5)
    primitives = {e.primitive.name for e in jax.make_jaxpr(lambda x: ours(x))(x).eqns}
    assert ("custom_vjp_call" in primitives) == (strides == 1)
