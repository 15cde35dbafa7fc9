"""VAE: parity with diffusers' PyTorch AutoencoderKL (both layouts), tiling, loading errors,
image spaces."""
import json
import os
import shutil

import jax
import ml_collections
import diffusers  # The reference: a missing test extra must fail, not skip.
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file, save_file

from configs.common import DEFAULT_SHARDING_RULES
from lidit_jax.diffusion import vae as vae_lib

SD_LAYOUT = dict(block_out_channels=(32, 64), norm_num_groups=8, layers_per_block=1,
                 latent_channels=4)
FLUX_LAYOUT = dict(block_out_channels=(32, 64), norm_num_groups=8, layers_per_block=2,
                   latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                   shift_factor=0.1159, scaling_factor=0.3611)


def _torch_vae(layout, seed=0):
    """A random diffusers AutoencoderKL; every parameter perturbed (init leaves zeros)."""
    torch.manual_seed(seed)
    blocks = len(layout["block_out_channels"])
    model = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * blocks,
                                    up_block_types=("UpDecoderBlock2D",) * blocks, **layout)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model.eval()


@pytest.fixture(scope="module", params=["sd", "flux"])
def saved(request, tmp_path_factory):
    """(torch model, its save_pretrained folder, our VAE loaded from it)."""
    layout = SD_LAYOUT if request.param == "sd" else FLUX_LAYOUT
    model = _torch_vae(layout)
    folder = str(tmp_path_factory.mktemp(request.param))
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder, vae_lib.load_vae(folder)


def _relative_error(ours, reference):
    ours, reference = np.asarray(ours), np.asarray(reference)
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(x), (0, 3, 1, 2))))


def _nhwc(t):
    return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


def test_parity_with_diffusers(saved):
    model, folder, vae = saved
    # Non-square on purpose: catches any height/width mix-up in the layout changes.
    images = np.random.default_rng(1).uniform(-1, 1, (2, 32, 48, 3)).astype(np.float32)
    with torch.no_grad():
        reference = model.encode(_nchw(images)).latent_dist
        ref_mean = _nhwc(reference.mean)
        latents = np.random.default_rng(2).normal(size=ref_mean.shape).astype(np.float32)
        ref_images = _nhwc(model.decode(_nchw(latents)).sample)
    mean = vae.encode(images)
    assert mean.shape == (2, 32 // vae.downsample, 48 // vae.downsample, vae.channels)
    decoded = vae.decode(latents)
    assert decoded.shape == images.shape
    encode_error = _relative_error(mean, ref_mean)
    decode_error = _relative_error(decoded, ref_images)
    print(f"{os.path.basename(folder)}: encode rel err {encode_error:.2e}, "
          f"decode rel err {decode_error:.2e}")
    assert encode_error <= 1e-4 and decode_error <= 1e-4

    # Posterior sample: mean + std * noise with the posterior's std.
    noise_key = jax.random.key(0)
    sample = np.asarray(vae.sample(images, noise_key))
    noise = np.asarray(jax.random.normal(noise_key, sample.shape))
    assert _relative_error(sample, ref_mean + _nhwc(reference.std) * noise) <= 1e-4


def test_scale_matches_config(saved):
    model, _, vae = saved
    shift = model.config.shift_factor or 0.0
    assert vae.scaling_factor == pytest.approx(model.config.scaling_factor)
    assert vae.shift_factor == pytest.approx(shift)
    z = np.random.default_rng(3).normal(size=(1, 4, 4, vae.channels)).astype(np.float32)
    np.testing.assert_allclose(vae.scale(z), (z - shift) * model.config.scaling_factor,
                               rtol=1e-6)
    np.testing.assert_allclose(vae.unscale(vae.scale(z)), z, rtol=1e-5, atol=1e-6)


def test_tiled_decode_equals_untiled(saved, monkeypatch):
    _, _, vae = saved
    # 8-latent tiles on 20 x 28 latents: a 3 x 4 grid whose last row and column are partial,
    # and the mid-block attention runs in 64-query chunks.
    tile = 8 * vae.downsample
    latents = np.random.default_rng(4).normal(size=(2, 20, 28, vae.channels)).astype(np.float32)
    whole = np.asarray(vae.decode(latents, tile_size=0))

    def no_whole_decode(*args):
        raise AssertionError("the tiled path must not decode the whole image at once")

    monkeypatch.setattr(vae, "_decode", no_whole_decode)
    tiled = np.asarray(vae.decode(latents, tile_size=tile))
    assert tiled.shape == whole.shape == (2, 20 * vae.downsample, 28 * vae.downsample, 3)
    error = _relative_error(tiled, whole)
    print(f"tiled vs untiled decode rel err {error:.2e}")
    assert error <= 1e-5


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("small"))
    _torch_vae(dict(SD_LAYOUT, block_out_channels=(8, 16), norm_num_groups=4)).save_pretrained(
        folder, safe_serialization=True)
    return folder


def _copy(folder, tmp_path, config_edit=None, tensors_edit=None):
    target = str(tmp_path / "vae")
    shutil.copytree(folder, target)
    if config_edit:
        path = os.path.join(target, vae_lib.CONFIG_FILE)
        with open(path) as f:
            config = json.load(f)
        config_edit(config)
        with open(path, "w") as f:
            json.dump(config, f)
    if tensors_edit:
        path = os.path.join(target, vae_lib.WEIGHTS_FILE)
        tensors = load_file(path)
        tensors_edit(tensors)
        save_file(tensors, path)
    return target


