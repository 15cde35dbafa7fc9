"""Train-step images/s: lidit_jax vs diffusers' PixArtTransformer2DModel (PyTorch), same CPU.

    python -m benchmarks.train_step [--smoke] [--repeats=5]

Both models get the same width, depth, heads, patch, image and text tokens, batch and optimizer
step: forward, MSE loss, backward, global-norm clipping at 1.0, AdamW, and an EMA of the
weights, float32 throughout. Ours is the LI-DiT with the text refiner at depth 0 (an input
projection of the LLM states, like PixArt's caption projection) and fusion 'single'; PixArt
uses adaLN-single and a sin-cos position table where we use per-block adaLN and a 3x3-conv
position ResBlock, so ours does slightly more matmul work per image (its FLOPs are reported).
Each runs in a process of its own (both in one with --smoke) and the two take turns
(benchmarks/timing.py); torch runs with as many threads as XLA:CPU uses (all cores).
"""
import argparse
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.timing import interleaved_seconds_apart, load_average  # noqa: E402
from configs import common  # noqa: E402
from lidit_jax import host_allocator  # noqa: E402
from lidit_jax.parallel import mesh as mesh_lib  # noqa: E402
from lidit_jax import hardware  # noqa: E402
from lidit_jax.train import program as program_lib  # noqa: E402

# (name, depth, width, heads, image size, patch, text tokens, LLM width, batch)
SHAPES = {
    "pixart": dict(depth=6, width=384, heads=6, image=32, patch=2, text=64, llm=576, batch=32),
    # Batch 16: at 32 the two models and their optimizer states need more than 24 GiB together
    # (the out-of-memory killer stopped it at 24.4 GiB resident, 2026-11-30).
    "large": dict(depth=12, width=768, heads=12, image=32, patch=2, text=64, llm=576, batch=16),
    "smoke": dict(depth=1, width=32, heads=2, image=8, patch=2, text=8, llm=24, batch=4),
}


def model_config(shape):
    c = common.get_config()
    c.model.update(depth=shape["depth"], width=shape["width"], heads=shape["heads"],
                   patch_size=shape["patch"], dtype="float32")
    c.text.update(max_length=shape["text"], fusion="single")
    c.text.refiner.depth = 0
    c.data.image_size = shape["image"]
    c.diffusion.objective = "flow"
    c.train.update(batch_size=shape["batch"], warmup_steps=0, learning_rate=1e-4,
                   ema_decay=0.999)
    c.mesh.replicated_min_size = 1 << 40
    return c


