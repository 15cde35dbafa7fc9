"""Each TPU generation's compiler flags compile the train step (libtpu on this CPU host)."""
import jax
import pytest

from lidit_jax import aot_compile, aot_cost
from lidit_jax.parallel import tpu_flags
from train_helpers import aot_demo_config

pytestmark = pytest.mark.usefixtures("tpu_compile_precision")


def test_no_tpu_flags_off_tpu():
    assert tpu_flags.compiler_options(jax.devices("cpu")[0]) is None


@pytest.mark.slow
@pytest.mark.parametrize("topology", ["v5p:2x2x1", "v6e:2x2"])  # v5e: test_aot; v4: v5p's set.
def test_generation_flags_compile_the_step(topology):
    # libtpu validates the flags as it compiles: all-gather continuation fusion (v5e's set) is
    # refused on v5p and v6e with FAILED_PRECONDITION, so a wrong preset fails here, not on a pod.
    config = aot_demo_config()
    devices = aot_compile.topology_devices(topology)
    options = tpu_flags.compiler_options(devices[0])
    assert options and options["xla_tpu_enable_async_collective_fusion"]
    compiled, _ = aot_compile.compile_train_step(config, devices)
    assert aot_cost.memory_report(compiled, devices[0].device_kind)["fits"]


@pytest.mark.slow
def test_the_table_reaches_the_compiler(monkeypatch):
    # v5e's all-gather continuation fusion in v5p's entry: the step's compile must refuse it,
    # which shows jit_train_step compiles with this table (what the trainer runs on a pod).
    v5e = tpu_flags.COMPILER_OPTIONS["TPU v5 lite"]
    monkeypatch.setitem(tpu_flags.COMPILER_OPTIONS, "TPU v5", v5e)
    devices = aot_compile.topology_devices("v5p:2x2x1")
    with pytest.raises(jax.errors.JaxRuntimeError, match="Continuation fusion for AllGather"):
        aot_compile.compile_train_step(aot_demo_config(), devices)
