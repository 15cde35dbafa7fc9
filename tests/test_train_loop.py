"""End to end through `python -m lidit_jax.main`: encode, train, kill -9 / SIGTERM, resume, sample.

Every run is a child process on one CPU device. The tiny runs use conftest's `tiny_llm` (a
random 2-layer Llama with SmolLM2's tokenizer) as the frozen text encoder, so encoding costs
milliseconds; one text cache (conftest's session-scoped `tiny_args`, absolute `text.cache_dir`)
serves all their workdirs. One test checks the demo config trained with the real SmolLM2 GGUF
(in CI, the run of scripts/demo.sh that .ci/run made just before).
"""
import glob
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from train_helpers import (ROOT, TIMEOUT, TRAIN, TRAIN_STEPS, child_env, command, read_events,
                           read_record_ids, restore_state, run_main, start_main, start_pair,
                           wait_for_step)

pytestmark = pytest.mark.slow

STEPS = TRAIN_STEPS


@pytest.fixture(scope="module")
def run_a(tiny_args, tmp_path_factory):
    """Workdir of an uninterrupted tiny run of STEPS steps."""
    workdir = tmp_path_factory.mktemp("run_a")
    run_main(workdir, "train", *tiny_args, *TRAIN, "--config.logging.profile_start=1",
             "--config.logging.profile_steps=1")
    return str(workdir)


def test_profile_window_writes_a_trace(run_a):
    assert glob.glob(os.path.join(run_a, "profile", "**", "*.xplane.pb"), recursive=True)


def test_kill_9_and_restart_matches_an_uninterrupted_run(run_a, tiny_args, tmp_path):
    workdir = str(tmp_path / "run_b")
    kill_after = random.Random(0).randint(3, 6)
    process = start_main(workdir, "train", *tiny_args, *TRAIN)
    wait_for_step(process, workdir, kill_after)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    killed_at = read_record_ids(workdir)[-1][0]
    assert killed_at < STEPS, "the run finished before the kill; the test proves nothing"

    result = run_main(workdir, "train", *tiny_args, *TRAIN)
    resumed = re.search(r"resumed from step (\d+)", result.stderr)
    assert resumed, "the restarted run started from scratch:\n" + result.stderr[-3000:]
    assert 2 <= int(resumed.group(1)) <= killed_at

    # Steps re-run after the restart log again; the later line is what the final state saw.
    seen_b = dict(read_record_ids(workdir))
    seen_a = dict(read_record_ids(run_a))
    assert sorted(seen_a) == list(range(1, STEPS + 1))
    assert seen_b == seen_a

    state_a, state_b = restore_state(run_a, STEPS), restore_state(workdir, STEPS)
    assert list(state_b) == list(state_a) and len(state_a) > 10
    for path, leaf in state_a.items():
        np.testing.assert_array_equal(state_b[path], leaf, err_msg=path)


def test_sigterm_saves_the_current_step_and_exits_0(tiny_args, tmp_path):
    workdir = str(tmp_path / "run")
    process = start_main(workdir, "train", *tiny_args, "--config.train.steps=1000",
                         "--config.checkpoint.every=1000", "--config.train.log_every=1",
                         "--config.train.sample_every=1000", "--config.logging.record_ids=True")
    wait_for_step(process, workdir, 2)
    os.kill(process.pid, signal.SIGTERM)
    assert process.wait(timeout=TIMEOUT) == 0
    last_step = read_record_ids(workdir)[-1][0]
    assert 2 <= last_step < 1000
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    assert list(manager.all_steps()) == [last_step]
    manager.close()
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        logged = [json.loads(line)["step"] for line in f]
    assert logged == list(range(1, last_step + 1))


def test_sample_mode_writes_one_png_per_prompt(run_a, tiny_args, tmp_path):
    output = tmp_path / "samples"
    result = run_main(run_a, "sample", *tiny_args, "--prompts=a red circle",
                      "--prompts=a blue square", f"--output={output}")
    assert f"samples=2 output={output}" in result.stdout
    pngs = sorted(glob.glob(str(output / "*.png")))
    assert len(pngs) == 2
    for png in pngs:
        with Image.open(png) as image:
            assert image.size == (32, 32) and image.mode == "RGB"


