"""The --mode=compile report for a TPU v5e 2x2 slice (libtpu on this CPU host, no TPU)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common, lidit_10b
from lidit_jax import aot, aot_compile, aot_cost, configuration, hardware
from lidit_jax.nn.attention import dot_product_attention
from train_helpers import aot_demo_config

# Three TPU compiles of the demo step (scanned, and the depth-1 and depth-2 twins, which the
# online text path's report reuses): ~1 min on 2 idle cores, 21 min on 2 cores shared by six
# sessions.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("tpu_compile_precision")]


@pytest.fixture(scope="module")
def report():
    config = aot_demo_config()
    devices = aot_compile.topology_devices(config.aot.topology)
    compiled, state = aot_compile.compile_train_step(config, devices)
    return config, compiled, aot.step_report(config, devices, compiled, state)


def test_scanned_step_flops_count_every_layer(report):
    config, compiled, result = report
    scanned_flops, _ = aot_cost._cost(compiled)
    # XLA alone counts the scanned body once; the loop-counted figure matches the model count.
    assert scanned_flops < 0.9 * result["model_flops"]
    assert abs(result["flops_ratio"] - 1) <= aot_cost.FLOPS_TOLERANCE, result
    assert result["flops_check"] == "ok"


def test_mfu_memory_and_last_line(report, capsys):
    config, _, result = report
    assert 0 < result["est_mfu"] <= 1
    assert result["seconds"] > 0
    assert result["fits"] is True
    assert 0 < result["params"] <= result["per_chip_bytes"]
    assert result["opt_state"] == pytest.approx(2 * result["params"], rel=0.01)  # Adam: m, v
    aot.print_report(config, result)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("fits=True hbm_per_chip_gib=")
    assert float(last.split("est_mfu=")[1]) == pytest.approx(result["est_mfu"], abs=1e-4)


def test_dit_attention_kernels_follow_auto_on_the_topology():
    # On the v5e devices libtpu describes, `auto` keeps XLA below 1024 image tokens and picks
    # splash from 1024 (512 px with an 8x VAE and patch 2), the kernel the cost model cannot
    # see; the cross-attention to 56 text tokens stays XLA.
    config = aot_demo_config()
    device = aot_compile.topology_devices(config.aot.topology)[0]
    config.model.attention = "auto"
    kernels = lambda: [k for k, _, _ in aot_cost.dit_attention_kernels(config, device)]  # noqa: E731
    assert kernels() == ["xla", "xla"]  # 256 image tokens
    assert aot_cost.splash_cost_per_chip(config, device, 4) == (0, 0)
    config.data.image_size, config.vae.downsample, config.model.patch_size = 512, 8, 2
    assert kernels() == ["splash", "xla"]
    config.model.attention = "splash"  # Forced: the cross-attention's tiles count too.
    (_, q, kv), (_, q2, kv2) = aot_cost.dit_attention_kernels(config, device)
    assert (q, kv, q2, kv2) == (1024, 1024, 1024, 56)
    # Ring context parallelism's hops are XLA attention: no splash roofline for them.
    config.mesh.context, config.model.context_parallel = 2, "ring"
    assert kernels() == ["xla", "splash"]
    config.model.context_parallel = "all_gather"
    assert kernels() == ["splash", "splash"]
    config.mesh.context, config.model.context_parallel = 1, "none"
    flops, seconds = aot_cost.splash_cost_per_chip(config, device, 4)
    tiles = 1024 * 1024 + 1024 * 128  # 56 text tokens padded to one 128-lane tile.
    assert flops == pytest.approx(32 * 4 * 9 * 2 * tiles * 128 / 4)
    # Heads of 32 run on v5e's 128-wide MXU as heads of 128 would: 4x the time of the FLOPs.
    assert seconds == pytest.approx(4 * flops / hardware.CHIPS["TPU v5 lite"].bf16_peak_flops)
    config.model.attention = "xla"
    assert kernels() == ["xla", "xla"]


def test_splash_matmul_count_matches_the_kernel():
    # The interpret-mode lowering runs the kernels' own code as XLA ops, one loop iteration per
    # grid point. One tile and two heads: each kernel's body is one head's work, and XLA's cost
    # analysis counts a loop body once, so the FLOPs are one head's matmuls. (With one head the
    # loops vanish and XLA merges the QK^T that the dq and dkv kernels each recompute, which
    # the TPU, running them as two Mosaic calls, cannot.)
    n, head_dim = 128, 128
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((1, n, 2, head_dim)), jnp.float32)
               for _ in range(3))

    def loss(q, k, v):
        return jnp.sum(dot_product_attention(q, k, v, implementation="splash") ** 2)

    cost = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    matmuls = cost["flops"] / (2 * n * n * head_dim)
    expected = aot_cost.SPLASH_FORWARD_MATMULS + aot_cost.SPLASH_BACKWARD_MATMULS
    assert expected <= matmuls <= 1.03 * expected  # Plus the softmax's element-wise FLOPs.


def test_splash_flops_of_the_1024px_stage():
    # LI-DiT-10B at 1024 px: 4096 image tokens, full remat (forward twice), on 512 chips.
    config = lidit_10b.get_config("1024")
    assert config.model.remat == "full"
    device = aot_compile.topology_devices("v5p:2x2x1")[0]
    per_example = 48 * (2 * 2 + 7) * 2 * 4096**2 * 2816  # Text (512 tokens) stays XLA.
    flops, seconds = aot_cost.splash_cost_per_chip(config, device, 512)
    assert flops == pytest.approx(config.train.batch_size * per_example / 512)
    assert seconds == pytest.approx(2 * flops / 459e12)  # 44 heads of 64 on 128-wide MXUs.


def test_online_text_path_counts_the_frozen_llm_in_the_step(report, capsys):
    """text.cache_dir="": SmolLM2 runs inside the compiled step; the report prints its FLOPs and
    memory before the last line, and est. MFU is for the whole step."""
    config = aot_demo_config()
    config.text.cache_dir = ""
    devices = aot_compile.topology_devices(config.aot.topology)
    compiled, state = aot_compile.compile_train_step(config, devices)
    twins = set(aot_cost._TWIN_COSTS)
    online = aot.step_report(config, devices, compiled, state)
    assert set(aot_cost._TWIN_COSTS) == twins  # The DiT's twins: the cached report's, reused.
    aot.print_report(config, online)
    lines = capsys.readouterr().out.strip().splitlines()
    match = re.fullmatch(r"encoder_flops_per_chip=(\S+) encoder_hbm_gib=(\S+)", lines[-2])
    assert match and lines[-1].startswith("fits=True hbm_per_chip_gib=")
    flops, hbm_gib = float(match[1]), float(match[2])

    # Layer -3 of SmolLM2's 30: 28 blocks over 32 captions of 56 tokens, less the 25 of the
    # instruction that run once (cached keys and values), forward only.
    e, kv, f, layers = 576, 3 * 64, 1536, 28
    matmul_params = 2 * e * e + 2 * e * kv + 3 * e * f
    tokens = config.train.batch_size * (config.text.max_length - 25)
    attention = 4 * config.text.max_length * tokens * e  # Each attends to the prefix's keys.
    expected = layers * (2 * matmul_params * tokens + attention) / len(devices)
    assert flops == pytest.approx(expected, rel=0.1)
    # The count the trainer's logged MFU uses (in_step.encoder_flops) is that arithmetic.
    assert online["encoder_model_flops"] == pytest.approx(expected, rel=1e-9)
    # Its float32 weights (28 blocks and the embedding table) sharded over the 4 chips, at least.
    weights = (layers * (matmul_params + 2 * e) + 49152 * e) * 4 / len(devices)
    assert weights / 2**30 <= hbm_gib
    _, cached, cached_report = report
    assert online["per_chip_bytes"] >= cached_report["per_chip_bytes"] + 0.9 * weights
    step_flops = online["model_flops"] + online["encoder_flops"]
    assert online["est_mfu"] == pytest.approx(
        step_flops / (online["seconds"] * online["peak_flops"]), rel=1e-6)
    assert online["seconds"] > cached_report["seconds"]


def test_paper_llms_are_counted_from_their_shipped_architecture():
    """lidit_1b's LLMs have no path until launch: `architecture` gives the compile report their
    shapes. Llama 3 8B at layer -3 runs 30 blocks: the report's FLOPs are that arithmetic."""
    config = aot_demo_config()
    config.text.llms.llama3 = common.llm_config("", layer=-3, architecture="llama3-8b")
    config.text.encoders, config.text.cache_dir = "llama3", ""
    configuration.validate(config)
    assert configuration.llm_widths_from_config(config) == [4096]
    devices = aot_compile.topology_devices(config.aot.topology)
    encoders = aot_cost.encoder_report(config, devices)
    e, kv, f = 4096, 8 * 128, 14336
    matmul_params = 2 * e * e + 2 * e * kv + 3 * e * f
    tokens = config.train.batch_size * config.text.max_length
    attention = 4 * config.text.max_length * tokens * e
    assert encoders["flops"] == pytest.approx(30 * (2 * matmul_params * tokens + attention)
                                              / len(devices), rel=0.05)
    # bf16 weights of 30 blocks plus the embedding table (no LM head), over fsdp 2.
    weights = (30 * (matmul_params + 2 * e) + 128256 * e) * 2 / 2
    assert encoders["hbm_bytes"] >= 0.95 * weights
    config.text.llms.llama3.architecture = "llama3-70b"
    with pytest.raises(configuration.ConfigError, match="architecture='llama3-70b' is not shipped"):
        configuration.validate(config)
