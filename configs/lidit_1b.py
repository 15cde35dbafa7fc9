"""LI-DiT-1B (arXiv 2406.11831): DiT depth 28, width 1152, 16 heads, patch 2, 256 px latents.

Two frozen LLMs (the paper: LLaMA3-8B and Qwen1.5-7B, both multimodal instruction-tuned, i.e.
LLaVA-tuned), features from the third-to-last layer, token refiners of depth 2 and one
collaborative refiner block; a 16-channel 8x VAE (SD3/FLUX layout); batch 2048, 500k steps (the
paper's). lr 1e-4 is the paper's for its ablations only; it gives none for LI-DiT-1B.

Public checkpoints that reproduce the paper's two LLMs (their language towers load as published;
the vision towers are never read, docs/text_encoders.md):
  LLaMA3-8B, LLaVA-tuned:  llava-hf/llama3-llava-next-8b-hf (llava_next; LLaMA3-8B-Instruct tower)
  Qwen1.5-7B, LLaVA-tuned: llava-hf/llava-interleave-qwen-7b-hf (llava; Qwen1.5-7B-Chat tower)
The text-only instruction-tuned towers (Meta-Llama-3-8B-Instruct, Qwen1.5-7B-Chat) load too.

Launch (one TPU v5p-128 slice, from every worker; see launch/tpu_vm.sh):
  python -m lidit_jax.main --config=configs/lidit_1b.py --workdir=gs://BUCKET/lidit_1b \\
    --config.text.llms.llama3.path=/models/llama3-llava-next-8b-hf \\
    --config.text.llms.qwen.path=/models/llava-interleave-qwen-7b-hf \\
    --config.vae.path=/models/flux-vae --config.data.path=/data/pairs
`configs/lidit_1b.py:offline` swaps in the offline PyPI encoders (SmolLM2-135M + Gemma 3 270M).
"""
from configs import common


def get_config(arg=None):
    c = common.get_config()
    if arg == "offline":
        c.text.encoders = "smollm2,gemma3"
    else:
        c.text.llms.llama3 = common.llm_config("", layer=-3, width=4096, architecture="llama3-8b")
        c.text.llms.qwen = common.llm_config("", layer=-3, width=4096, architecture="qwen1.5-7b")
        c.text.encoders = "llama3,qwen"
    c.text.fusion = "collaborative"
    c.text.max_length = 256
    c.text.refiner.depth = 2
    c.text.refiner.heads = 16
    c.text.collaborative.heads = 16

    c.model.depth = 28
    c.model.width = 1152
    c.model.heads = 16
    c.model.patch_size = 2
    # No remat, FSDP over 32 chips, a bf16 residual stream: the fastest LI-DiT-1B setting on v5p
    # 4x4x4 that fits (XLA attention; jax.nn's attention backward, a float32 stream, fsdp 1-64 and
    # dots_saveable all estimate slower): benchmarks/tpu_estimates.md, LI-DiT-1B on v5p:4x4x4.
    c.model.remat = "none"
    c.model.residual_dtype = "bfloat16"

    # Epsilon prediction as in DiT, whose schedule is the linear one (DDPM's 1e-4..0.02); the
    # paper does not name its schedule.
    c.diffusion.objective = "epsilon"
    c.diffusion.schedule = "linear"

    c.vae.path = ""  # Set to a diffusers AutoencoderKL folder (16 channels, 8x) for training.
    c.vae.latent_channels = 16
    c.vae.downsample = 8
    c.aot.topology = "v5p:4x4x4"  # 64 chips, 128 TensorCores: the v5p-128 of the docstring.
    c.data.source = "arrayrecord"
    c.data.image_size = 256
    c.data.buckets = "256x256,224x288,288x224,192x320,320x192"

    c.train.steps = 500_000
    c.train.batch_size = 2048
    c.train.learning_rate = 1e-4  # The paper's ablation lr (none given for LI-DiT-1B itself).
    c.train.warmup_steps = 1000
    c.train.ema_decay = 0.9999
    c.train.sample_every = 5000
    c.checkpoint.every = 2000
    c.checkpoint.keep_period = 50_000

    c.mesh.data = -1
    c.mesh.fsdp = 32
    return c
