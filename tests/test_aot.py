"""The --mode=compile report for a TPU v5e 2x2 slice (libtpu on this CPU host, no TPU)."""
import pytest

from configs import demo_shapes
from lidit_jax import aot

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


def test_self_attention_kernel_follows_auto_on_the_topology():
    # On the v5e devices libtpu describes, `auto` keeps XLA below 1024 image tokens and picks
    # splash from 1024 (512 px with an 8x VAE and patch 2), the kernel the cost model cannot see.
    config = small_config()
    device = aot.topology_devices(config.aot.topology)[0]
    config.model.attention = "auto"
    assert aot.self_attention_kernel(config, device) == "xla"  # 256 tokens
    config.data.image_size, config.vae.downsample, config.model.patch_size = 512, 8, 2
    assert aot.self_attention_kernel(config, device) == "splash"
    config.model.attention = "xla"
    assert aot.self_attention_kernel(config, device) == "xla"
