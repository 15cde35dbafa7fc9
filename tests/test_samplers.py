"""Samplers: exactness with oracle denoisers, a 2-D toy trained per objective, DDIM inversion,
classifier-free guidance batching, determinism under jit, diffusers parity (slow)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from lidit_jax.diffusion import objectives, samplers


def make(objective, **overrides):
    d = common.get_config().diffusion
    d.objective = objective
    d.update(overrides)
    return objectives.make_objective(d)


def alpha_sigma_at(objective, model_t):
    """(alpha, sigma) [batch] of the point the network is asked about at `model_t`."""
    if isinstance(objective, objectives.FlowObjective):
        return objective.alpha_sigma(model_t / 1000.0)
    step = jnp.round(model_t * objective.num_timesteps / 1000.0).astype(jnp.int32)
    return objective.alpha_sigma(step)


def gaussian_oracle(objective, mean, std):
    """The exact denoiser for data ~ N(mean, std^2 I) (std 0: a point mass), in the objective's
    parameterisation: E[x0 | x_t] and the matching noise, turned into eps, v or velocity."""

    def denoise(x, model_t, text):
        del text
        alpha, sigma = (v.reshape((-1,) + (1,) * (x.ndim - 1))
                        for v in alpha_sigma_at(objective, model_t))
        x0 = mean + alpha * std**2 / (alpha**2 * std**2 + sigma**2) * (x - alpha * mean)
        noise = (x - alpha * x0) / sigma
        if isinstance(objective, objectives.FlowObjective):
            return noise - x0
        if objective.prediction == "epsilon":
            return noise
        return alpha * noise - sigma * x0

    return denoise


CASES = [("epsilon", "scaled_linear", "ddim"), ("epsilon", "cosine", "dpm++2m"),
         ("v", "cosine", "ddim"), ("v", "linear", "dpm++2m"), ("flow", None, "ddim"),
         ("flow", None, "dpm++2m"), ("flow", None, "euler"), ("flow", None, "heun")]


def objective_for(name, schedule):
    return make(name, schedule=schedule) if schedule else make(name, flow_shift=3.0)


@pytest.mark.parametrize("name,schedule,sampler", CASES)
def test_point_mass_is_reached_exactly(name, schedule, sampler):
    objective = objective_for(name, schedule)
    out = samplers.sample(gaussian_oracle(objective, 0.7, 0.0), objective, (256, 1, 1, 1),
                          jax.random.key(0), sampler=sampler, steps=7)
    np.testing.assert_allclose(out, 0.7, atol=2e-4)


@pytest.mark.parametrize("name,schedule,sampler", CASES)
def test_gaussian_is_sampled(name, schedule, sampler):
    objective = objective_for(name, schedule)
    out = samplers.sample(gaussian_oracle(objective, 0.5, 0.5), objective, (4000, 1, 1, 1),
                          jax.random.key(0), sampler=sampler, steps=100)
    # scaled_linear ends at alpha_bar = 7e-4, not 0: starting from pure noise biases the mean.
    assert abs(float(out.mean()) - 0.5) < 0.05
    assert abs(float(out.std()) - 0.5) < 0.04


def test_flow_euler_single_step_is_exact_on_a_straight_path():
    objective = make("flow")
    target = jnp.array([0.3, -1.2])

    def velocity(x, model_t, text):  # Noise -> one point: the path is straight, u = x_1 - x_0.
        del text
        return (x - target) / (model_t[:, None] / 1000.0)

    noise = jax.random.normal(jax.random.key(0), (8, 2))
    out = samplers.sample(velocity, objective, (8, 2), jax.random.key(1), sampler="euler",
                          steps=1, x_init=noise)
    np.testing.assert_allclose(out, jnp.broadcast_to(target, (8, 2)), atol=1e-6)


@pytest.mark.parametrize("name,schedule", [("epsilon", "cosine"), ("v", "scaled_linear"),
                                           ("flow", None)])
def test_ddim_inversion_round_trip(name, schedule):
    objective = objective_for(name, schedule)
    denoise = gaussian_oracle(objective, 0.5, 0.5)
    x0 = 0.5 + 0.5 * jax.random.normal(jax.random.key(0), (500, 1, 1, 1))
    errors = []
    for steps in (25, 100):
        noise = samplers.ddim_invert(denoise, objective, x0, steps=steps)
        back = samplers.sample(denoise, objective, x0.shape, jax.random.key(1), sampler="ddim",
                               steps=steps, x_init=noise)
        errors.append(float(jnp.max(jnp.abs(back - x0))))
    assert abs(float(noise.std()) - 1.0) < 0.05  # Inverted data looks like unit noise.
    assert errors[1] < 0.1 and errors[1] < errors[0] / 2, errors  # First-order convergence.


# ---- A tiny denoiser trained on a 2-D Gaussian mixture, per objective ----------------------------
CENTERS = jnp.array([[-1.0, 0.5], [1.0, -0.5], [0.0, 1.5]])


def mixture(key, n):
    k1, k2 = jax.random.split(key)
    return CENTERS[jax.random.randint(k1, (n,), 0, 3)] + 0.25 * jax.random.normal(k2, (n, 2))


def mlp(params, x, model_t):
    angles = (model_t / 1000.0)[:, None] * jnp.exp(jnp.linspace(0.0, 4.0, 8))
    h = jnp.concatenate([x, jnp.sin(angles), jnp.cos(angles)], axis=-1)
    for i, (w, b) in enumerate(params):
        h = h @ w + b
        h = jax.nn.silu(h) if i < len(params) - 1 else h
    return h


def train_toy(objective, steps=600, batch=512, hidden=128):
    """Trains the MLP on objective.target exactly as train/step does; returns its params."""
    dims = [(18, hidden), (hidden, hidden), (hidden, 2)]
    keys = jax.random.split(jax.random.key(0), len(dims))
    params = [(jax.random.normal(k, d) / np.sqrt(d[0]), jnp.zeros(d[1]))
              for k, d in zip(keys, dims)]
    tx = optax.adam(optax.cosine_decay_schedule(3e-3, steps))

    def step(carry, key):
        params, opt_state = carry
        k_data, k_t, k_noise = jax.random.split(key, 3)
        x0 = mixture(k_data, batch)
        t = objective.sample_t(k_t, batch)
        noise = jax.random.normal(k_noise, x0.shape)

        def loss_fn(p):
            prediction = mlp(p, objective.noisy(x0, noise, t), objective.model_time(t))
            return jnp.mean(objective.loss(prediction, objective.target(x0, noise, t)))

        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state)
        return (optax.apply_updates(params, updates), opt_state), None

    run = jax.jit(lambda p, keys: jax.lax.scan(step, (p, tx.init(p)), keys)[0][0])
    return run(params, jax.random.split(jax.random.key(1), steps))


@pytest.mark.parametrize("name,schedule,sampler_names", [
    ("epsilon", "linear", ("ddim",)), ("v", "cosine", ("dpm++2m",)),
    ("flow", None, ("euler", "heun"))])
def test_trained_toy_samples_the_mixture(name, schedule, sampler_names):
    objective = make(name, schedule=schedule) if schedule else make(name)
    params = train_toy(objective)
    reference = mixture(jax.random.key(5), 50000)
    for sampler in sampler_names:
        draw = jax.jit(functools.partial(samplers.sample, lambda x, t, text: mlp(params, x, t),
                                         objective, (4000, 2), sampler=sampler, steps=100))
        out = draw(jax.random.key(3))
        np.testing.assert_allclose(out.mean(0), reference.mean(0), atol=0.08, err_msg=sampler)
        np.testing.assert_allclose(jnp.cov(out.T), jnp.cov(reference.T), atol=0.08,
                                   err_msg=sampler)


# ---- Guidance, determinism, errors ---------------------------------------------------------------
@jax.jit
def conditional_toy(x, model_t, text):
    """A denoiser whose output depends on x, t and every text leaf (nonlinearly)."""
    summary = jnp.tanh(text[0]["states"].sum(axis=(1, 2)) + text[0]["mask"].sum(axis=1))
    return jnp.sin(x) * summary[:, None, None, None] + model_t[:, None, None, None] / 1000.0


def text_batch(key, batch, length=5):
    return [{"states": jax.random.normal(key, (batch, length, 3)),
             "mask": jnp.ones((batch, length), bool).at[:, 3:].set(False)}]


def test_guidance_scale_one_is_the_conditional_prediction():
    x = jax.random.normal(jax.random.key(0), (4, 2, 2, 1))
    t = jnp.full((4,), 500.0)
    cond, uncond = text_batch(jax.random.key(1), 4), text_batch(jax.random.key(2), 1)
    guided = samplers.guided_prediction(conditional_toy, x, t, cond, uncond, 1.0)
    np.testing.assert_allclose(guided, conditional_toy(x, t, cond), atol=1e-6)


def test_batched_guidance_equals_two_calls():
    x = jax.random.normal(jax.random.key(0), (3, 2, 2, 1))
    t = jnp.array([100.0, 500.0, 900.0])
    cond, uncond = text_batch(jax.random.key(1), 3), text_batch(jax.random.key(2), 1)
    calls = []

    def counting(x, model_t, text):
        calls.append(x.shape[0])
        return conditional_toy(x, model_t, text)

    guided = samplers.guided_prediction(counting, x, t, cond, uncond, 4.5)
    assert calls == [6]  # One forward of 2 x batch.
    uncond_full = jax.tree.map(lambda u: jnp.broadcast_to(u, (3,) + u.shape[1:]), uncond)
    c, u = conditional_toy(x, t, cond), conditional_toy(x, t, uncond_full)
    np.testing.assert_allclose(guided, u + 4.5 * (c - u), atol=1e-5)
    with pytest.raises(ValueError, match="max_length"):
        samplers.guided_prediction(conditional_toy, x, t, cond, text_batch(jax.random.key(2), 1, 7))


@pytest.mark.parametrize("sampler,name", [("ddim", "epsilon"), ("dpm++2m", "v"),
                                          ("heun", "flow")])
def test_sampling_is_deterministic_and_jittable(sampler, name):
    objective = make(name)
    cond, uncond = text_batch(jax.random.key(1), 2), text_batch(jax.random.key(2), 1)
    run = functools.partial(samplers.sample, conditional_toy, objective, (2, 4, 4, 1),
                            sampler=sampler, steps=4, guidance_scale=3.0)
    jitted = jax.jit(run)
    first = jitted(jax.random.key(0), cond=cond, uncond=uncond)
    np.testing.assert_array_equal(first, jitted(jax.random.key(0), cond=cond, uncond=uncond))
    np.testing.assert_allclose(first, run(jax.random.key(0), cond=cond, uncond=uncond),
                               atol=1e-5)
    assert not np.allclose(first, jitted(jax.random.key(1), cond=cond, uncond=uncond))


def test_ddim_eta_adds_noise_but_keeps_the_distribution():
    objective = make("epsilon", schedule="cosine")
    denoise = gaussian_oracle(objective, 0.5, 0.5)
    run = functools.partial(samplers.sample, denoise, objective, (4000, 1, 1, 1),
                            jax.random.key(0), sampler="ddim", steps=100)
    deterministic, ancestral = run(eta=0.0), run(eta=1.0)
    assert float(jnp.max(jnp.abs(deterministic - ancestral))) > 0.1
    assert abs(float(ancestral.mean()) - 0.5) < 0.05 and abs(float(ancestral.std()) - 0.5) < 0.04


def test_bad_sampler_choices_name_the_fix():
    shape, key = (1, 2, 2, 1), jax.random.key(0)
    with pytest.raises(ValueError, match="diffusion.objective=flow"):
        samplers.sample(conditional_toy, make("epsilon"), shape, key, sampler="euler")
    with pytest.raises(ValueError, match="diffusion.sampler"):
        samplers.sample(conditional_toy, make("flow"), shape, key, sampler="plms")


# ---- Parity with diffusers' schedulers (reference implementations) -------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m"])
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_matches_diffusers(sampler, prediction):
    import torch
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    objective = make(prediction, schedule="scaled_linear")
    denoise = gaussian_oracle(objective, 0.5, 0.5)
    common_args = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                       beta_schedule="scaled_linear", timestep_spacing="trailing",
                       prediction_type="v_prediction" if prediction == "v" else "epsilon")
    if sampler == "ddim":
        scheduler = DDIMScheduler(**common_args, set_alpha_to_one=True, clip_sample=False)
    else:
        scheduler = DPMSolverMultistepScheduler(
            **common_args, algorithm_type="dpmsolver++", solver_order=2,
            final_sigmas_type="zero", lower_order_final=True)
    # 10 steps divide 1000: diffusers' DDIM steps to t - 1000 // steps, which is then our grid.
    scheduler.set_timesteps(10)
    noise = jax.random.normal(jax.random.key(0), (64, 1, 1, 1))
    x = torch.from_numpy(np.array(noise))
    for t in scheduler.timesteps:
        model_t = jnp.full((64,), float(t))
        prediction_t = np.array(denoise(jnp.asarray(x.numpy()), model_t, None))
        x = scheduler.step(torch.from_numpy(prediction_t), t, x).prev_sample
    ours = samplers.sample(denoise, objective, noise.shape, jax.random.key(1), sampler=sampler,
                           steps=10, x_init=noise)
    np.testing.assert_allclose(ours, x.numpy(), atol=2e-4, rtol=1e-4)
