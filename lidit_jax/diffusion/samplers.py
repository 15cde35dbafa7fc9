"""Samplers: DDIM, DPM-Solver++(2M), Euler and Heun (flow), with classifier-free guidance.

All of them work on the objective's grid (`objective.sampling_grid`): points i = 0..steps with
x_i = alpha_i x0 + sigma_i noise, noisiest first, the last point clean. The network output is
turned into (x0, noise) estimates by `objective.split`, so DDIM and DPM-Solver++ serve every
objective; Euler and Heun integrate the flow ODE dx/dt = velocity and need objective=flow.

The loop over steps is a `lax.scan`, so `jax.jit(functools.partial(sample, denoise_fn, objective,
shape, sampler=..., steps=...))` compiles one step's graph, and the result depends only on `key`.
`denoise_fn(x [b, H, W, C], model_t [b], text) -> prediction [b, H, W, C]`; for an nnx model
(an LIDiT) use `denoiser(model)`, which re-creates the module inside each step's trace.

`make_generate` is the one jitted sampling program that training, `--mode=sample` and evaluation
share.

Guidance: with `uncond` (the empty prompt's text, batch 1 or the same batch as `cond`), cond and
uncond run as one forward of batch 2b, and prediction = uncond + scale * (cond - uncond).
"""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from lidit_jax.diffusion.objectives import FlowObjective

SAMPLERS = ("ddim", "dpm++2m", "euler", "heun")


def denoiser(model):
    """An nnx model as a pure `denoise_fn`: split once, merged (as fresh Variables) per step.

    Calling the module object itself from inside the sampler's `lax.scan` fails for models that
    use nnx transforms (the scanned DiT blocks): its Variables belong to the outer trace. Use it
    inside `nnx.jit` with the model as an argument, so the weights are inputs, not constants:

        @functools.partial(nnx.jit, static_argnames="steps")
        def generate(model, key, cond, uncond, steps):
            return sample(denoiser(model), objective, shape, key, steps=steps, ...)
    """
    graphdef, state = nnx.split(model)
    return lambda x, model_t, text: nnx.merge(graphdef, state, copy=True)(x, model_t, text)


def concat_text(cond, uncond):
    """Stacks cond and uncond text pytrees along batch; uncond leaves of batch 1 are broadcast."""

    def stack(c, u):
        if u.shape[0] == 1 and c.shape[0] != 1:
            u = jnp.broadcast_to(u, (c.shape[0],) + u.shape[1:])
        if u.shape != c.shape:
            raise ValueError(f"unconditional text leaf has shape {u.shape}, the conditional one "
                             f"{c.shape}; encode the empty prompt with the same max_length")
        return jnp.concatenate([c, u.astype(c.dtype)], axis=0)

    return jax.tree.map(stack, cond, uncond)


def guided_prediction(denoise_fn, x, model_t, cond, uncond=None, guidance_scale=1.0):
    """Classifier-free guided prediction [b, ...]; cond and uncond batched into one forward."""
    if uncond is None:
        return denoise_fn(x, model_t, cond)
    batch = x.shape[0]
    both = denoise_fn(jnp.concatenate([x, x]), jnp.concatenate([model_t, model_t]),
                      concat_text(cond, uncond))
    conditional, unconditional = both[:batch], both[batch:]
    return unconditional + guidance_scale * (conditional - unconditional)


def _estimates(denoise_fn, objective, guidance, x, model_t, alpha, sigma):
    """(x0, noise) estimates at a grid point; model_t, alpha, sigma are scalars."""
    batch = x.shape[0]
    full = lambda v: jnp.full((batch,), v, jnp.float32)  # noqa: E731
    prediction = guided_prediction(denoise_fn, x, full(model_t), **guidance)
    return objective.split(prediction.astype(jnp.float32), x, full(alpha), full(sigma))