def test_sample_flags_size_sampler_and_seed(run_a, tiny_args, tmp_path):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("a red circle on the left\n\na blue square\n")  # Blank lines skipped.
    flags = (f"--prompt_file={prompt_file}", "--size=32x64", "--sampler=heun",
             "--sample_steps=2", "--guidance_scale=2", "--seed=3", "--num_per_prompt=2")
    images = []
    for name in ("first", "again"):
        output = tmp_path / name
        result = run_main(run_a, "sample", *tiny_args, *flags, f"--output={output}")
        assert f"samples=4 output={output}" in result.stdout
        pngs = sorted(glob.glob(str(output / "*.png")))
        assert len(pngs) == 4
        images.append([np.asarray(Image.open(png)) for png in pngs])
    assert all(image.shape == (32, 64, 3) for image in images[0])
    # Same seed, same images; the two images of one prompt get different noise.
    assert all(np.array_equal(a, b) for a, b in zip(*images))
    assert not np.array_equal(images[0][0], images[0][1])


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_non_finite_steps_never_reach_a_checkpoint(run_a, tiny_args, tmp_path, policy):
    # A learning rate of 1e30 keeps step 1 finite but makes its update overflow the next loss.
    workdir = tmp_path / policy
    result = run_main(workdir, "train", *tiny_args, "--config.train.steps=3",
                      "--config.checkpoint.every=1", "--config.train.learning_rate=1e30",
                      "--config.train.warmup_steps=0", f"--config.train.nan_policy={policy}",
                      check=policy == "skip")
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    saved_steps = list(manager.all_steps())
    manager.close()
    if policy == "stop":
        assert result.returncode != 0
        assert "non-finite loss or gradient at step 2" in result.stdout + result.stderr
        assert saved_steps == [1]
    else:
        assert saved_steps[-1] == 3
    state = restore_state(str(workdir), saved_steps[-1])
    assert all(np.isfinite(leaf).all() for leaf in state.values() if leaf.dtype.kind == "f")
    skipped = next(leaf for path, leaf in state.items() if "skipped_steps" in path)
    assert int(skipped) == (0 if policy == "stop" else 2)


def test_resume_with_another_text_encoder_is_refused(run_a, tiny_args, tmp_path):
    workdir = tmp_path / "other_layer"
    shutil.copytree(os.path.join(run_a, "checkpoints"), workdir / "checkpoints")
    # Online text encoding (no cache), so the checkpoint's fingerprint check is what refuses.
    result = run_main(workdir, "train", *tiny_args, f"--config.train.steps={STEPS + 2}",
                      "--config.text.cache_dir=", "--config.text.llms.smollm2.layer=-2",
                      check=False)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "different frozen encoders" in output
    assert '"layer": -3' in output and '"layer": -2' in output
    assert not os.path.exists(workdir / "checkpoints" / str(STEPS + 2))