def test_legacy_attention_names_and_fingerprint(small_folder, tmp_path):
    """Checkpoints converted from the original SD code name the attention query/key/value/
    proj_attn; they load to the same network, with a different fingerprint (other bytes)."""
    def rename(tensors):
        for name in list(tensors):
            for new, old in vae_lib._LEGACY_ATTENTION.items():
                if f".{new}." in name:
                    tensors[name.replace(f".{new}.", f".{old}.")] = tensors.pop(name)
    vae = vae_lib.load_vae(small_folder)
    legacy = vae_lib.load_vae(_copy(small_folder, tmp_path, tensors_edit=rename))
    images = np.random.default_rng(6).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
    np.testing.assert_array_equal(legacy.encode(images), vae.encode(images))
    assert len(vae.fingerprint) == 64 and legacy.fingerprint != vae.fingerprint
    assert vae_lib.load_vae(small_folder).fingerprint == vae.fingerprint


def test_unknown_block_type(small_folder, tmp_path):
    def edit(config):
        config["down_block_types"][0] = "AttnDownEncoderBlock2D"
    with pytest.raises(ValueError, match="config.json.*down_block_types.*AttnDownEncoderBlock2D"):
        vae_lib.load_vae(_copy(small_folder, tmp_path, config_edit=edit))


def test_missing_config_key(small_folder, tmp_path):
    folder = _copy(small_folder, tmp_path, config_edit=lambda c: c.pop("latent_channels"))
    with pytest.raises(ValueError, match="config.json.*latent_channels"):
        vae_lib.load_vae(folder)


def test_missing_tensor(small_folder, tmp_path):
    name = "decoder.up_blocks.1.resnets.0.conv2.weight"
    folder = _copy(small_folder, tmp_path, tensors_edit=lambda t: t.pop(name))
    with pytest.raises(ValueError, match=f"safetensors.*{name}"):
        vae_lib.load_vae(folder)


def test_misshapen_tensor(small_folder, tmp_path):
    name = "encoder.conv_in.weight"

    def edit(tensors):
        tensors[name] = torch.zeros(8, 3, 5, 5)
    with pytest.raises(ValueError, match=f"safetensors.*{name}.*shape"):
        vae_lib.load_vae(_copy(small_folder, tmp_path, tensors_edit=edit))


def _vae_config(path="", latent_channels=3, downsample=1):
    return ml_collections.ConfigDict(dict(path=path, latent_channels=latent_channels,
                                          downsample=downsample, tile_size=0,
                                          latent_cache_dir=""))


def test_pixel_space():
    space = vae_lib.make_image_space(_vae_config())
    assert isinstance(space, vae_lib.PixelSpace)
    assert (space.channels, space.downsample, space.fingerprint) == (3, 1, "pixels")
    images = np.random.default_rng(5).uniform(-1, 1, (2, 8, 12, 3)).astype(np.float32)
    np.testing.assert_array_equal(space.decode(space.unscale(space.scale(space.encode(images)))),
                                  images)
    with pytest.raises(ValueError, match="set vae.path to a diffusers AutoencoderKL folder"):
        vae_lib.make_image_space(_vae_config(latent_channels=4, downsample=2))


def test_image_space_from_folder(small_folder):
    space = vae_lib.make_image_space(_vae_config(small_folder, latent_channels=4, downsample=2))
    assert isinstance(space, vae_lib.VAE)
    images = np.zeros((1, 16, 24, 3), np.float32)
    assert space.decode(space.encode(images)).shape == images.shape
    with pytest.raises(ValueError, match="vae.latent_channels=16.*set vae.latent_channels=4"):
        vae_lib.make_image_space(_vae_config(small_folder, latent_channels=16, downsample=2))
    with pytest.raises(ValueError, match="vae.downsample=8.*set vae.downsample=2"):
        vae_lib.make_image_space(_vae_config(small_folder, latent_channels=4, downsample=8))


def test_parameters_carry_logical_axes(small_folder):
    """Every parameter is annotated with logical axes the sharding rules know."""
    known = {name for name, _ in DEFAULT_SHARDING_RULES}
    vae = vae_lib.load_vae(small_folder)
    for path, variable in nnx.state(nnx.merge(vae._graphdef, vae._state)).flat_state():
        axes = variable.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == variable.ndim and set(axes) <= known, path


# ---- Strictness added by the second issue-6 helper --------------------------------------------
def test_unused_tensors_are_an_error(small_folder, tmp_path):
    """quant_conv weights with use_quant_conv false: refusing beats dropping them silently."""
    folder = _copy(small_folder, tmp_path, config_edit=lambda c: c.update(use_quant_conv=False))
    with pytest.raises(ValueError, match=r"safetensors: 2 tensors not used.*quant_conv.bias"):
        vae_lib.load_vae(folder)


@pytest.mark.parametrize("key, value, message", [
    ("norm_num_groups", 3, "norm_num_groups 3 does not divide"),
    ("latents_mean", [0.0] * 4, "latents_mean is set"),
])
def test_config_values_refused_with_the_key(small_folder, tmp_path, key, value, message):
    folder = _copy(small_folder, tmp_path, config_edit=lambda c: c.update({key: value}))
    with pytest.raises(ValueError, match=f"config.json: {message}"):
        vae_lib.load_vae(folder)


def test_encode_needs_multiples_of_downsample(small_folder):
    vae = vae_lib.load_vae(small_folder)
    with pytest.raises(ValueError, match=r"VAE.encode: height and width \(7, 8\).* 2"):
        vae.encode(np.zeros((1, 7, 8, 3), np.float32))
