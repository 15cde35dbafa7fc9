"""Config validation: each bad value fails before anything is built, naming the key."""
import pytest

from configs import common, lidit_10b, lidit_1b
from lidit_jax import config_files
from lidit_jax.text import features
from lidit_jax.configuration import ConfigError, validate


def test_shipped_configs_validate():
    validate(common.get_config(), num_devices=8)
    validate(lidit_1b.get_config(), num_devices=256)
    validate(lidit_1b.get_config("offline"), num_devices=32)  # fsdp 32: a v5p-64 at least
    validate(lidit_10b.get_config("1024"), num_devices=512)
    validate(lidit_10b.get_config(), num_devices=1024)


def test_paper_numbers():
    one_b, ten_b = lidit_1b.get_config(), lidit_10b.get_config()
    assert (one_b.model.depth, one_b.model.width, one_b.model.heads, one_b.model.patch_size) == (28, 1152, 16, 2)
    assert (one_b.data.image_size, one_b.train.batch_size) == (256, 2048)
    assert len(features.encoder_names(one_b.text)) == 2
    assert all(one_b.text.llms[n].layer == -3 for n in features.encoder_names(one_b.text))
    assert (ten_b.model.depth, ten_b.model.width, ten_b.model.heads) == (48, 2816, 44)
    assert (ten_b.data.image_size, ten_b.train.batch_size) == (512, 4096)


@pytest.mark.parametrize("key,value,needle", [
    ("diffusion.objective", "score", "diffusion.objective"),
    ("model.heads", 5, "model.heads"),
    ("train.microbatches", 3, "train.microbatches"),
    ("text.encoders", "smollm2,nope", "text.llms"),
    ("text.fusion", "merge", "text.fusion"),
    ("data.buckets", "32x33", "data.buckets"),
    ("data.shapes_layout", "ring", "data.shapes_layout"),
    ("train.ema_decay", 1.5, "train.ema_decay"),
    ("train.preemption_exit_code", 256, "train.preemption_exit_code"),
    ("model.depth", 0, "model.depth"),
])
def test_bad_values_name_the_key(key, value, needle):
    config = common.get_config()
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        validate(config)


def test_mesh_product_differs_from_device_count():
    config = common.get_config()
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 1
    with pytest.raises(ConfigError, match=r"multiply to 4 but there are 8 devices"):
        validate(config, num_devices=8)


def test_batch_not_divisible_by_batch_axes():
    config = common.get_config()
    config.mesh.data, config.mesh.fsdp = 4, 2
    config.train.batch_size = 12
    with pytest.raises(ConfigError, match=r"train.batch_size=12.*8 batch shards"):
        validate(config, num_devices=8)


def test_bfloat16_parameters_are_refused_because_the_ema_and_adamw_would_not_move():
    # The AdamW moments and the EMA take the parameters' dtype; in bfloat16 one AdamW step at
    # lr 1e-4 left 57 % of the DiT's weights unchanged and the EMA at 0.9999 moved 0.008 % of
    # them (docs/pods.md). Compute is bfloat16 already (model.dtype).
    config = common.get_config()
    config.model.param_dtype = "bfloat16"
    with pytest.raises(ConfigError, match=r"model\.param_dtype='bfloat16'.*EMA.*"
                                          r"model\.param_dtype='float32'"):
        validate(config)


def test_rules_naming_missing_mesh_axis():
    config = common.get_config()
    config.mesh.rules = config.mesh.rules + (("embed_extra", "pipeline"),)
    with pytest.raises(ConfigError, match=r"'pipeline'.*do not exist"):
        validate(config)


def test_nearest_key():
    config = common.get_config()
    assert config_files.nearest_key(config, "train.setps") == "train.steps"
    assert config_files.nearest_key(config, "zzzzzz.qqqq") is None


def test_overrides_mean_the_same_everywhere():
    """config_files: the loader of the ablation/readout arms, tpu_estimates and main's message."""
    config = config_files.load("configs/demo_shapes.py")
    config_files.apply_overrides(config, ["train.steps=7", "text.llms.smollm2.layer=[-1, -3]",
                                          "data.source=shapes", ("train.learning_rate", 3e-4)])
    assert (config.train.steps, config.text.llms.smollm2.layer) == (7, [-1, -3])
    assert (config.data.source, config.train.learning_rate) == ("shapes", 3e-4)
    with pytest.raises(KeyError, match=r"'train.setps'.*did you mean 'train.steps'"):
        config_files.apply_overrides(config, ["train.setps=3"])
    assert config_files.unknown_key_message(config, "text.llms") is None  # A group of keys.
    assert config_files.parse_value("all_norm_avg") == "all_norm_avg"
    assert config_files.load("configs/lidit_10b.py:1024").data.image_size == 1024