def batch_arrays(shape, seed=0):
    rng = np.random.default_rng(seed)
    b, n = shape["batch"], shape["text"]
    lengths = rng.integers(n // 4, n + 1, b)
    mask = np.arange(n)[None] < lengths[:, None]
    return {
        "x0": rng.uniform(-1, 1, (b, shape["image"], shape["image"], 3)).astype(np.float32),
        "states": rng.normal(size=(b, n, shape["llm"])).astype(np.float32),
        "mask": mask,
    }


def ours_step(config, arrays, llm_width):
    """(run, flops): `run()` does one jitted train step of `config`'s LI-DiT on `arrays` (the
    state is donated and carried from call to call); `flops` = its model FLOPs."""
    mesh = mesh_lib.build_mesh(config.mesh, jax.devices()[:1])
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    batch = {"x0": jnp.asarray(arrays["x0"]),
             "text": [{"states": jnp.asarray(arrays["states"]),
                       "mask": jnp.asarray(arrays["mask"]),
                       "prompt_mask": jnp.asarray(arrays["mask"])}]}
    batch = jax.device_put(batch, replicated)
    program = program_lib.build(config, mesh, [llm_width], 3, arrays["x0"].shape[1:3],
                                jax.tree.map(lambda _: replicated, batch))
    step = program.step
    holder = [program.init_state()]

    def run():
        holder[0], out = step(holder[0], batch)
        jax.block_until_ready(out["loss"])

    return run, program.model_flops_per_step  # The arrays are model_config's batch and length.


def diffusers_step(shape, arrays):
    """The same step for diffusers' PixArtTransformer2DModel with torch.optim.AdamW."""
    import torch
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    model = PixArtTransformer2DModel(
        num_attention_heads=shape["heads"], attention_head_dim=shape["width"] // shape["heads"],
        in_channels=3, out_channels=3, num_layers=shape["depth"],
        cross_attention_dim=shape["width"], sample_size=shape["image"],
        patch_size=shape["patch"], caption_channels=shape["llm"],
        use_additional_conditions=False).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    ema = [p.detach().clone() for p in params]
    x0 = torch.from_numpy(np.moveaxis(arrays["x0"], -1, 1).copy())
    states = torch.from_numpy(arrays["states"])
    mask = torch.from_numpy(arrays["mask"]).float()
    generator = torch.Generator().manual_seed(0)

    def run():
        t = torch.sigmoid(torch.randn(x0.shape[0], generator=generator))
        noise = torch.randn(x0.shape, generator=generator)
        x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
        prediction = model(x_t, encoder_hidden_states=states, timestep=t * 1000,
                           encoder_attention_mask=mask,
                           added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        loss = torch.mean(torch.square(prediction - (noise - x0)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1 - 0.999)
        loss.item()

    return run


def ours_contender(shape_name):
    """benchmarks.timing factory: our step at SHAPES[shape_name] -> (run, {flops})."""
    shape = SHAPES[shape_name]
    run, flops = ours_step(model_config(shape), batch_arrays(shape), shape["llm"])
    return run, {"flops": flops}


def diffusers_contender(shape_name):
    """benchmarks.timing factory: diffusers' step at SHAPES[shape_name] -> (run, {threads})."""
    import torch

    torch.set_num_threads(os.cpu_count())
    shape = SHAPES[shape_name]
    return diffusers_step(shape, batch_arrays(shape)), {"torch_threads": torch.get_num_threads()}


def measure(shape_name, repeats, smoke=False):
    shape = SHAPES[shape_name]
    load = load_average()
    contender = {"shape_name": shape_name}
    seconds, info = interleaved_seconds_apart(
        {"ours": ("benchmarks.train_step:ours_contender", contender),
         "diffusers": ("benchmarks.train_step:diffusers_contender", contender)}, repeats,
        # What `--mode=train` runs under on CPU (lidit_jax/host_allocator.py); PyTorch's step
        # measured the same with and without it.
        environ=host_allocator.with_settings(), smoke=smoke)
    images, flops = shape["batch"], info["ours"]["flops"]
    ours_rate, reference_rate = images / seconds["ours"], images / seconds["diffusers"]
    peak = hardware.measure_cpu_peak_flops()
    return {
        "shape": shape_name, **shape,
        "ours_images_per_s": ours_rate,
        "diffusers_images_per_s": reference_rate,
        "ratio": ours_rate / reference_rate,
        "ours_flops_per_step": flops,
        "ours_flops_per_s": flops / seconds["ours"],
        "cpu_peak_flops_per_s": peak,
        "fraction_of_peak": flops / seconds["ours"] / peak,
        "torch_threads": info["diffusers"]["torch_threads"],
        "repeats": repeats,
        "load_average": load,
    }


def run(smoke=False, repeats=3, shapes=("pixart", "large")):
    """The benchmark's records: one per shape. The larger shape gets one repeat fewer (a step
    takes minutes on 2 busy cores)."""
    if smoke:
        return [measure("smoke", 1, smoke=True)]
    return [measure(name, repeats if name == "pixart" else max(1, repeats - 1))
            for name in shapes]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shape, one repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shapes", default="pixart,large",
                        help=f"comma-separated, of {', '.join(sorted(SHAPES))}")
    args = parser.parse_args()
    records = run(args.smoke, args.repeats, [s for s in args.shapes.split(",") if s])
    for record in records:
        print(json.dumps(record))


if __name__ == "__main__":
    main()
