"""Diffusion objectives: DDPM epsilon, v-prediction, rectified flow. One object per config.

Every objective writes the noisy sample as x_t = alpha(t) * x0 + sigma(t) * noise:
  epsilon, v (DDPM, discrete t in 0..T-1): alpha = sqrt(alpha_bar_t), sigma = sqrt(1 - alpha_bar_t)
  flow (continuous t in [0, 1]):          alpha = 1 - t,              sigma = t
and the network's prediction can always be turned into (x0, noise) estimates (`split`), which is
all the samplers need; they never look at which objective it is.

Targets: epsilon -> noise; v -> alpha * noise - sigma * x0; flow -> noise - x0 (the velocity
dx_t/dt). The network sees `model_time(t)` on a 0..1000 scale for all three.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

OBJECTIVES = ("epsilon", "v", "flow")
SCHEDULES = ("linear", "scaled_linear", "cosine")
MODEL_TIME_SCALE = 1000.0


def beta_schedule(name, num_timesteps):
    """DDPM betas [T] (float64 numpy): linear (Ho et al.), scaled_linear (Stable Diffusion),
    cosine (Nichol & Dhariwal, clipped at 0.999)."""
    if name == "linear":
        # DDPM's 1e-4..0.02 for 1000 steps, rescaled so other step counts keep the same path.
        scale = 1000 / num_timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    if name == "scaled_linear":
        return np.linspace(0.00085**0.5, 0.012**0.5, num_timesteps, dtype=np.float64) ** 2
    if name == "cosine":
        s = 0.008
        steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
        alpha_bar = np.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return np.clip(1 - alpha_bar[1:] / alpha_bar[:-1], 0, 0.999)
    raise ValueError(f"diffusion.schedule={name!r}; known: {SCHEDULES}")


def per_example_mse(prediction, target):
    """Mean squared error over all but the batch axis, in float32: [batch]."""
    error = jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32))
    return jnp.mean(error, axis=tuple(range(1, error.ndim)))


def _bcast(v, x):
    """[batch] -> [batch, 1, 1, ...] to broadcast against x."""
    return jnp.reshape(v, v.shape + (1,) * (x.ndim - v.ndim))


@dataclasses.dataclass(frozen=True, eq=False)
class DDPMObjective:
    """Discrete-time DDPM with epsilon or v prediction. t: int32 step index in [0, T)."""

    prediction: str  # "epsilon" | "v"
    alpha_bar: jax.Array  # [T] float32

    @property
    def num_timesteps(self):
        return self.alpha_bar.shape[0]

    def sample_t(self, key, batch, hw=None):
        """Uniform training steps [batch] int32. (`hw` is accepted for the common API; unused.)"""
        del hw
        return jax.random.randint(key, (batch,), 0, self.num_timesteps)

    def alpha_sigma(self, t):
        alpha_bar = self.alpha_bar[t]
        return jnp.sqrt(alpha_bar), jnp.sqrt(1.0 - alpha_bar)

    def noisy(self, x0, noise, t):
        alpha, sigma = self.alpha_sigma(t)
        return _bcast(alpha, x0) * x0 + _bcast(sigma, x0) * noise

    def target(self, x0, noise, t):
        if self.prediction == "epsilon":
            return noise
        alpha, sigma = self.alpha_sigma(t)
        return _bcast(alpha, x0) * noise - _bcast(sigma, x0) * x0

    def model_time(self, t):
        return t.astype(jnp.float32) * (MODEL_TIME_SCALE / self.num_timesteps)

    def loss(self, prediction, target):
        """Per-example MSE [batch] against `target` (noise, or v)."""
        return per_example_mse(prediction, target)

    def split(self, prediction, x_t, alpha, sigma):
        """(x0, noise) estimates from the network output at a point with (alpha, sigma) [batch]."""
        alpha, sigma = _bcast(alpha, x_t), _bcast(sigma, x_t)
        if self.prediction == "epsilon":
            return (x_t - sigma * prediction) / alpha, prediction
        # alpha^2 + sigma^2 = 1: x0 = alpha x_t - sigma v, noise = sigma x_t + alpha v.
        return alpha * x_t - sigma * prediction, sigma * x_t + alpha * prediction

    def sampling_grid(self, steps, hw=None):
        """Sampler time grid, noisiest first: model times [steps], alphas and sigmas [steps + 1].

        'Trailing' spacing (Lin et al. 2023): T-1, T-1-T/steps, ..., T/steps-1, so sampling
        starts at the noisiest trained step and every step spans T/steps; the extra last point is
        the clean sample (alpha 1, sigma 0), which the network is never asked about.
        """
        del hw
        if not 1 <= steps <= self.num_timesteps:
            raise ValueError(f"sample_steps={steps} must be in 1..{self.num_timesteps}")
        t = np.round(np.arange(self.num_timesteps, 0, -self.num_timesteps / steps)) - 1
        t = t.astype(np.int32)
        alpha, sigma = self.alpha_sigma(jnp.asarray(t))
        return (self.model_time(jnp.asarray(t)), jnp.append(alpha, 1.0), jnp.append(sigma, 0.0))


@dataclasses.dataclass(frozen=True, eq=False)
class FlowObjective:
    """Rectified flow: x_t = (1 - t) x0 + t noise, target velocity noise - x0. t: float in [0, 1].

    Training times are logit-normal (sigmoid of N(logit_mean, logit_std^2), SD3), then shifted
    towards noise by `shift`: t' = shift t / (1 + (shift - 1) t). With `shift_base_size` > 0 the
    shift grows with resolution as in SD3 (Sec. 5.3.2): an image of H x W tokens/pixels uses
    shift * sqrt(H W) / shift_base_size, so a larger image, which keeps more signal at the same
    noise level, sees as much noise as the base size did.
    """

    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0
    shift_base_size: int = 0

    def resolution_shift(self, hw=None):
        if hw is None or not self.shift_base_size:
            return self.shift
        return self.shift * math.sqrt(hw[0] * hw[1]) / self.shift_base_size

    def shift_time(self, t, hw=None):
        shift = self.resolution_shift(hw)
        return shift * t / (1.0 + (shift - 1.0) * t)

    def sample_t(self, key, batch, hw=None):
        """Training times [batch] float32 in (0, 1); `hw` = (H, W) of x0 (resolution shift)."""
        u = jax.nn.sigmoid(self.logit_mean + self.logit_std * jax.random.normal(key, (batch,)))
        return self.shift_time(u, hw)

    def alpha_sigma(self, t):
        return 1.0 - t, t

    def noisy(self, x0, noise, t):
        t = _bcast(t, x0)
        return (1.0 - t) * x0 + t * noise

    def target(self, x0, noise, t):
        del t
        return noise - x0

    def model_time(self, t):
        return t.astype(jnp.float32) * MODEL_TIME_SCALE

    def loss(self, prediction, target):
        """Per-example MSE [batch] against the velocity target (conditional flow matching)."""
        return per_example_mse(prediction, target)

    def split(self, prediction, x_t, alpha, sigma):
        """(x0, noise) from a velocity u: x0 = x_t - sigma u, noise = x_t + alpha u."""
        alpha, sigma = _bcast(alpha, x_t), _bcast(sigma, x_t)
        return x_t - sigma * prediction, x_t + alpha * prediction

    def sampling_grid(self, steps, hw=None):
        """Times 1 -> 0 in `steps` uniform steps, shifted like training: model times [steps],
        alphas and sigmas [steps + 1] (the last point is t = 0, the clean sample)."""
        if steps < 1:
            raise ValueError(f"sample_steps={steps} must be >= 1")
        t = self.shift_time(jnp.linspace(1.0, 0.0, steps + 1), hw)
        alpha, sigma = self.alpha_sigma(t)
        return self.model_time(t[:-1]), alpha, sigma


def make_objective(diffusion_config):
    """The objective named by `config.diffusion` (objective, schedule, num_timesteps, flow_*)."""
    d = diffusion_config
    if d.objective == "flow":
        return FlowObjective(logit_mean=float(d.flow_logit_mean),
                             logit_std=float(d.flow_logit_std), shift=float(d.flow_shift),
                             shift_base_size=int(d.flow_shift_base_size))
    if d.objective in ("epsilon", "v"):
        betas = beta_schedule(d.schedule, d.num_timesteps)
        alpha_bar = jnp.asarray(np.cumprod(1.0 - betas), jnp.float32)
        return DDPMObjective(prediction=d.objective, alpha_bar=alpha_bar)
    raise ValueError(f"diffusion.objective={d.objective!r}; known: {OBJECTIVES}")
