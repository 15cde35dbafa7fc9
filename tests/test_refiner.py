"""Token refiners, collaborative refiner and prompt-token selection (lidit_jax.text.refiner)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import common
from lidit_jax.text import refiner

WIDTH = 64
apply = nnx.jit(lambda module, *args: module(*args))


def text_config(fusion="single", **refiner_overrides):
    c = common.get_config().text
    c.fusion = fusion
    c.refiner.heads = c.collaborative.heads = 4
    c.refiner.update(refiner_overrides)
    return c


def randomize(module, seed, scale=0.2):
    """Perturbs every parameter (zero-initialised gates included) so every path is exercised."""
    rng = np.random.default_rng(seed)
    state = nnx.state(module, nnx.Param)
    nnx.update(module, jax.tree.map(
        lambda x: x + scale * rng.standard_normal(x.shape).astype(x.dtype), state))
    return module


def inputs(seed, widths, lengths, real, prompt_start, prompt_stop, dtype=jnp.float32):
    """Random (never zero) states; per branch, example i has real[i] tokens (right padding) and
    prompt tokens at [prompt_start[i], prompt_stop[i])."""
    rng = np.random.default_rng(seed)
    batch = len(real)
    states, masks, prompt_masks = [], [], []
    for width, length in zip(widths, lengths):
        states.append(jnp.asarray(rng.standard_normal((batch, length, width)) + 0.5, dtype))
        pos = np.arange(length)[None, :]
        masks.append(jnp.asarray(pos < np.array(real)[:, None]))
        prompt_masks.append(jnp.asarray((pos >= np.array(prompt_start)[:, None])
                                        & (pos < np.array(prompt_stop)[:, None])))
    t_emb = jnp.asarray(rng.standard_normal((batch, WIDTH)), jnp.float32)
    return states, masks, prompt_masks, t_emb


def branch(tokens, lengths, k):
    start = sum(lengths[:k])
    return tokens[:, start:start + lengths[k]]


@pytest.mark.parametrize("causal,gating", [(False, True), (False, False), (True, True),
                                           (True, False)])
def test_refiner_is_bidirectional_unless_causal(causal, gating):
    """Changing the last prompt token (position 7) changes the refined first prompt token
    (position 2), unless the causal mask is kept. c is held fixed: with gates, the pooled
    condition (which sees every token) would legitimately carry the change to every token."""
    model = randomize(refiner.TextConditioner(text_config(causal=causal, gating=gating), [48],
                                              WIDTH, rngs=nnx.Rngs(0)), 1)
    token_refiner = model.refiners[0]
    states, masks, prompt_masks, t_emb = inputs(2, [48], [8], [8], [2], [8])
    changed = states[0].at[:, 7].add(1.0)
    c = t_emb + token_refiner.pooled(states[0], masks[0])
    first = apply(token_refiner, states[0], masks[0], c)[:, 2]
    first_changed = apply(token_refiner, changed, masks[0], c)[:, 2]
    if causal:
        np.testing.assert_allclose(first_changed, first, atol=1e-6)
        return
    assert float(jnp.max(jnp.abs(first_changed - first))) > 1e-3
    # End to end: the DiT's first text token is that refined first prompt token.
    tokens = apply(model, states, masks, prompt_masks, t_emb)[0]
    # Two programs (the conditioner, the refiner alone): float32 rounding of the scale (~25).
    np.testing.assert_allclose(tokens[:, 0], apply(token_refiner, states[0], masks[0], c)[:, 2],
                               rtol=1e-5, atol=2e-6 * float(jnp.abs(tokens).max()))
    tokens_changed = apply(model, [changed], masks, prompt_masks, t_emb)[0]
    assert float(jnp.max(jnp.abs(tokens_changed[:, 0] - tokens[:, 0]))) > 1e-3


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_padding_never_changes_real_tokens(padding_side):
    lengths, extra = [6, 5], 4
    model = randomize(refiner.TextConditioner(text_config("collaborative"), [48, 32], WIDTH,
                                              rngs=nnx.Rngs(0)), 3)
    states, masks, prompt_masks, t_emb = inputs(4, [48, 32], lengths, [6, 3], [1, 0], [5, 3])
    rng = np.random.default_rng(5)
    padded = []
    for s, m, p in zip(states, masks, prompt_masks):
        garbage = jnp.asarray(100 * rng.standard_normal((2, extra, s.shape[-1])), s.dtype)
        none = jnp.zeros((2, extra), bool)
        join = ((lambda a, b: jnp.concatenate([a, b], 1)) if padding_side == "right"
                else (lambda a, b: jnp.concatenate([b, a], 1)))
        padded.append((join(s, garbage), join(m, none), join(p, none)))
    tokens, mask, pooled = apply(model, states, masks, prompt_masks, t_emb)
    padded_tokens, padded_mask, padded_pooled = apply(model, *map(list, zip(*padded)), t_emb)
    padded_lengths = [n + extra for n in lengths]
    for k, n in enumerate(lengths):
        np.testing.assert_allclose(branch(padded_tokens, padded_lengths, k)[:, :n],
                                   branch(tokens, lengths, k), rtol=1e-5, atol=1e-4)
        np.testing.assert_array_equal(branch(padded_mask, padded_lengths, k)[:, :n],
                                      branch(mask, lengths, k))
        assert not np.any(branch(padded_mask, padded_lengths, k)[:, n:])
    np.testing.assert_allclose(padded_pooled, pooled, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fusion,widths,overrides,perturb", [
    ("single", [48], {}, False),
    ("collaborative", [48, 32], {}, False),
    ("collaborative", [48], {}, False),
    # Depth 0 (the no-refiner ablation) is the projection whatever the parameters.
    ("concat", [48, 32], dict(depth=0, input_norm=False), True),
])
def test_refiner_starts_as_the_input_projection(fusion, widths, overrides, perturb):
    """At init (zero gates) every refiner block is the identity, so each output token is the
    input projection of its (normed) state, and the prompt tokens come out in order."""
    lengths = [7] * len(widths)
    model = refiner.TextConditioner(text_config(fusion, **overrides), widths, WIDTH,
                                    rngs=nnx.Rngs(0))
    if perturb:
        randomize(model, 13)
    states, masks, prompt_masks, t_emb = inputs(6, widths, lengths, [7, 5], [2, 1], [6, 5])
    tokens, mask, _ = apply(model, states, masks, prompt_masks, t_emb)
    for k, token_refiner in enumerate(model.refiners):
        normed = (states[k] if token_refiner.input_norm is None
                  else token_refiner.input_norm(states[k]))
        projected = token_refiner.input_proj(normed)
        expected = [projected[0, 2:6], projected[1, 1:5]]
        for i in range(2):
            np.testing.assert_allclose(branch(tokens, lengths, k)[i, :4], expected[i], atol=1e-5)
            np.testing.assert_array_equal(branch(mask, lengths, k)[i], np.arange(7) < 4)


@pytest.mark.parametrize("fusion,widths,depth", [("single", [48], 2), ("concat", [48, 32], 1),
                                                 ("collaborative", [48], 1),
                                                 ("collaborative", [48, 32], 0),
                                                 pytest.param("collaborative", [48, 32, 40], 1,
                                                              marks=pytest.mark.slow)])
def test_shapes_masks_and_degenerate_rows(fusion, widths, depth):
    """Rows: a normal prompt; an empty prompt (keeps its last real token); no real token.
    Gradients are checked on the 3-LLM case only (it holds every path; each compile costs)."""
    lengths = [6, 5, 4][:len(widths)]
    model = randomize(refiner.TextConditioner(text_config(fusion, depth=depth), widths, WIDTH,
                                              dtype=jnp.bfloat16, rngs=nnx.Rngs(0)), 7)
    states, masks, prompt_masks, t_emb = inputs(8, widths, lengths, [4, 3, 0], [1, 2, 0],
                                                [3, 2, 0], dtype=jnp.bfloat16)
    tokens, mask, pooled = apply(model, states, masks, prompt_masks, t_emb)
    assert tokens.shape == (3, sum(lengths), WIDTH) and tokens.dtype == jnp.float32
    assert mask.shape == (3, sum(lengths)) and mask.dtype == jnp.bool_
    assert pooled.shape == (3, WIDTH) and pooled.dtype == jnp.float32
    assert np.all(np.isfinite(tokens)) and np.all(np.isfinite(pooled))
    for k, n in enumerate(lengths):
        np.testing.assert_array_equal(branch(mask, lengths, k),
                                      np.arange(n)[None, :] < np.array([[2], [1], [1]]))
        np.testing.assert_array_equal(branch(tokens, lengths, k)[~branch(mask, lengths, k)], 0.0)
    if len(widths) < 3:
        return

    def loss(module):
        out, out_mask, out_pooled = module(states, masks, prompt_masks, t_emb)
        return jnp.sum(jnp.where(out_mask[..., None], out, 0.0) ** 2) + jnp.sum(out_pooled ** 2)

    grads = nnx.jit(nnx.grad(loss))(model)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_empty_prompt_keeps_the_last_real_token():
    model = randomize(refiner.TextConditioner(text_config(), [48], WIDTH, rngs=nnx.Rngs(0)), 9)
    states, masks, _, t_emb = inputs(10, [48], [6], [4], [0], [0])
    token_refiner = model.refiners[0]
    c = t_emb + token_refiner.pooled(states[0], masks[0])
    refined = token_refiner(states[0], masks[0], c)
    tokens, mask, _ = apply(model, states, masks, [jnp.zeros((1, 6), bool)], t_emb)
    np.testing.assert_array_equal(mask, np.arange(6)[None, :] < 1)
    np.testing.assert_allclose(tokens[:, 0], refined[:, 3], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("fusion", ["collaborative", "concat"])
def test_only_collaborative_fusion_mixes_branches(fusion):
    """Branch 0's tokens see branch 1's states only through the collaborative cross-attention
    (in concat fusion each branch's gates are conditioned on its own pooled states only)."""
    lengths = [6, 5]
    model = randomize(refiner.TextConditioner(text_config(fusion), [48, 32], WIDTH,
                                              rngs=nnx.Rngs(0)), 11)
    states, masks, prompt_masks, t_emb = inputs(12, [48, 32], lengths, [6], [1], [5])
    changed = [states[0], states[1].at[:, 2].multiply(-1.0)]
    tokens = apply(model, states, masks, prompt_masks, t_emb)[0]
    tokens_changed = apply(model, changed, masks, prompt_masks, t_emb)[0]
    difference = float(jnp.max(jnp.abs(branch(tokens_changed, lengths, 0)
                                       - branch(tokens, lengths, 0))))
    if fusion == "collaborative":
        assert difference > 1e-3
    else:
        assert difference == 0.0


def test_every_parameter_has_logical_axes():
    abstract = nnx.eval_shape(lambda: refiner.TextConditioner(
        text_config("collaborative"), [48, 32], WIDTH, rngs=nnx.Rngs(0)))
    rules = dict(common.DEFAULT_SHARDING_RULES)
    for path, variable in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        axes = variable.get_metadata().get("out_sharding")
        name = ".".join(map(str, path))
        assert axes is not None and len(axes) == variable.ndim, name
        assert all(a in rules for a in axes), name


def test_bad_configuration_names_the_key():
    with pytest.raises(ValueError, match="text.fusion='single'"):
        refiner.TextConditioner(text_config("single"), [48, 32], WIDTH, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="text.fusion='mean'"):
        refiner.TextConditioner(text_config("mean"), [48], WIDTH, rngs=nnx.Rngs(0))
    model = refiner.TextConditioner(text_config("concat"), [48, 32], WIDTH, rngs=nnx.Rngs(0))
    states, masks, prompt_masks, t_emb = inputs(0, [48], [4], [4], [0], [4])
    with pytest.raises(ValueError, match="text.encoders"):
        model(states, masks, prompt_masks, t_emb)


@pytest.mark.parametrize("modulation", ["per_branch", "mean"])
def test_collaborative_branch_k_is_modulated_by_its_own_pooled_text(modulation, monkeypatch):
    """The paper: each collaborative branch takes "the same input as the gating network",
    t + pooled_k; modulation='mean' keeps the older t + mean_k pooled_k for every branch."""
    config = text_config("collaborative")
    config.collaborative.modulation = modulation
    model = randomize(refiner.TextConditioner(config, [48, 32], WIDTH, rngs=nnx.Rngs(0)), 3)
    states, masks, prompt_masks, t_emb = inputs(4, [48, 32], [6, 5], [5, 4], [1, 1], [4, 3])
    seen = []
    original = refiner.CollaborativeBranch.__call__
    monkeypatch.setattr(refiner.CollaborativeBranch, "__call__",
                        lambda self, x, context, mask, c: seen.append(c) or original(
                            self, x, context, mask, c))
    model(states, masks, prompt_masks, t_emb)  # Eager, so the conditions can be recorded.
    pooled = [r.pooled(s, m) for r, s, m in zip(model.refiners, states, masks)]
    expected = ([t_emb + p for p in pooled] if modulation == "per_branch"
                else [t_emb + (pooled[0] + pooled[1]) / 2] * 2)
    assert len(seen) == 2
    for c, want in zip(seen, expected):
        np.testing.assert_allclose(c, want, rtol=1e-6, atol=1e-6)
    assert float(jnp.max(jnp.abs(pooled[0] - pooled[1]))) > 1e-2  # The two modes differ.
