"""Shared pieces for the training tests: a tiny config, random text states, meshes, and
`python -m lidit_jax.main` run as a child process (the tiny CLI config, logs, checkpoints)."""
import json
import os
import socket
import struct
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from configs import common, demo_shapes
from cpu_flags import xla_flags
from lidit_jax.parallel import mesh as mesh_lib
from lidit_jax.parallel import sharding
from lidit_jax.train import program as program_lib

LLM_WIDTH = 24
TEXT_LEN = 8


def tiny_config(**train):
    config = common.get_config()
    config.model.depth, config.model.width, config.model.heads = 2, 32, 2
    config.model.dtype = "float32"
    config.text.max_length = TEXT_LEN
    config.text.refiner.depth, config.text.refiner.heads = 1, 2
    config.text.collaborative.heads = 2
    config.data.image_size = 8
    config.diffusion.objective = "flow"
    config.train.batch_size = 32
    config.train.warmup_steps = 0
    config.train.learning_rate = 1e-3
    config.train.ema_decay = 0.9
    config.mesh.replicated_min_size = 1 << 40
    for key, value in train.items():
        config.train[key] = value
    return config


def random_batch(seed, batch=32, size=8):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, TEXT_LEN + 1, size=batch)
    mask = np.arange(TEXT_LEN)[None] < lengths[:, None]
    prompt_mask = mask & (np.arange(TEXT_LEN)[None] >= 1)
    return {
        "x0": jnp.asarray(rng.uniform(-1, 1, (batch, size, size, 3)), jnp.float32),
        "text": [{"states": jnp.asarray(rng.normal(size=(batch, TEXT_LEN, LLM_WIDTH)),
                                        jnp.bfloat16),
                  "mask": jnp.asarray(mask), "prompt_mask": jnp.asarray(prompt_mask)}],
    }


def make_mesh(data, fsdp, tensor, context=1):
    devices = jax.devices()[: data * fsdp * context * tensor]
    return jax.sharding.Mesh(np.array(devices).reshape(data, fsdp, context, tensor),
                             mesh_lib.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)


def batch_shardings(batch, mesh, rules):
    spec = sharding.logical_to_mesh_spec(("batch",), rules)
    return jax.tree.map(lambda x: NamedSharding(mesh, PartitionSpec(*spec, *([None] * (x.ndim - 1)))), batch)


def jitted_step_and_state(config, mesh, batch):
    """(the jitted train step for batches shaped like `batch`, a fresh sharded train state)."""
    program = program_lib.build(config, mesh, [LLM_WIDTH], 3, batch["x0"].shape[1:3],
                                batch_shardings(batch, mesh, config.mesh.rules))
    return program.step, program.init_state()


def train(config, mesh, batches):
    step, state = jitted_step_and_state(config, mesh, batches[0])
    losses = []
    with jax.set_mesh(mesh), sharding.axis_rules(config.mesh.rules):
        for batch in batches:
            batch = jax.device_put(batch, batch_shardings(batch, mesh, config.mesh.rules))
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
    return state, losses, metrics


def aot_demo_config():
    # The demo (depth 4, width 128, 256 image tokens, 128 text tokens, batch 32 = 8 per chip).
    # With 2 examples per chip and 32 text tokens the compiler counts 12 % more than the model:
    # per-parameter optimizer work and element-wise ops stop being negligible.
    c = demo_shapes.get_config()
    c.text.llms.smollm2.width = 576
    c.mesh.data, c.mesh.fsdp = 2, 2
    c.aot.topology = "v5e:2x2"
    assert c.model.scan_layers and c.text.cache_dir  # Scanned; resident encoders: none.
    return c


# ---- DiT-level pieces (test_dit, test_positions) ----
# Jitted calls: one compile instead of op-by-op dispatch keeps these tests fast on CPU.
apply = nnx.jit(lambda module, *args: module(*args))


def dit_config(**model):
    """common's config with a 2-block, width-64 float32 DiT (model overrides on top)."""
    c = common.get_config()
    c.model.depth, c.model.width, c.model.heads = 2, 64, 4
    c.model.dtype = "float32"
    c.model.update(model)
    return c


def randomize(module, seed, scale=0.05):
    """Perturbs every parameter (zero-initialised gates included) so outputs are non-trivial.

    Host-side numpy noise: no per-shape compiles, which would dominate these small tests.
    """
    rng = np.random.default_rng(seed)
    state = nnx.state(module, nnx.Param)
    nnx.update(module, jax.tree.map(
        lambda x: x + scale * rng.standard_normal(x.shape).astype(x.dtype), state))
    return module


