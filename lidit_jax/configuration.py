"""Config validation: every check that can fail before anything is built, with the key and the fix.

`validate(config, num_devices)` is called by `main` right after flag parsing. Each failure is a
`ConfigError` whose message names the offending key, its value and what to set instead (the
class lives in `lidit_jax.errors`, so that the layers below, which know their own keys, raise it
too).
"""
import math

from lidit_jax.data.shapes import LAYOUTS
from lidit_jax.errors import ConfigError
from lidit_jax.nn.positions import POSITION_EMBEDDINGS
from lidit_jax.parallel.mesh import MESH_AXES, resolve_axis_sizes
from lidit_jax.parallel.sharding import validate_rules
from lidit_jax.text import architectures, features

CHOICES = {
    "text.fusion": ("collaborative", "concat", "single"),
    "text.padding_side": ("right", "left"),
    "model.remat": ("none", "full", "dots_saveable"),
    "model.position_embedding": POSITION_EMBEDDINGS,
    "model.attention": ("auto", "xla", "cudnn", "splash"),
    "text.attention": ("auto", "xla", "cudnn", "splash"),
    "model.context_parallel": ("none", "all_gather", "ulysses", "ring"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.residual_dtype": ("float32", "bfloat16"),
    "diffusion.objective": ("epsilon", "v", "flow"),
    "diffusion.schedule": ("linear", "scaled_linear", "cosine"),
    "diffusion.sampler": ("ddim", "dpm++2m", "euler", "heun"),
    "data.source": ("shapes", "arrayrecord", "tfds"),
    "data.shapes_layout": tuple(LAYOUTS),
    "train.lr_schedule": ("constant", "cosine"),
    "train.nan_policy": ("skip", "stop"),
}

POSITIVE_INTS = (
    "model.depth", "model.width", "model.heads", "model.patch_size", "text.max_length",
    "diffusion.num_timesteps", "diffusion.sample_steps", "data.image_size", "train.steps",
    "train.batch_size", "train.microbatches", "train.log_every", "train.sample_every",
    "checkpoint.every", "checkpoint.keep",
)


def get_path(config, dotted):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def llm_widths_from_config(config):
    """The configured LLMs' state widths (text.llms.<name>.width, else the hidden size of its
    `architecture`), without loading weights."""
    widths = []
    for name in features.encoder_names(config.text):
        llm = config.text.llms[name]
        width = llm.width
        if width <= 0 and llm.get("architecture"):
            width = architectures.KNOWN[llm.architecture]["hidden_size"]
        if width <= 0:
            raise ConfigError(
                f"text.llms.{name}.width is 0; set it to the LLM's hidden size (or "
                f"text.llms.{name}.architecture) to describe or compile without loading its "
                "weights")
        # Several layers concatenated on channels widen the states (text/features.py).
        choice = features.parse(llm.layer, llm.layer_combine, f"text.llms.{name}")
        widths.append(features.feature_width(choice, llm.layer_combine, width))
    return widths


def mesh_axis_sizes(config, num_devices):
    """{'data': n, 'fsdp': n, 'tensor': n} with -1 resolved and DCN parts folded in."""
    num_slices = config.mesh.dcn_data * config.mesh.dcn_fsdp
    if num_devices % num_slices:
        raise ConfigError(f"mesh.dcn_data * mesh.dcn_fsdp = {num_slices} does not divide the "
                          f"{num_devices} devices")
    try:
        ici = resolve_axis_sizes({a: config.mesh[a] for a in MESH_AXES},
                                 num_devices // num_slices, "mesh")
    except ValueError as e:
        raise ConfigError(f"{e} (keys mesh.data, mesh.fsdp, mesh.context, mesh.tensor)") from None
    return {"data": ici["data"] * config.mesh.dcn_data,
            "fsdp": ici["fsdp"] * config.mesh.dcn_fsdp, "context": ici["context"],
            "tensor": ici["tensor"]}


def validate(config, num_devices=None):
    """Raises ConfigError on the first problem found; returns the config unchanged otherwise.

    With `num_devices`, also checks the mesh against the device count and the global batch
    against the batch-sharding axes.
    """
    for key, allowed in CHOICES.items():
        value = get_path(config, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {allowed}; set --config.{key}=<one of them>")
    for key in POSITIVE_INTS:
        value = get_path(config, key)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key}={value!r} must be a positive integer")
    _validate_text(config)
    _validate_model(config)
    _validate_buckets(config)
    _validate_train(config)
    try:
        validate_rules(config.mesh.rules, MESH_AXES)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if num_devices is not None:
        _validate_mesh_and_batch(config, num_devices)
    _validate_attention(config, mesh_axis_sizes(config, num_devices) if num_devices else None)
    return config


def _validate_text(config):
    names = features.encoder_names(config.text)
    if not names:
        raise ConfigError("text.encoders is empty; name at least one entry of text.llms, e.g. 'smollm2'")
    for name in names:
        if name not in config.text.llms:
            raise ConfigError(f"text.encoders names {name!r}, which is not in text.llms "
                              f"{sorted(config.text.llms.keys())}")
    if len(set(names)) != len(names):
        raise ConfigError(f"text.encoders={config.text.encoders!r} names an LLM twice")
    for name in names:
        llm = config.text.llms[name]
        try:
            features.parse(llm.layer, llm.layer_combine, f"text.llms.{name}")
        except features.LayerChoiceError as e:
            raise ConfigError(str(e)) from None
        if llm.get("architecture") and llm.architecture not in architectures.KNOWN:
            raise ConfigError(f"text.llms.{name}.architecture={llm.architecture!r} is not "
                              f"shipped; choose one of {sorted(architectures.KNOWN)} or ''")
    if config.text.fusion == "single" and len(names) != 1:
        raise ConfigError(f"text.fusion='single' needs exactly one LLM, text.encoders has {names}; "
                          "use fusion 'concat' or 'collaborative' for several")
    if config.text.collaborative.modulation not in ("per_branch", "mean"):
        raise ConfigError(f"text.collaborative.modulation={config.text.collaborative.modulation!r}"
                          "; choose 'per_branch' (the paper) or 'mean'")
    if config.text.refiner.depth < 0:
        raise ConfigError(f"text.refiner.depth={config.text.refiner.depth} must be >= 0")
    if config.model.width % config.text.refiner.heads:
        raise ConfigError(f"model.width={config.model.width} is not divisible by "
                          f"text.refiner.heads={config.text.refiner.heads}")
    if config.model.width % config.text.collaborative.heads:
        raise ConfigError(f"model.width={config.model.width} is not divisible by "
                          f"text.collaborative.heads={config.text.collaborative.heads}")


def _validate_model(config):
    if config.model.param_dtype != "float32":
        # The AdamW moments and the EMA take the parameters' dtype. bfloat16 rounds away any
        # change below 2^-9 of a weight: the EMA at decay 0.9999 moves 1e-4 of the gap and never
        # changes, AdamW steps of ~lr vanish on weights above ~lr * 2^9 (docs/pods.md: one step
        # at lr 1e-4 left 57 % of a DiT's weights and 99.99 % of its EMA unchanged).
        raise ConfigError(
            f"model.param_dtype={config.model.param_dtype!r}: the parameters, AdamW moments and "
            "EMA would be stored in it, and bfloat16 rounds away updates of 1e-4 of a weight (the "
            "EMA at train.ema_decay=0.9999 would never move, most AdamW steps at lr 1e-4 would "
            "vanish); keep model.param_dtype='float32' (matmuls already run in model.dtype)")
    if config.model.width % config.model.heads:
        raise ConfigError(f"model.width={config.model.width} is not divisible by "
                          f"model.heads={config.model.heads}")
    codes = config.model.position_embedding.split("+")
    head_dim = config.model.width // config.model.heads
    if "sincos" in codes and config.model.width % 4:
        raise ConfigError(f"model.position_embedding={config.model.position_embedding!r} needs "
                          f"model.width divisible by 4 (row and column sin | cos); got "
                          f"{config.model.width}")
    if "rope" in codes and head_dim % 4:
        raise ConfigError(f"model.position_embedding={config.model.position_embedding!r} rotates "
                          f"pairs for rows and columns: model.width / model.heads = {head_dim} "
                          "must be divisible by 4")
    if config.vae.latent_channels < 1 or config.vae.downsample < 1:
        raise ConfigError(f"vae.latent_channels={config.vae.latent_channels} and vae.downsample="
                          f"{config.vae.downsample} must be >= 1")
    if config.vae.latent_cache_dir and not config.vae.path:
        raise ConfigError("vae.latent_cache_dir is set but vae.path is empty: a latent cache "
                          "needs a VAE (clear vae.latent_cache_dir for pixel space)")
    multiple = config.model.patch_size * config.vae.downsample
    sizes = [f"{config.data.image_size}x{config.data.image_size}"]
    sizes += [b.strip() for b in config.data.buckets.split(",") if b.strip()]
    for size in sizes:
        parts = size.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ConfigError(f"data.buckets entry {size!r} is not HxW, e.g. '256x256,192x320'")
        if any(int(p) % multiple for p in parts):
            raise ConfigError(
                f"image size {size} (data.image_size / data.buckets) is not divisible by "
                f"model.patch_size * vae.downsample = {multiple}")


def _validate_attention(config, sizes):
    """Splash tiles; with the mesh `sizes`, context parallelism against shapes and mesh."""
    m = config.model
    for key in ("splash_block_q", "splash_block_kv"):
        value = m[key]
        if not isinstance(value, int) or value < 128 or value % 128:
            raise ConfigError(f"model.{key}={value!r} must be a positive multiple of 128 (TPU "
                              "tiles are 128 lanes wide)")
    context = 1 if sizes is None else sizes["context"]
    if context > 1 and m.context_parallel == "none":
        raise ConfigError(f"mesh.context={context} shards the image tokens but "
                          "model.context_parallel='none'; set it to all_gather, ulysses or ring")
    if context == 1:
        return
    sizes_hw = [f"{config.data.image_size}x{config.data.image_size}"]
    sizes_hw += [b.strip() for b in config.data.buckets.split(",") if b.strip()]
    per_token = m.patch_size * config.vae.downsample
    for size in sizes_hw:
        height, width = (int(p) for p in size.lower().split("x"))
        tokens = (height // per_token) * (width // per_token)
        if tokens % context:
            raise ConfigError(f"image size {size} has {tokens} tokens, not divisible by "
                              f"mesh.context={context}; change data.buckets or mesh.context")
    if m.context_parallel == "ulysses" and m.heads % (sizes["tensor"] * context):
        raise ConfigError(
            f"model.context_parallel=ulysses splits model.heads={m.heads} over mesh.tensor * "
            f"mesh.context = {sizes['tensor'] * context}, which does not divide it; use "
            "model.context_parallel=all_gather (or ring) or change mesh.context")


def _validate_buckets(config):
    """With data.buckets set, the buckets alone give the training sizes: a data.image_size
    outside their sides (e.g. 1024 over 512 px buckets) would silently not happen."""
    sides = [int(p) for b in config.data.buckets.split(",") if b.strip()
             for p in b.strip().lower().split("x")]
    if sides and not min(sides) <= config.data.image_size <= max(sides):
        raise ConfigError(
            f"data.image_size={config.data.image_size} is outside the sides of data.buckets="
            f"{config.data.buckets!r} ({min(sides)}..{max(sides)} px), which set the training "
            "sizes: give buckets for that resolution (e.g. configs/lidit_10b.py:1024) or clear "
            "data.buckets")


def _validate_train(config):
    train = config.train
    if train.batch_size % train.microbatches:
        raise ConfigError(f"train.batch_size={train.batch_size} is not divisible by "
                          f"train.microbatches={train.microbatches}")
    code = train.preemption_exit_code
    if not isinstance(code, int) or not 0 <= code <= 255:
        raise ConfigError(f"train.preemption_exit_code={code!r} must be an exit status in 0..255 "
                          "(0: SLURM requeues; launch/xpk.sh sets 42)")
    if not 0.0 <= train.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay={train.ema_decay} must be in [0, 1)")
    if train.learning_rate <= 0:
        raise ConfigError(f"train.learning_rate={train.learning_rate} must be > 0")
    if not 0.0 <= config.data.caption_dropout < 1.0:
        raise ConfigError(f"data.caption_dropout={config.data.caption_dropout} must be in [0, 1)")


def _validate_mesh_and_batch(config, num_devices):
    sizes = mesh_axis_sizes(config, num_devices)
    batch_axes = dict(config.mesh.rules).get("batch")
    batch_axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes or ())
    shards = math.prod(sizes[a] for a in batch_axes)
    micro = config.train.batch_size // config.train.microbatches
    if micro % shards:
        raise ConfigError(
            f"train.batch_size={config.train.batch_size} / train.microbatches="
            f"{config.train.microbatches} = {micro} examples per step is not divisible by the "
            f"{shards} batch shards (mesh axes {batch_axes} of sizes "
            f"{[sizes[a] for a in batch_axes]}); pick a batch size that is a multiple of {shards}")
