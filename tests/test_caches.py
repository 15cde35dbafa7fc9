"""Text-state and latent caches: what training reads from them equals online encoding; a cache
made with other settings is refused naming the field; --mode=encode fills both."""
import io
import logging
import re
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from configs import common
from lidit_jax import encode
from lidit_jax.data import array_cache, batch_plan, images, pipeline, records
from lidit_jax.diffusion import latent_cache
from lidit_jax.diffusion.vae import load_vae
from lidit_jax.text import cache as text_cache
from lidit_jax.text.encoder import PromptEncoder

NUM_CAPTIONS = 40
# Latent tests: two aspect-ratio buckets and records of three sizes; two unreadable images.
_SIZES = [(16, 32), (32, 16), (24, 20)]
_BAD = (5, 17)
NUM_IMAGES = 48


# ---- Text-state cache -------------------------------------------------------------------------
def _text_config(tiny_llm, cache_dir, **text):
    config = common.get_config()
    config.text.llms.smollm2.path, config.text.llms.smollm2.width = str(tiny_llm), 0
    config.text.max_length = 72  # The chat template and instruction take 56 tokens.
    config.text.cache_dir = str(cache_dir)
    config.text.update(text)
    config.data.shapes_num_records = NUM_CAPTIONS
    return config


@pytest.fixture(scope="module")
def text_cache_dir(tiny_llm, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("text")
    config = _text_config(tiny_llm, workdir / "cache")
    encoder = PromptEncoder("smollm2", config.text.llms.smollm2, config.text)
    source = pipeline.make_source(config.data)
    written = text_cache.write_text_cache(encoder, config, str(workdir), source.caption,
                                          NUM_CAPTIONS, batch_size=16)
    assert written == NUM_CAPTIONS
    return workdir / "cache"


def test_text_cache_round_trip_equals_online_encoding(tiny_llm, text_cache_dir):
    config = _text_config(tiny_llm, text_cache_dir)
    # Online as training and sampling encode: weights sharded over the 8 local devices (the
    # cache was written by an unsharded encoder).
    encoder = PromptEncoder.from_config(config, "smollm2")
    assert any(not leaf.sharding.is_fully_replicated
               for leaf in jax.tree.leaves(nnx.state(encoder.llm.model)))
    source = pipeline.make_source(config.data)
    reader = text_cache.CachedTextStates(
        str(text_cache_dir / "smollm2"), config.text.max_length,
        expected=text_cache.expected_metadata(encoder, config, NUM_CAPTIONS))
    rng = np.random.default_rng(0)
    ids = rng.permutation(NUM_CAPTIONS)[:12]
    use_empty = np.arange(12) % 5 == 0  # Dropped captions read the cached empty prompt.
    cached = reader.lookup(ids, use_empty)
    online = {k: np.asarray(v) for k, v in encoder.encode(
        ["" if empty else source.caption(int(i)) for i, empty in zip(ids, use_empty)]).items()}
    np.testing.assert_array_equal(cached["mask"], online["mask"])
    np.testing.assert_array_equal(cached["prompt_mask"], online["prompt_mask"])
    assert cached["prompt_mask"].any(axis=1)[~use_empty].all()
    mask = online["mask"]
    real_cached = cached["states"][mask].astype(np.float32)
    real_online = online["states"][mask].astype(np.float32)
    # Both are the same bf16 layer output; encoding batches of other sizes may move the float32
    # sums by an ulp, which can flip one bf16 rounding (2^-8 relative).
    np.testing.assert_allclose(real_cached, real_online, rtol=2 ** -7, atol=1e-3)
    assert np.abs(real_cached - real_online).mean() < 1e-4
    assert not cached["states"][~mask].any()  # Padding is zeros, never another row's tokens.
    # A record is the example's states and prompt mask cut to its real tokens (format 2).
    record = reader.cache[int(ids[1])]
    assert set(record) == {"states", "prompt_mask"} and record["prompt_mask"].dtype == bool
    np.testing.assert_array_equal(record["prompt_mask"], cached["prompt_mask"][1][mask[1]])
    # The cache was written from batches cropped to their bucket (the shared template prefix,
    # if any, plus the longest caption rounded up to 16, 32, ...).
    cropped = encoder.encode(["a red circle"], crop_padding=True)["states"]
    assert cropped.shape[1] == encoder.bucket(encoder.tokenize(["a red circle"]))
    assert cropped.shape[1] < config.text.max_length


@pytest.mark.parametrize("change,field", [
    (dict(layer=-2), "layer"),
    (dict(final_norm=True), "final_norm"),
    (dict(instruction="Describe the picture:"), "template"),
    (dict(max_length=64), "max_length"),
])
def test_text_cache_with_other_settings_is_refused(tiny_llm, text_cache_dir, change, field):
    llm_keys = {"layer", "final_norm"}
    config = _text_config(tiny_llm, text_cache_dir,
                          **{k: v for k, v in change.items() if k not in llm_keys})
    config.text.llms.smollm2.update({k: v for k, v in change.items() if k in llm_keys})
    encoder = PromptEncoder("smollm2", config.text.llms.smollm2, config.text)
    with pytest.raises(array_cache.CacheMismatch, match=rf"\b{field}: cache has"):
        text_cache.CachedTextStates(str(text_cache_dir / "smollm2"), config.text.max_length,
                                    expected=text_cache.expected_metadata(encoder, config,
                                                                          NUM_CAPTIONS))


def test_a_text_cache_of_format_1_is_refused(tiny_llm, tmp_path):
    """Format 1 (prompt spans, no "text_cache_format" in its metadata) is refused by the reader
    and by --mode=encode resuming it, naming the fix."""
    config = _text_config(tiny_llm, tmp_path / "cache")
    old = tmp_path / "cache" / "smollm2"
    record = {"states": np.zeros((3, 4), np.float32), "prompt_span": np.array([1, 3], np.int32)}
    for directory in (old, old / "empty"):
        array_cache.write_cache(str(directory), 1, lambda ids: [record], {})
    needle = r"format 1 \(1: prompt spans\), this version reads format 2.*run --mode=encode again"
    with pytest.raises(array_cache.CacheMismatch, match=needle):
        text_cache.CachedTextStates(str(old), config.text.max_length)
    encoder = PromptEncoder("smollm2", config.text.llms.smollm2, config.text)
    with pytest.raises(array_cache.CacheMismatch, match=needle):
        text_cache.write_text_cache(encoder, config, str(tmp_path), lambda i: "", 1)


@pytest.mark.parametrize("change,needle", [
    (dict(shuffle_seed=1), "shapes_seed"),  # Other generated records, so other captions.
    (dict(shapes_layout="grid"), "shapes_layout"),
    (dict(shapes_num_records=NUM_CAPTIONS + 8), "num_records"),
])
def test_text_cache_of_other_data_is_refused(tiny_llm, text_cache_dir, change, needle):
    config = _text_config(tiny_llm, text_cache_dir)
    config.data.update(change)
    encoder = PromptEncoder("smollm2", config.text.llms.smollm2, config.text)
    num_records = len(pipeline.make_source(config.data))  # As training counts them.
    with pytest.raises(array_cache.CacheMismatch, match=needle):
        text_cache.CachedTextStates(str(text_cache_dir / "smollm2"), config.text.max_length,
                                    expected=text_cache.expected_metadata(encoder, config,
                                                                          num_records))


# ---- Start-up from the text cache: no LLM weights read ------------------------------------------
def _tiny_run_config(tiny_llm, cache_dir):
    """The demo config, tiny (as tests/test_train_loop.py's runs), with evals and samples."""
    from configs import demo_shapes

    config = demo_shapes.get_config()
    config.text.llms.smollm2.path, config.text.llms.smollm2.width = str(tiny_llm), 0
    config.text.cache_dir = str(cache_dir)
    config.text.max_length = 48
    config.text.refiner.depth, config.text.refiner.heads = 1, 2
    config.model.depth, config.model.width, config.model.heads = 1, 32, 2
    config.model.patch_size = 8
    config.data.shapes_num_records = 64
    config.train.batch_size = 8
    config.train.steps = 2
    config.train.sample_every = 2
    config.train.samples_per_prompt = 1
    config.diffusion.sample_steps = 2
    config.eval.every = 2
    config.eval.num_prompts, config.eval.batch_size, config.eval.val_records = 4, 4, 4
    config.checkpoint.every = 2
    config.logging.progress_bar = False
    return config


@pytest.fixture(scope="module")
def encoded_run(tiny_llm, tmp_path_factory):
    """(config, workdir) whose text cache `--mode=encode` filled (in process)."""
    workdir = tmp_path_factory.mktemp("startup")
    config = _tiny_run_config(tiny_llm, workdir / "text_cache")
    encode.run(config, str(workdir))
    return config, workdir


@pytest.fixture
def weights_read(monkeypatch):
    """Counts the LLM weight tensors read (the loader's one reader of parameters)."""
    from lidit_jax.text import weights

    calls = []
    original = weights._read_parameter
    monkeypatch.setattr(weights, "_read_parameter",
                        lambda *args: calls.append(args[2]) or original(*args))
    return calls


@pytest.mark.slow
def test_training_from_the_text_cache_reads_no_llm_weights(encoded_run, monkeypatch, tmp_path):
    """Start-up (widths, fingerprints, the sampler's and evals' fixed prompts) and training
    take everything from the LLM's metadata and the text cache: its weights are never read."""
    from lidit_jax.text import weights
    from lidit_jax.train import loop

    config, workdir = encoded_run
    run = tmp_path / "run"  # The cache is an absolute path: shared with the encode workdir.

    def refuse(*args):
        raise AssertionError(f"LLM weights read during training: {args[2]}")
    monkeypatch.setattr(weights, "_read_parameter", refuse)
    loop.run(config, str(run))
    assert (run / "samples" / "step_0000002.png").exists()
    metrics = (run / "metrics.jsonl").read_text()
    assert "eval/prompt_accuracy" in metrics and "eval/val_loss" in metrics
    assert (run / "checkpoints" / "2").is_dir()


def test_fixed_prompts_come_from_the_cache_and_a_miss_loads_the_llm(encoded_run, weights_read,
                                                                     caplog):
    from lidit_jax.train import sampling
    from lidit_jax.train.inputs import TrainInputs
    from train_helpers import make_mesh

    config, workdir = encoded_run
    inputs = TrainInputs(config, str(workdir), make_mesh(1, 1, 1))
    prompts = [*config.train.sample_prompts, ""]
    assert prompts == sampling.fixed_prompts(config)
    cached = inputs.encode_prompts(prompts)
    assert not weights_read
    # What the LLM makes of the same prompts (bf16 states: one rounding apart at most).
    encoder = inputs.encoders[0]
    online = jax.device_get(encoder.encode(prompts))
    assert weights_read  # Now it had to load.
    np.testing.assert_array_equal(cached[0]["mask"], online["mask"])
    np.testing.assert_array_equal(cached[0]["prompt_mask"], online["prompt_mask"])
    mask = online["mask"]  # Padding: zeros in the cache, whatever the LLM made of pad tokens.
    np.testing.assert_allclose(cached[0]["states"][mask].astype(np.float32),
                               online["states"][mask].astype(np.float32), rtol=2 ** -7, atol=1e-3)
    inputs.release_encoders()
    weights_read.clear()

    # A prompt added after encoding: the LLM loads again and encodes it, and the log says so.
    caplog.set_level(logging.INFO)
    new = inputs.encode_prompts(["a small red circle in the middle", ""])
    assert weights_read and new[0]["states"].shape == cached[0]["states"][:2].shape
    assert re.search(r"1 of 2 fixed prompts .* not in the text cache .*/smollm2/prompts: the LLM "
                     r"encodes them instead, loading its weights; run --mode=encode again",
                     caplog.text)
    assert "loading the weights of llama:" in caplog.text
    inputs.close()


def test_encode_rewrites_the_fixed_prompts_when_they_changed(encoded_run, tmp_path):
    config, workdir = encoded_run
    other = tmp_path / "cache"
    shutil.copytree(workdir / "text_cache", other)
    config = config.copy_and_resolve_references()
    config.text.cache_dir = str(other)
    config.train.sample_prompts = ("a large red circle on the left",)
    encode.run(config, str(tmp_path))
    stored = array_cache.ArrayCache(other / "smollm2" / text_cache.PROMPTS_DIR)
    assert stored.metadata["prompts"] == encode.fixed_prompts(config)
    assert len(stored) == len(encode.fixed_prompts(config))


# ---- Latent cache -----------------------------------------------------------------------------
def _png(index):
    height, width = _SIZES[index % 3]
    pixels = np.random.default_rng(index).integers(0, 256, (height, width, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    data = buffer.getvalue()
    return data[:len(data) // 3] if index in _BAD else data  # Truncated: undecodable.


@pytest.fixture(scope="module")
def record_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("records"))
    records.write_records(out, NUM_IMAGES, lambda i: records.encode_record(_png(i), f"image {i}"),
                          records_per_shard=20)
    return out


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A random 4-channel diffusers VAE with 2x downsampling (two blocks)."""
    import diffusers
    import torch

    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4,
        scaling_factor=0.5, shift_factor=0.1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    folder = str(tmp_path_factory.mktemp("vae"))
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def _latent_config(record_dir, vae_dir, **data):
    config = common.get_config()
    config.data.update(dict(dict(source="arrayrecord", path=record_dir, image_size=16,
                                 buckets="16x32,32x16", caption_dropout=0.0), **data))
    config.vae.update(path=vae_dir, latent_channels=4, downsample=2, latent_cache_dir="latents")
    config.text.cache_dir = ""
    return config


@pytest.fixture(scope="module")
def latent_workdir(record_dir, vae_dir, tmp_path_factory):
    """A workdir whose latent cache --mode=encode filled (the encode mode itself, in process)."""
    workdir = str(tmp_path_factory.mktemp("latent_run"))
    encode.run(_latent_config(record_dir, vae_dir), workdir)
    return workdir


def test_encode_mode_reports_the_latent_cache(record_dir, vae_dir, latent_workdir, capsys):
    encode.run(_latent_config(record_dir, vae_dir), latent_workdir)  # Complete: writes nothing.
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(rf"latent_cache=\S+/latents records={NUM_IMAGES} written=0", line), line


def test_batches_from_the_latent_cache_equal_online_encoding(record_dir, vae_dir, latent_workdir):
    config = _latent_config(record_dir, vae_dir)
    vae = load_vae(vae_dir)
    latents = latent_cache.CachedLatents(
        array_cache.resolve(config.vae.latent_cache_dir, latent_workdir),
        expected=latent_cache.expected_metadata(vae, config.data, NUM_IMAGES))
    make = lambda **kw: pipeline.make_train_iterator(  # noqa: E731
        config.data, global_batch_size=8, seed=3, process_index=0, process_count=1, **kw)
    online, cached = make(), make(latents=latents)
    shapes = set()
    for _ in range(6):  # > one epoch: both buckets, and the bad records met.
        a, b = next(online), next(cached)
        assert "image" not in b  # Nothing decoded in training.
        np.testing.assert_array_equal(a["record_id"], b["record_id"])
        np.testing.assert_array_equal(a["caption"], b["caption"])
        reference = np.asarray(vae.encode(a["image"]))
        assert b["latent"].shape == reference.shape and b["latent"].dtype == np.float32
        # bf16 storage: at most 2^-8 relative rounding.
        np.testing.assert_allclose(b["latent"], reference, rtol=2 ** -8, atol=1e-6)
        shapes.add(b["latent"].shape[1:3])
    assert shapes == {(8, 16), (16, 8)}
    assert online.counters()["skipped"] == cached.counters()["skipped"] > 0


@pytest.mark.parametrize("change,field", [
    (dict(buckets="16x32"), "preprocessing"),
    (dict(image_size=32, buckets=""), "preprocessing"),
])
def test_latent_cache_with_other_preprocessing_is_refused(record_dir, vae_dir, latent_workdir,
                                                          change, field):
    config = _latent_config(record_dir, vae_dir, **change)
    with pytest.raises(array_cache.CacheMismatch, match=rf"\b{field}: cache has"):
        latent_cache.CachedLatents(
            array_cache.resolve(config.vae.latent_cache_dir, latent_workdir),
            expected=latent_cache.expected_metadata(load_vae(vae_dir), config.data, NUM_IMAGES))


def test_latent_cache_of_another_vae_is_refused(record_dir, vae_dir, latent_workdir, tmp_path):
    import shutil

    other = str(tmp_path / "vae")
    shutil.copytree(vae_dir, other)
    with open(f"{other}/config.json", "a") as f:
        f.write("\n")  # Same weights, other file bytes: another fingerprint.
    config = _latent_config(record_dir, other)
    with pytest.raises(array_cache.CacheMismatch, match=r"\bvae: cache has"):
        latent_cache.CachedLatents(
            array_cache.resolve(config.vae.latent_cache_dir, latent_workdir),
            expected=latent_cache.expected_metadata(load_vae(other), config.data, NUM_IMAGES))


def test_train_inputs_read_scaled_latents_from_the_cache(record_dir, vae_dir, latent_workdir,
                                                         tiny_llm):
    from lidit_jax.train.inputs import TrainInputs
    from train_helpers import make_mesh

    config = _latent_config(record_dir, vae_dir)
    config.text.llms.smollm2.path, config.text.llms.smollm2.width = str(tiny_llm), 0
    config.train.batch_size = 8
    inputs = TrainInputs(config, latent_workdir, make_mesh(1, 1, 1))
    batch = inputs.next_batch()
    online = pipeline.make_train_iterator(config.data, global_batch_size=8, seed=config.seed,
                                          process_index=0, process_count=1)
    reference = next(online)
    np.testing.assert_array_equal(inputs.last_record_ids, reference["record_id"])
    vae = load_vae(vae_dir)
    # x0 is scaled (shift and scale); the bf16 rounding is relative to the unscaled latent.
    np.testing.assert_allclose(np.asarray(vae.unscale(batch["x0"])),
                               np.asarray(vae.encode(reference["image"])), rtol=2 ** -8,
                               atol=1e-6)
    assert inputs.fingerprints()["image_space"] == vae.fingerprint
    inputs.close()


def test_latents_are_encoded_over_all_local_devices_as_on_one(record_dir, vae_dir):
    """--mode=encode's VAE batches are sharded over the host's 8 (fake) devices; the means equal
    one device's, in float32 before the bf16 rounding of the cache (XLA:CPU's sums move by
    ~5e-7 with the batch's split, so bitwise equality is not the contract)."""
    config = _latent_config(record_dir, vae_dir)
    source = pipeline.make_source(config.data)
    sharded_vae, one_device_vae = load_vae(vae_dir), load_vae(vae_dir)
    stages = latent_cache.sharded_stages(
        sharded_vae, config.data, lambda i: (source[i], batch_plan.header_size(source[i])),
        batch_size=8)
    batches = stages.prepare(list(range(NUM_IMAGES)))
    assert sorted(i for batch, _ in batches for i in batch) == list(range(NUM_IMAGES))
    encoded = 0
    for batch, pixels in batches:
        if pixels is None:  # Unreadable: an empty latent, nothing on a device.
            assert set(batch) <= set(_BAD)
            assert stages.finish(batch, stages.compute(pixels))[0]["latent"].size == 0
            continue
        means = stages.compute(pixels)
        assert len(means.sharding.device_set) == 8 == len(pixels)  # Padded to 8 per batch.
        reference = one_device_vae.encode(images.to_model_range(pixels))
        np.testing.assert_allclose(np.asarray(means), np.asarray(reference), atol=2e-6)
        entries = stages.finish(batch, means)
        assert len(entries) == len(batch)
        encoded += len(batch)
    assert encoded == NUM_IMAGES - len(_BAD)
