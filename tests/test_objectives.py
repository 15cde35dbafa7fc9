"""Diffusion objectives: schedules, noising, targets, model time, flow timestep sampling."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from lidit_jax.diffusion import objectives


def make(objective, **overrides):
    d = common.get_config().diffusion
    d.objective = objective
    d.update(overrides)
    return objectives.make_objective(d)


ALL = [("epsilon", "linear"), ("epsilon", "scaled_linear"), ("epsilon", "cosine"),
       ("v", "scaled_linear"), ("v", "cosine"), ("flow", "linear")]


@pytest.mark.parametrize("name,schedule", ALL)
def test_target_and_split_recover_data_and_noise(name, schedule):
    """What training regresses on is exactly what the samplers decode: split(target) = (x0, eps)."""
    objective = make(name, schedule=schedule)
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x0 = jax.random.normal(k1, (64, 4, 6, 3))
    noise = jax.random.normal(k2, x0.shape)
    t = objective.sample_t(k3, 64)
    x_t = objective.noisy(x0, noise, t)
    alpha, sigma = objective.alpha_sigma(t)
    x0_hat, noise_hat = objective.split(objective.target(x0, noise, t), x_t, alpha, sigma)
    # Epsilon recovers x0 by dividing by alpha, which is ~0.03 at the noisiest cosine steps.
    keep = alpha > 0.1
    np.testing.assert_allclose(x0_hat[keep], x0[keep], atol=1e-4)
    np.testing.assert_allclose(noise_hat, noise, atol=1e-4)
    model_t = objective.model_time(t)
    assert model_t.dtype == jnp.float32 and model_t.shape == (64,)
    assert float(model_t.min()) >= 0.0 and float(model_t.max()) <= 1000.0
    losses = objective.loss(objective.target(x0, noise, t), objective.target(x0, noise, t))
    assert losses.shape == (64,) and float(jnp.max(losses)) == 0.0


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "cosine"])
def test_ddpm_schedule_shape(schedule):
    objective = make("epsilon", schedule=schedule)
    alpha_bar = np.asarray(objective.alpha_bar)
    assert alpha_bar.shape == (1000,)
    assert np.all(np.diff(alpha_bar) < 0) and 0.99 < alpha_bar[0] < 1.0 and alpha_bar[-1] < 0.01
    t = objective.sample_t(jax.random.key(0), 4096)
    assert t.dtype == jnp.int32 and int(t.min()) >= 0 and int(t.max()) == 999
    alpha, sigma = objective.alpha_sigma(t)
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=1e-6)


def test_v_target_is_the_velocity_of_the_vp_path():
    objective = make("v", schedule="cosine")
    x0, noise = jnp.full((2, 1, 1, 1), 0.5), jnp.full((2, 1, 1, 1), -1.0)
    t = jnp.array([100, 900])
    alpha, sigma = objective.alpha_sigma(t)
    expected = alpha * -1.0 - sigma * 0.5
    np.testing.assert_allclose(objective.target(x0, noise, t).ravel(), expected, rtol=1e-6)


def test_flow_path_timesteps_and_shift():
    objective = make("flow", flow_shift=1.0)
    x0, noise = jnp.ones((3, 2, 2, 1)), -jnp.ones((3, 2, 2, 1))
    t = jnp.array([0.0, 0.25, 1.0])
    np.testing.assert_allclose(objective.noisy(x0, noise, t)[:, 0, 0, 0], [1.0, 0.5, -1.0])
    np.testing.assert_allclose(objective.target(x0, noise, t), -2.0)
    np.testing.assert_allclose(objective.model_time(t), [0.0, 250.0, 1000.0])

    key = jax.random.key(0)
    plain = objective.sample_t(key, 20000)
    assert 0.0 < float(plain.min()) and float(plain.max()) < 1.0
    assert abs(float(jnp.median(plain)) - 0.5) < 0.02  # logit-normal(0, 1) is symmetric.
    shifted = make("flow", flow_shift=3.0).sample_t(key, 20000)
    np.testing.assert_allclose(shifted, 3 * plain / (1 + 2 * plain), rtol=1e-5)
    assert float(jnp.median(shifted)) > 0.7
    narrow = make("flow", flow_logit_mean=-1.0, flow_logit_std=0.1).sample_t(key, 1000)
    np.testing.assert_allclose(jnp.median(narrow), jax.nn.sigmoid(-1.0), atol=0.01)


def test_flow_shift_grows_with_resolution():
    objective = make("flow", flow_shift=2.0, flow_shift_base_size=32)
    assert objective.resolution_shift((32, 32)) == pytest.approx(2.0)
    assert objective.resolution_shift((64, 64)) == pytest.approx(4.0)
    assert objective.resolution_shift(None) == pytest.approx(2.0)
    key = jax.random.key(1)
    assert float(jnp.mean(objective.sample_t(key, 512, hw=(64, 64)))) > float(
        jnp.mean(objective.sample_t(key, 512, hw=(32, 32))))
    _, _, sigmas = objective.sampling_grid(4, hw=(64, 64))
    np.testing.assert_allclose([sigmas[0], sigmas[-1]], [1.0, 0.0])
    assert make("flow", flow_shift=2.0).resolution_shift((64, 64)) == pytest.approx(2.0)


@pytest.mark.parametrize("name", ["epsilon", "flow"])
def test_sampling_grid_runs_from_noise_to_clean(name):
    objective = make(name)
    model_t, alphas, sigmas = objective.sampling_grid(10)
    assert model_t.shape == (10,) and alphas.shape == sigmas.shape == (11,)
    assert float(model_t[0]) == pytest.approx(999.0 if name == "epsilon" else 1000.0)
    assert np.all(np.diff(np.asarray(model_t)) < 0) and np.all(np.diff(np.asarray(sigmas)) < 0)
    assert float(alphas[-1]) == 1.0 and float(sigmas[-1]) == 0.0


def test_bad_config_names_the_key():
    with pytest.raises(ValueError, match="diffusion.objective"):
        make("score")
    with pytest.raises(ValueError, match="diffusion.schedule"):
        make("epsilon", schedule="quadratic")
    with pytest.raises(ValueError, match="sample_steps"):
        make("epsilon").sampling_grid(0)


@pytest.mark.slow
@pytest.mark.parametrize("ours,theirs", [("linear", "linear"), ("scaled_linear", "scaled_linear"),
                                         ("cosine", "squaredcos_cap_v2")])
def test_schedules_match_diffusers(ours, theirs):
    from diffusers import DDPMScheduler

    # Stable Diffusion's betas for scaled_linear; the DDPM defaults otherwise.
    betas = dict(beta_start=0.00085, beta_end=0.012) if ours == "scaled_linear" else {}
    reference = DDPMScheduler(num_train_timesteps=1000, beta_schedule=theirs,
                              **betas).alphas_cumprod
    np.testing.assert_allclose(make("epsilon", schedule=ours).alpha_bar, reference.numpy(),
                               rtol=2e-5, atol=1e-9)
