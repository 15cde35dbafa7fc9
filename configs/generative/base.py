"""What every generative-confirmation arm shares (issue 28 item 4): a shapes task the toy DiT
renders within the budget, where some captions bind objects to slots only through later words.

Data: the "grid_late" shapes design (lidit_jax/data/shapes.py): 2 x 2 slots at 32 px, 1-4
objects of distinct colours in random mention order, half the captions a slot listing ("a red
circle in the bottom right and a blue square in the top left"), half late binding ("a red
circle and a blue square, in the bottom right and top left respectively"), balanced by
construction in training and in the 256 held-out prompts (32 per object count and template).
4352 training records: 4134 unique captions. The DiT has 2-D sin-cos positions (placement is
learned; docs/denoiser.md) and text enters through cross-attention only (no pooled text in
adaLN), so each arm (a file next to this one) changes only its text side, starting from `raw`:
SmolLM2-135M-Instruct's last layer, plain caption, projection only.

  python -m lidit_jax.evaluate.ablation --configs_dir=configs/generative \\
      --arms=raw,minilm,lidit,causal_refiner --seeds=3 --workdir=DIR \\
      --contrasts=minilm-raw,lidit-raw,lidit-causal_refiner,causal_refiner-raw \\
      --contrast_subsets=late,listing --contrast_metrics=position_accuracy
"""
from configs.ablations import base as ablation_base


def get_config():
    """The toy ablation's budget (configs/ablations/base.py) with what this task changes."""
    c = ablation_base.get_config()
    c.text.max_length = 48  # The longest grid_late caption: 38 SmolLM2 tokens, 41 MiniLM ones.
    c.text.llms.minilm.layer = -1  # The minilm arm; the base sets SmolLM2's and Gemma's.
    c.text.llms.minilm.dtype = "float32"

    c.model.width = 96
    # 8 x 8 tokens on 32 px (4 x 4 per quadrant). Patch 8 (4 x 4 tokens, a 192-value patch
    # from a width-96 model) was tried to buy steps: after 700 steps it sampled noise (empty
    # slots 0.00, every slot "filled"), so patch 4 stays.
    c.model.position_embedding = "sincos"

    c.data.shapes_layout = "grid_late"
    c.data.shapes_num_records = 4352

    c.train.steps = 800
    c.train.log_every = 100
    c.train.sample_prompts = (
        "a large red circle and a small blue square, in the bottom right and top left "
        "respectively",
    )
    c.train.samples_per_prompt = 1

    c.eval.num_prompts = 256  # 32 per (object count, template): balanced by construction.
    c.eval.batch_size = 128
    return c
