"""Parameter-free 2-D position codes for a token grid: sin-cos tables and rotary embeddings.

Both take the grid's (height, width) in tokens at call time, so any image size and aspect ratio
works (buckets, the 512 -> 1024 stage), and both use raw token indices (row r, column c), as DiT
and PixArt (sin-cos) and Flux, SD3.5 and Lumina (rotary) do: a larger grid extends the
positions instead of squeezing them.

  sincos  [h, w, dim] added to the tokens: the first dim/2 channels encode the row, the last
          dim/2 the column, each as sin | cos of index * 10000^(-k / (dim/4)), k < dim/4.
  rope    each head's q and k rotated in 2-D pairs by angles index * frequency: the first
          head_dim/2 channels by the row, the last head_dim/2 by the column, so q.k depends on
          the tokens' offset (dr, dc) only. Applied before any attention kernel and before
          context parallelism splits the sequence, it works with every implementation.
"""
import jax.numpy as jnp

# model.position_embedding's choices; "resblock" is diffusion.dit.PositionResBlock.
POSITION_EMBEDDINGS = ("resblock", "sincos", "rope", "resblock+sincos", "resblock+rope")
MAX_PERIOD = 10000.0


def _frequencies(count):
    """[count] angular frequencies 10000^(-k/count), k < count (the Transformer's ladder)."""
    return MAX_PERIOD**(-jnp.arange(count, dtype=jnp.float32) / count)


def _grid_indices(height, width):
    """(rows, cols) float32 [height * width] in row-major (patchify's) token order."""
    rows, cols = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                              jnp.arange(width, dtype=jnp.float32), indexing="ij")
    return rows.reshape(-1), cols.reshape(-1)


def sincos_2d(height, width, dim):
    """The 2-D sin-cos table [height, width, dim] float32; dim must be a multiple of 4."""
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos position table needs model.width divisible by 4; "
                         f"got {dim}")
    frequencies = _frequencies(dim // 4)

    def encode(index):  # [n] -> [n, dim/2]
        angles = index[:, None] * frequencies[None, :]
        return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)

    rows, cols = _grid_indices(height, width)
    return jnp.concatenate([encode(rows), encode(cols)], axis=-1).reshape(height, width, dim)


def rope_2d(height, width, head_dim):
    """Rotary tables (cos, sin), each [height * width, head_dim / 2] float32, one angle per
    channel pair: pairs [0, head_dim/4) follow the row, the rest the column."""
    if head_dim % 4:
        raise ValueError(f"2-D rotary embeddings need a head width (model.width / model.heads) "
                         f"divisible by 4; got {head_dim}")
    frequencies = _frequencies(head_dim // 4)
    rows, cols = _grid_indices(height, width)
    angles = jnp.concatenate([rows[:, None] * frequencies, cols[:, None] * frequencies], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, rope):
    """Rotates x [batch, len, heads, head_dim] by `rope` = (cos, sin) [len, head_dim/2]:
    channels (2i, 2i+1) form pair i. Computed in float32, returned in x's dtype."""
    cos, sin = (table[None, :, None, :] for table in rope)
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)
