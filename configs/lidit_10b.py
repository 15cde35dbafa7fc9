"""LI-DiT-10B (arXiv 2406.11831): DiT depth 48, width 2816, 44 heads, patch 2, 512 px latents.

Same text side as the 1B model (two 7-8B LLMs, layer -3, token + collaborative refiners); batch
4096; trained at 512 px, then fine-tuned at 1024 px: `configs/lidit_10b.py:1024` is that stage
(1024 px buckets; set --config.train.init_from to the 512 px run's workdir or EMA export).
`:offline` (and `:offline,1024`) swap in the offline encoders as in lidit_1b.py.

Launch (TPU v5p-1024, 4 slices over DCN; see launch/tpu_vm.sh):
  python -m lidit_jax.main --config=configs/lidit_10b.py --workdir=gs://BUCKET/lidit_10b \\
    --config.text.llms.llama3.path=/models/llama3-llava-next-8b-hf \\
    --config.text.llms.qwen.path=/models/llava-interleave-qwen-7b-hf \\
    --config.vae.path=/models/flux-vae --config.data.path=/data/pairs --config.mesh.dcn_data=4
"""
from configs import lidit_1b


def get_config(arg=None):
    args = set(arg.split(",")) if arg else set()
    unknown = args - {"offline", "1024"}
    if unknown:
        raise ValueError(f"configs/lidit_10b.py: unknown argument(s) {sorted(unknown)}; "
                         "use 'offline', '1024' or 'offline,1024'")
    c = lidit_1b.get_config("offline" if "offline" in args else None)
    c.model.depth = 48
    c.model.width = 2816
    c.model.heads = 44
    # dots_saveable at 512 px fits v5p 8x8x8 and estimates faster than full remat, with `auto`'s
    # splash counted at the roofline (benchmarks/tpu_estimates.md, LI-DiT-10B on v5p:8x8x8, 512px).
    # The 1024 px stage needs full remat (below), and so does v6e 16x16 (32 GiB chips, 16 images
    # each), where dots_saveable does not fit (benchmarks/tpu_estimates.md, LI-DiT-10B on
    # v6e:16x16).
    c.model.remat = "dots_saveable"
    c.text.refiner.heads = 22
    c.text.collaborative.heads = 22

    c.data.image_size = 512
    c.data.buckets = "512x512,448x576,576x448,384x640,640x384"
    c.train.batch_size = 4096
    c.train.steps = 1_000_000
    c.mesh.fsdp = 64
    if "1024" in args:  # The fine-tune stage: 1024 px buckets (the same aspect ratios x 2).
        c.data.image_size = 1024
        c.data.buckets = "1024x1024,896x1152,1152x896,768x1280,1280x768"
        # 4096 image tokens: dots_saveable would need 264 GiB per chip; full remat 37.4 GiB, est.
        # 43.4 % MFU with splash at the roofline (23.1 % with XLA attention).
        c.model.remat = "full"
    c.aot.topology = "v5p:8x8x8"  # 512 chips of a v5p-1024 (one slice; --config.aot.num_slices=4).
    return c