def normal(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def backbone_inputs(batch, hw, channels, seed, width=64, text_len=5):
    """x [batch, H, W, channels], c [batch, width], text tokens and a mask with padding."""
    rng = np.random.default_rng(seed)
    x, c = normal(rng, batch, *hw, channels), normal(rng, batch, width)
    context = normal(rng, batch, text_len, width)
    mask = jnp.arange(text_len)[None, :] < jnp.array([text_len, 2, 3, 1][:batch])[:, None]
    return x, c, context, mask


# ---- `python -m lidit_jax.main` as a child process (test_train_loop, test_distributed,
# test_preemption, test_gcs, test_text_encoders_e2e) ----
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 600  # Seconds for one child; the machine is shared, so generous.
TINY = (
    "--config=configs/demo_shapes.py",
    "--config.model.depth=1", "--config.model.width=32", "--config.model.heads=2",
    "--config.model.patch_size=8",  # The shapes data has at least 32 px: a 4 x 4 token grid.
    "--config.text.refiner.depth=1", "--config.text.refiner.heads=2",
    "--config.text.max_length=48", "--config.data.image_size=32",
    "--config.data.shapes_num_records=64", "--config.train.batch_size=8",
    "--config.diffusion.sample_steps=2", "--config.train.samples_per_prompt=1",
    "--config.logging.progress_bar=False",
)
TRAIN_STEPS = 8
TRAIN = (f"--config.train.steps={TRAIN_STEPS}", "--config.checkpoint.every=2",
         "--config.logging.record_ids=True", "--config.train.sample_every=1000")


def child_env(libtpu=False):
    """A child's environment as a user's CPU run sees it: one CPU device (not conftest's eight,
    and quicker), and no torch, diffusers or accelerate, which `pip install -e .` does not install
    (tests/without_torch/sitecustomize.py). `libtpu`: for a child that compiles for a TPU
    topology (cpu_flags.py)."""
    python_path = os.pathsep.join(filter(None, (os.path.join(ROOT, "tests", "without_torch"),
                                                os.environ.get("PYTHONPATH"))))
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1, libtpu),
                PYTHONPATH=python_path, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def command(workdir, mode, *args):
    return [sys.executable, "-m", "lidit_jax.main", f"--workdir={workdir}", f"--mode={mode}",
            *args]


def run_main(workdir, mode, *args, check=True):
    result = subprocess.run(command(workdir, mode, *args), cwd=ROOT, env=child_env(),
                            capture_output=True, text=True, timeout=TIMEOUT)
    if check:
        assert result.returncode == 0, (
            f"--mode={mode} exited {result.returncode}:\n{result.stdout[-3000:]}\n"
            f"{result.stderr[-6000:]}")
    return result


def start_main(workdir, mode, *args):
    """A child in the background; its output goes to WORKDIR.log (a pipe could fill and block)."""
    os.makedirs(workdir, exist_ok=True)
    log = open(f"{workdir}.log", "ab")
    process = subprocess.Popen(command(workdir, mode, *args), cwd=ROOT, env=child_env(),
                               stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return process


def read_record_ids(workdir):
    """[(step, record ids)] in the order record_ids.jsonl was written."""
    path = os.path.join(workdir, "record_ids.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [json.loads(line) for line in f if line.endswith("\n")]
    return [(line["step"], line["record_ids"]) for line in lines]


def wait_for_step(process, workdir, step, timeout=TIMEOUT):
    """Polls record_ids.jsonl until it logs `step` or later; returns the last logged step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        logged = read_record_ids(workdir)
        if logged and logged[-1][0] >= step:
            return logged[-1][0]
        if process.poll() is not None:
            with open(f"{workdir}.log", errors="replace") as f:
                pytest.fail(f"the run exited ({process.returncode}) before step {step}:\n"
                            f"{f.read()[-6000:]}")
        time.sleep(0.05)
    process.kill()
    pytest.fail(f"no step {step} in {workdir}/record_ids.jsonl after {timeout} s")


def restore_state(workdir, step):
    """The train state saved at `step`, as {key path: numpy array}, onto this process's first
    device whatever the devices and processes that saved it."""
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                    item_handlers={"state": ocp.StandardCheckpointHandler()})
    try:
        assert step in manager.all_steps(), (workdir, manager.all_steps())
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                              manager.item_metadata(step)["state"])
        state = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target)))["state"]
    finally:
        manager.close()
    return {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(state)}


def read_events(path):
    """The Event protos of a TensorBoard event file (TFRecord framing: length, crc, data, crc)."""
    from tensorboardX.proto import event_pb2
    with open(path, "rb") as f:
        data = f.read()
    events, offset = [], 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset:offset + 8])
        events.append(event_pb2.Event.FromString(data[offset + 12:offset + 12 + length]))
        offset += 12 + length + 4
    return events


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_pair(workdir, tiny_args, *extra, devices_per_process=4):
    """Two `--mode=train` processes of one run (data 2 x FSDP over each process's devices),
    logs in WORKDIR.<i>.log."""
    os.makedirs(workdir, exist_ok=True)
    port = free_port()
    processes = []
    for index in range(2):
        env = dict(child_env(),
                   XLA_FLAGS=xla_flags(devices_per_process),
                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(index), JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
        with open(f"{workdir}.{index}.log", "wb") as log:
            processes.append(subprocess.Popen(
                command(workdir, "train", *tiny_args, *TRAIN, "--config.mesh.data=2",
                        f"--config.mesh.fsdp={devices_per_process}", *extra),
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    return processes


def pair_log(workdir, index):
    with open(f"{workdir}.{index}.log", errors="replace") as f:
        return f.read()