def test_demo_config_trains_logs_and_samples(tmp_path):
    """configs/demo_shapes.py as shipped (real SmolLM2 GGUF): text cache, metrics, TensorBoard
    scalars and images, the sample grid. CI (.ci/run) has just run the demo itself, as a new user
    does, and names its workdir in LIDIT_DEMO_WORKDIR: that run is checked, so CI trains the demo
    once. Elsewhere the test runs it with a small data set and 2 steps."""
    workdir = os.environ.get("LIDIT_DEMO_WORKDIR")
    if workdir:
        workdir = Path(workdir)
    else:
        workdir = tmp_path / "demo"
        args = ("--config=configs/demo_shapes.py", "--config.data.shapes_num_records=64",
                "--config.train.steps=2", "--config.train.sample_every=2",
                "--config.train.log_every=1", "--config.checkpoint.every=2",
                "--config.train.samples_per_prompt=1", "--config.logging.progress_bar=False")
        run_main(workdir, "encode", *args)
        run_main(workdir, "train", *args)
    with open(workdir / "config.json") as f:
        config = json.load(f)  # What this run was told: steps, log_every, ...
    train = config["train"]
    assert os.path.exists(workdir / "text_cache" / "smollm2")

    events = glob.glob(str(workdir / "tensorboard" / "events.out.tfevents.*"))
    tags = {(value.tag, value.HasField("image")) for event in read_events(events[0])
            for value in event.summary.value}
    assert ("loss", False) in tags and ("samples", True) in tags, tags
    with open(workdir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    steps = train["steps"]
    assert [r["step"] for r in records] == [
        s for s in range(1, steps + 1) if s % train["log_every"] == 0 or s == steps]
    for record in records:
        assert math.isfinite(record["loss"]) and record["images_per_sec"] > 0

    pngs = glob.glob(str(workdir / "samples" / "*.png"))
    assert [os.path.basename(p) for p in pngs] == [f"step_{steps:07d}.png"]
    # The grid: samples_per_prompt * 2 columns of the fixed prompts, each cell upscaled 4x.
    columns = train["samples_per_prompt"] * 2
    rows = math.ceil(len(train["sample_prompts"]) * train["samples_per_prompt"] / columns)
    cell = config["data"]["image_size"] * 4
    with Image.open(pngs[0]) as image:
        assert image.size == (columns * cell, rows * cell) and image.mode == "RGB"
        assert np.asarray(image).std() > 0


@pytest.mark.multiprocess
def test_two_processes_train_like_one(run_a, tiny_args, tmp_path):
    """Two local JAX processes (2 CPU devices each, FSDP across them) train the tiny run: the
    same global batches (record ids) and, to fp32 tolerance, the same parameters as one process
    on one device; the checkpoint they write together restores in a single process."""
    workdir = str(tmp_path / "two")
    processes = start_pair(workdir, tiny_args, devices_per_process=2)
    for index, process in enumerate(processes):
        try:
            code = process.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            code = "timeout"
        if code != 0:
            with open(f"{workdir}.{index}.log", errors="replace") as f:
                pytest.fail(f"process {index} exited {code}:\n{f.read()[-6000:]}")

    assert dict(read_record_ids(workdir)) == dict(read_record_ids(run_a))
    state_a, state_two = restore_state(run_a, STEPS), restore_state(workdir, STEPS)
    assert list(state_two) == list(state_a)
    for path, leaf in state_a.items():
        # Sums over 4 devices round differently from one; 8 Adam steps keep that near fp32 eps.
        np.testing.assert_allclose(state_two[path], leaf, rtol=1e-4, atol=1e-5, err_msg=path)


def test_export_writes_the_ema_weights_and_loads_back(run_a, tiny_args, tmp_path):
    import ml_collections
    from flax import nnx
    from safetensors.numpy import load_file

    from lidit_jax.diffusion.dit import LIDiT
    from lidit_jax.train.ema_safetensors import load_exported

    output = tmp_path / "ema.safetensors"
    result = run_main(run_a, "export", *tiny_args, f"--output={output}")
    match = re.search(rf"export={re.escape(str(output))} params=(\d+)", result.stdout)
    assert match, result.stdout
    exported = load_file(str(output))
    assert int(match.group(1)) == sum(t.size for t in exported.values())
    # restore_state's names look like "['ema_params']['backbone']...['kernel']['value']".
    ema = {}
    for path, leaf in restore_state(run_a, STEPS).items():
        keys = re.findall(r"\['?([^'\]]+)'?\]", path)
        if keys[0] == "ema_params":
            ema[".".join(keys[1:-1])] = leaf
    assert sorted(exported) == sorted(ema) and len(ema) > 10
    for name, tensor in exported.items():
        np.testing.assert_array_equal(tensor, ema[name], err_msg=name)

    # Back into a model built from the run's config.json: the same weights, and the metadata.
    with open(os.path.join(run_a, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    model = LIDiT(config, [32], 3, rngs=nnx.Rngs(1))  # tiny_llm's width 32.
    metadata = load_exported(str(output), model)
    assert int(metadata["step"]) == STEPS and "smollm2" in json.loads(metadata["fingerprints"])
    _, params = nnx.split(model, nnx.Param)
    for key_path, variable in nnx.to_flat_state(params):
        name = ".".join(str(k) for k in key_path)
        np.testing.assert_array_equal(np.asarray(variable.get_value()), exported[name], name)
    config.model.depth = 2  # Another architecture: refused, naming what does not fit.
    with pytest.raises(ValueError, match="shape"):
        load_exported(str(output), LIDiT(config, [32], 3, rngs=nnx.Rngs(1)))


def _config_from(args):
    """The config `python -m lidit_jax.main` builds from these `--config...` arguments."""
    import ast
    import functools

    from configs import demo_shapes

    assert args[0] == "--config=configs/demo_shapes.py", args[0]
    config = demo_shapes.get_config()
    for arg in args[1:]:
        key, value = arg[len("--config."):].split("=", 1)
        *parents, name = key.split(".")
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass  # A string.
        setattr(functools.reduce(getattr, parents, config), name, value)
    return config


def test_host_loop_keeps_the_device_busy_through_log_steps(tiny_args, tmp_path, monkeypatch):
    """A slow device (~0.3 s of matmuls before every step): at every dispatch the previous step
    is still running, so the device's queue never drains, log steps included, and the batch is on
    the devices already, so the step never waits for its data; batches are read off the loop's
    thread."""
    import threading

    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from lidit_jax.data import pipeline
    from lidit_jax.train import loop
    from lidit_jax.train import program as program_lib

    config = _config_from(tiny_args)  # In this process: conftest's 8 CPU devices.
    config.train.steps, config.train.log_every = 12, 2
    config.checkpoint.every = config.train.sample_every = 1000  # Both only at the end: they sync.
    config.logging.tensorboard = False

    @jax.jit
    def busy(step, iterations):  # Device work the train step waits for; the same step out.
        x = jnp.full((256, 256), 1e-3) + step.astype(jnp.float32)
        x = jax.lax.fori_loop(0, iterations, lambda _, x: jnp.tanh(x @ x), x)
        return step + (0 * x[0, 0]).astype(step.dtype)

    # Timed here, as the loop runs it (replicated on every device), for ~0.3 s a step.
    step = jax.device_put(jnp.int32(0), NamedSharding(Mesh(np.array(jax.devices()), ("d",)),
                                                      PartitionSpec()))
    busy(step, 8).block_until_ready()
    start = time.perf_counter()
    busy(step, 8).block_until_ready()
    iterations = max(8, round(8 * 0.3 / (time.perf_counter() - start)))

    read_batch = pipeline.TrainIterator.__next__
    read_in_loop_thread = []

    def slow_read(self):
        read_in_loop_thread.append(threading.current_thread() is threading.main_thread())
        time.sleep(0.02)
        return read_batch(self)

    dispatches = []  # (previous step still running?, batch on the devices?) at each dispatch
    jit_train_step = program_lib.jit_train_step

    def slow_jit_train_step(*args, **kwargs):
        train_step = jit_train_step(*args, **kwargs)

        def slow_step(state, batch):
            dispatches.append((not state.step.is_ready(),
                               all(x.is_ready() for x in jax.tree.leaves(batch))))
            return train_step(state.replace(step=busy(state.step, iterations)), batch)
        return slow_step

    monkeypatch.setattr(pipeline.TrainIterator, "__next__", slow_read)
    monkeypatch.setattr(program_lib, "jit_train_step", slow_jit_train_step)
    sigterm = signal.getsignal(signal.SIGTERM)  # The loop installs its own handler.
    try:
        loop.run(config, str(tmp_path))
    finally:
        signal.signal(signal.SIGTERM, sigterm)

    assert len(dispatches) == 12
    # From step 3 on (steps 1 and 2 compile). A device_get at each log step made the step after
    # it find its predecessor finished.
    assert all(running for running, _ in dispatches[2:]), dispatches
    assert all(on_devices for _, on_devices in dispatches), dispatches
    assert read_in_loop_thread and not any(read_in_loop_thread)
    with open(tmp_path / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == list(range(2, 13, 2))


def _compiled_keys(stderr):
    """Persistent-cache keys of the programs a run compiled (JAX_EXPLAIN_CACHE_MISSES)."""
    return re.findall(r"PERSISTENT COMPILATION CACHE MISS for '([^']+)' with key '([^']+)'",
                      stderr)


def test_a_restart_compiles_nothing_its_first_start_compiled(tiny_args, tmp_path):
    workdir = tmp_path / "run"
    # Its own compilation cache (the session's shared one may hold these programs already).
    args = (*tiny_args, "--config.checkpoint.every=2", "--config.train.sample_every=1000",
            "--config.train.compilation_cache_dir=compile_cache")
    explain = dict(child_env(), JAX_EXPLAIN_CACHE_MISSES="1")
    runs = []
    for steps in (2, 3):  # The restart resumes from step 2: the train step, sampler, ... again.
        result = subprocess.run(command(workdir, "train", *args, f"--config.train.steps={steps}"),
                                cwd=ROOT, env=explain, capture_output=True, text=True,
                                timeout=TIMEOUT)
        assert result.returncode == 0, result.stderr[-6000:]
        runs.append(set(_compiled_keys(result.stderr)))
    first, restart = runs
    assert any(name == "jit_step" for name, _ in first), sorted(first)  # The train step.
    assert len(os.listdir(workdir / "compile_cache")) >= len(first)
    # The restart compiled only programs the first start never met (the restore's, ...).
    assert not first & restart, sorted(first & restart)
    assert not any(name == "jit_step" for name, _ in restart), sorted(restart)
