"""The --mode=compile report for a TPU v5e 2x2 slice (libtpu on this CPU host, no TPU)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo_shapes, lidit_10b
from lidit_jax import aot
from lidit_jax.nn.attention import dot_product_attention

# Three TPU compiles of the demo step (scanned, and the depth-1 and depth-2 twins): ~1 min on 2
# idle cores, 21 min on 2 cores shared by six sessions.
pytestmark = pytest.mark.slow


def small_config():
    # The demo (depth 4, width 128, 256 image tokens, 128 text tokens, batch 32 = 8 per chip).
    # With 2 examples per chip and 32 text tokens the compiler counts 12 % more than the model:
    # per-parameter optimizer work and element-wise ops stop being negligible.
    c = demo_shapes.get_config()
    c.text.llms.smollm2.width = 576
    c.mesh.data, c.mesh.fsdp = 2, 2
    c.aot.topology = "v5e:2x2"
    assert c.model.scan_layers and c.text.cache_dir  # Scanned; resident encoders: none.
    return c


@pytest.fixture(scope="module")
def report():
    config = small_config()
    devices = aot.topology_devices(config.aot.topology)
    compiled, state = aot.compile_train_step(config, devices)
    return config, compiled, aot.step_report(config, devices, compiled, state)


def test_scanned_step_flops_count_every_layer(report):
    config, compiled, result = report
    scanned_flops, _ = aot._cost(compiled)
    # XLA alone counts the scanned body once; the loop-counted figure matches the model count.
    assert scanned_flops < 0.9 * result["model_flops"]
    assert abs(result["flops_ratio"] - 1) <= aot.FLOPS_TOLERANCE, result
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
    config = small_config()
    device = aot.topology_devices(config.aot.topology)[0]
    config.model.attention = "auto"
    kernels = lambda: [k for k, _, _ in aot.dit_attention_kernels(config, device)]  # noqa: E731
    assert kernels() == ["xla", "xla"]  # 256 image tokens
    assert aot.splash_cost_per_chip(config, device, 4) == (0, 0)
    config.data.image_size, config.vae.downsample, config.model.patch_size = 512, 8, 2
    assert kernels() == ["splash", "xla"]
    config.model.attention = "splash"  # Forced: the cross-attention's tiles count too.
    (_, q, kv), (_, q2, kv2) = aot.dit_attention_kernels(config, device)
    assert (q, kv, q2, kv2) == (1024, 1024, 1024, 56)
    flops, seconds = aot.splash_cost_per_chip(config, device, 4)
    tiles = 1024 * 1024 + 1024 * 128  # 56 text tokens padded to one 128-lane tile.
    assert flops == pytest.approx(32 * 4 * 9 * 2 * tiles * 128 / 4)
    # Heads of 32 run on v5e's 128-wide MXU as heads of 128 would: 4x the time of the FLOPs.
    assert seconds == pytest.approx(4 * flops / aot.BF16_PEAK_FLOPS_PER_CHIP["TPU v5 lite"])
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
    expected = aot.SPLASH_FORWARD_MATMULS + aot.SPLASH_BACKWARD_MATMULS
    assert expected <= matmuls <= 1.03 * expected  # Plus the softmax's element-wise FLOPs.


def test_splash_flops_of_the_1024px_stage():
    # LI-DiT-10B at 1024 px: 4096 image tokens, full remat (forward twice), on 512 chips.
    config = lidit_10b.get_config("1024")
    assert config.model.remat == "full"
    device = aot.topology_devices("v5p:2x2x1")[0]
    per_example = 48 * (2 * 2 + 7) * 2 * 4096**2 * 2816  # Text (512 tokens) stays XLA.
    flops, seconds = aot.splash_cost_per_chip(config, device, 512)
    assert flops == pytest.approx(config.train.batch_size * per_example / 512)
    assert seconds == pytest.approx(2 * flops / 459e12)  # 44 heads of 64 on 128-wide MXUs.