def sample(denoise_fn, objective, shape, key, *, sampler="ddim", steps=50, guidance_scale=1.0,
           cond=None, uncond=None, eta=0.0, x_init=None):
    """Draws samples [shape] (float32) from noise in `steps` network evaluations (Heun: 2 x - 1).

    Args:
      denoise_fn: (x, model_t [b], text) -> prediction, in the objective's parameterisation.
      objective: from `objectives.make_objective`.
      shape: (batch, H, W, C); H, W also set the flow objective's resolution shift.
      key: PRNG key; the starting noise and (DDIM eta > 0) the step noise come from it.
      sampler: one of SAMPLERS.
      guidance_scale, cond, uncond: classifier-free guidance (uncond None: no guidance).
      eta: DDIM stochasticity (0: deterministic DDIM, 1: DDPM-like ancestral steps).
      x_init: optional starting point [shape] (e.g. from `ddim_invert`) instead of fresh noise.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"diffusion.sampler={sampler!r}; known: {SAMPLERS}")
    if sampler in ("euler", "heun") and not isinstance(objective, FlowObjective):
        raise ValueError(f"sampler {sampler!r} integrates the flow ODE; set diffusion.objective="
                         "flow, or use sampler ddim or dpm++2m for epsilon / v")
    hw = tuple(shape[1:3]) if len(shape) == 4 else None
    model_t, alphas, sigmas = objective.sampling_grid(steps, hw)
    noise_key, step_key = jax.random.split(key)
    x = jax.random.normal(noise_key, shape, jnp.float32) if x_init is None else x_init
    guidance = dict(cond=cond, uncond=uncond, guidance_scale=guidance_scale)

    def estimates(x, i):
        return _estimates(denoise_fn, objective, guidance, x, model_t[i], alphas[i], sigmas[i])

    if sampler == "ddim":
        def step(x, i):
            x0, noise = estimates(x, i)
            return _ddim_update(x0, noise, alphas[i], sigmas[i], alphas[i + 1], sigmas[i + 1],
                                eta, jax.random.fold_in(step_key, i)), None
        x, _ = jax.lax.scan(step, x, jnp.arange(steps))
        return x
    if sampler == "dpm++2m":
        return _dpm_solver_2m(estimates, x, alphas, sigmas, steps)
    return _flow_ode(denoise_fn, objective, guidance, x, sigmas, steps, heun=sampler == "heun")


def _ddim_update(x0, noise, alpha, sigma, alpha_next, sigma_next, eta, key):
    """DDIM (Song et al.) in alpha/sigma form; the fresh-noise share is eta * sigma_next *
    sqrt(1 - SNR / SNR_next), which is DDIM's sigma_t(eta) for VP schedules and also holds for
    flow. With eta = 0 the step is deterministic (and, for flow, exactly an Euler step)."""
    snr_ratio = jnp.square(alpha * sigma_next) / jnp.square(sigma * alpha_next)
    fresh = eta * sigma_next * jnp.sqrt(jnp.clip(1.0 - snr_ratio, 0.0, 1.0))
    direction = jnp.sqrt(jnp.clip(sigma_next**2 - fresh**2, 0.0))
    x = alpha_next * x0 + direction * noise
    if eta:
        x = x + fresh * jax.random.normal(key, x.shape, x.dtype)
    return x


def _dpm_solver_2m(estimates, x, alphas, sigmas, steps):
    """DPM-Solver++(2M) (Lu et al. 2022), data prediction, multistep, in lambda = log(alpha/sigma).

    x_{i+1} = sigma_{i+1}/sigma_i x_i + (alpha_{i+1} - alpha_i sigma_{i+1}/sigma_i) D_i, with
    D_i = x0_i + h_i / (2 h_{i-1}) (x0_i - x0_{i-1}); first order (D = x0_i) on the first step and
    the last one (into sigma = 0, where h is infinite). Written without exp(-h) so that alpha = 0
    (flow at t = 1) and sigma = 0 (the clean end) stay finite.
    """
    lambdas = jnp.log(alphas) - jnp.log(sigmas)  # -inf at alpha 0, +inf at sigma 0.

    def step(carry, i):
        x, x0_prev = carry
        x0, _ = estimates(x, i)
        h, h_prev = lambdas[i + 1] - lambdas[i], lambdas[i] - lambdas[jnp.maximum(i - 1, 0)]
        second_order = (i > 0) & (i < steps - 1)
        # h_prev is +inf after a flow start at alpha 0: the correction then vanishes, as it should.
        ratio = jnp.where(second_order, h / (2.0 * h_prev), 0.0)
        d = jnp.where(second_order, x0 + ratio * (x0 - x0_prev), x0)
        keep = sigmas[i + 1] / sigmas[i]
        x = keep * x + (alphas[i + 1] - alphas[i] * keep) * d
        return (x, x0), None

    (x, _), _ = jax.lax.scan(step, (x, jnp.zeros_like(x)), jnp.arange(steps))
    return x


def _flow_ode(denoise_fn, objective, guidance, x, times, steps, heun):
    """Euler or Heun (trapezoidal corrector, skipped on the final step into t = 0, as in EDM) on
    dx/dt = v(x, t) over the flow grid `times` (= sigmas, 1 -> 0)."""

    def velocity(x, t):
        model_t = jnp.full((x.shape[0],), objective.model_time(t), jnp.float32)
        return guided_prediction(denoise_fn, x, model_t, **guidance).astype(jnp.float32)

    def step(x, i):
        t, t_next = times[i], times[i + 1]
        v = velocity(x, t)
        x_euler = x + (t_next - t) * v
        if not heun:
            return x_euler, None
        corrected = lambda: x + (t_next - t) * 0.5 * (v + velocity(x_euler, t_next))  # noqa: E731
        return jax.lax.cond(i < steps - 1, corrected, lambda: x_euler), None

    x, _ = jax.lax.scan(step, x, jnp.arange(steps))
    return x


def ddim_invert(denoise_fn, objective, x0, *, steps=50, guidance_scale=1.0, cond=None,
                uncond=None):
    """Deterministic DDIM run backwards: clean x0 [b, H, W, C] -> the noise `sample` maps to it.

    Walks the same grid as `sample(..., sampler='ddim', steps=steps)` from the clean end. The
    network is asked at the current (less noisy) point, the usual DDIM-inversion approximation;
    at the clean end, where a DDPM objective has no timestep, it sees the smallest grid time.
    The round trip sample(ddim_invert(x0)) -> x0 is exact as steps grow.
    """
    hw = tuple(x0.shape[1:3]) if x0.ndim == 4 else None
    model_t, alphas, sigmas = objective.sampling_grid(steps, hw)
    guidance = dict(cond=cond, uncond=uncond, guidance_scale=guidance_scale)

    def step(x, j):  # From grid point j (cleaner) to j - 1.
        x0_hat, noise = _estimates(denoise_fn, objective, guidance, x,
                                   model_t[jnp.minimum(j, steps - 1)], alphas[j], sigmas[j])
        return alphas[j - 1] * x0_hat + sigmas[j - 1] * noise, None

    x, _ = jax.lax.scan(step, x0.astype(jnp.float32), jnp.arange(steps, 0, -1))
    return x


def make_generate(graphdef, objective, shape, diffusion_config):
    """(params, key, cond, uncond) -> host numpy samples [shape], CFG with the empty prompt.

    The sampler is one jitted program over the run's mesh; its result is gathered from every
    process, so each one holds all samples.
    """

    @jax.jit
    def generate(params, key, cond, uncond):
        model = nnx.merge(graphdef, params)
        return sample(denoiser(model), objective, shape, key, sampler=diffusion_config.sampler,
                      steps=diffusion_config.sample_steps,
                      guidance_scale=diffusion_config.guidance_scale, cond=cond, uncond=uncond)

    def generate_on_host(params, key, cond, uncond):
        samples = generate(params, key, cond, uncond)
        return np.asarray(multihost_utils.process_allgather(samples, tiled=True))

    return generate_on_host
