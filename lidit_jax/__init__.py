"""lidit_jax: LI-DiT, the LLM-infused diffusion transformer, in JAX/Flax NNX."""
from flax import nnx

# Parameters carry *logical* axis names (embed, mlp, heads, ...), which only become mesh axes
# through the config's rules table when the train state is created
# (`parallel.sharding.checked_shardings`).
# Flax's eager sharding would instead try to place each variable at construction time, which fails
# for logical names and for models built outside a mesh (tests, eval_shape), so it is off.
nnx.use_eager_sharding(False)
