"""What every ablation arm shares: the shapes data (grid layout, 1-4 objects), the toy DiT, the
training budget and the held-out evaluation. Each arm (a file next to this one) changes only
its text side, starting from the paper's baseline: SmolLM2-135M-Instruct's last layer, no
instruction, no refiner (projection only), no pooled text in adaLN (pure cross-attention).

  python -m lidit_jax.evaluate.ablation --arms=baseline,instruction --seeds=2 --workdir=DIR
runs arms; `python -m lidit_jax.main --config=configs/ablations/<arm>.py ...` runs one by hand.
The budget (train.steps, batch, eval.num_prompts, sample steps) was sized for the whole
ablation on 2 shared CPU cores (docs/ablation.md has the measured times).
"""
from configs import common


def get_config():
    c = common.get_config()
    c.text.encoders = "smollm2"
    c.text.fusion = "single"
    c.text.use_instruction = False
    c.text.use_chat_template = False  # Short sequences: the LLM pass and cross-attention.
    c.text.max_length = 72  # Instruction (26 SmolLM2 tokens) + the longest grid caption (38).
    for llm in (c.text.llms.smollm2, c.text.llms.gemma3):
        llm.layer = -1
        llm.dtype = "float32"  # CPUs have no fast bf16 matmul; the cache stores bf16 anyway.
    c.text.refiner.depth = 0
    c.text.refiner.heads = 4
    c.text.collaborative.heads = 4
    c.text.cache_dir = "text_cache"

    # Smaller than the demo's DiT (depth 4, width 128): the 2 CPU cores were shared by six
    # sessions when this was sized, and steps, not width, were what the toy task lacked.
    c.model.depth = 3
    c.model.width = 64
    c.model.heads = 4
    c.model.patch_size = 4  # 8 x 8 tokens on 32 px: four per quadrant side.
    c.model.dtype = "float32"
    c.model.pooled_text = False

    c.diffusion.objective = "flow"
    c.diffusion.sampler = "euler"
    c.diffusion.sample_steps = 16
    c.diffusion.guidance_scale = 3.0

    c.data.source = "shapes"
    c.data.shapes_layout = "grid"
    c.data.image_size = 32
    c.data.shapes_num_records = 256  # Each text setting is cached once: 256 LLM passes.
    c.data.caption_dropout = 0.1

    c.train.steps = 600
    c.train.batch_size = 32
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 30
    c.train.ema_decay = 0.99
    c.train.log_every = 50
    c.train.sample_every = 100_000  # Only at the end; the evaluation writes its own grid.
    c.train.sample_prompts = (
        "a large red circle in the top left and a large blue square in the bottom right",
        "a small green triangle in the top right",
    )
    c.checkpoint.every = 100_000  # Only the final step (and on SIGTERM).
    c.checkpoint.keep = 1
    c.logging.progress_bar = False

    c.eval.num_prompts = 96
    c.eval.batch_size = 96
    c.mesh.data = -1
    return c
