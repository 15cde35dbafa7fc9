"""The one FLOP count of a train step (DiT + text refiners), for throughput and MFU.

Model FLOPs, not hardware FLOPs: a train step is 3x the forward pass's matmul FLOPs (the
backward computes the gradients of both operands of every matmul, 2x the forward), whatever the
remat policy recomputes; element-wise work (norms, softmax, activations) is left out. A matmul of
[m, k] by [k, n] is 2 m k n. Checked against XLA's cost analysis of the compiled step in
tests/test_flops.py (within 10 %), and by every `--mode=compile` report (`lidit_jax.aot`, loops
counted: LI-DiT-1B on v5p 4x4x4, 1.006x).

Forward, per example, with N = image tokens (H W / p^2), M = text tokens the DiT attends to,
d = width, r = mlp_ratio, per DiT block:
  self-attention   q, k, v, o: 4 * 2 N d^2      scores and weighted sum: 2 * 2 N^2 d
  cross-attention  q, o: 2 * 2 N d^2   k, v: 2 * 2 M d^2   scores and sum: 2 * 2 N M d
  FFN              2 * 2 N d (r d)
  modulation       2 d (9 d)  (once per example, from c)
plus the patch embedding, the position ResBlock (two 3x3 convs: 2 * 2 N 9 d^2), the final
layer and the timestep MLP; the text side is counted by `refiner_forward_flops`.
"""


def _attention_flops(q_len, kv_len, width):
    """Projections q, o on the queries; k, v on the keys; scores and weighted sum."""
    return 2 * 2 * q_len * width**2 + 2 * 2 * kv_len * width**2 + 2 * 2 * q_len * kv_len * width


def _ffn_flops(tokens, width, mlp_ratio):
    return 2 * 2 * tokens * width * int(width * mlp_ratio)


def dit_forward_flops(model_config, in_channels, hw, context_len):
    """Forward matmul FLOPs of the DiT (without the text side) for one example of size `hw`."""
    m = model_config
    d, p = m.width, m.patch_size
    tokens = (hw[0] // p) * (hw[1] // p)
    patch_features = p * p * in_channels
    block = (_attention_flops(tokens, tokens, d)
             + _attention_flops(tokens, context_len, d)
             + _ffn_flops(tokens, d, m.mlp_ratio)
             + 2 * d * 9 * d)
    timestep = 2 * 256 * d + 2 * d * d  # TimestepEmbedder: 256 frequencies -> d -> d.
    patch_embed = 2 * tokens * patch_features * d
    # Only the ResBlock costs matmuls; sin-cos and rotary codes are elementwise.
    position = 2 * (2 * tokens * 9 * d * d) if "resblock" in m.position_embedding else 0
    final = 2 * d * 2 * d + 2 * tokens * d * patch_features
    return m.depth * block + timestep + patch_embed + position + final


def refiner_forward_flops(text_config, llm_widths, width, text_lengths):
    """Forward matmul FLOPs of the text conditioner for one example.

    Per LLM k with L_k tokens of width w_k (`lidit_jax.text.refiner`): the input projection
    (2 L_k w_k d) and the pooled text vector's projection (2 w_k d), then `text.refiner.depth`
    blocks of bidirectional self-attention + FFN with 2 gates from c; with collaborative
    fusion, `collaborative.depth` blocks where each branch cross-attends to the other branches'
    tokens, + FFN, with shift/scale/gate for both (6 vectors from c; the FFN's 3 alone when
    there is one branch).
    """
    d = width
    total_len = sum(text_lengths)
    gates = 2 * d * 2 * d if text_config.refiner.gating else 0
    flops = 0
    for w, length in zip(llm_widths, text_lengths):
        flops += 2 * length * w * d + 2 * w * d
        per_block = (_attention_flops(length, length, d)
                     + _ffn_flops(length, d, text_config.refiner.mlp_ratio) + gates)
        flops += text_config.refiner.depth * per_block
        if text_config.fusion == "collaborative":
            cross_attention = len(llm_widths) > 1
            per_block = (_ffn_flops(length, d, text_config.collaborative.mlp_ratio)
                         + 2 * d * (6 if cross_attention else 3) * d)
            if cross_attention:
                per_block += _attention_flops(length, total_len - length, d)
            flops += text_config.collaborative.depth * per_block
    return flops


def train_step_flops(config, llm_widths, *, batch, hw, text_lengths, in_channels,
                     context_len=None):
    """FLOPs of one train step: 3 x forward matmul FLOPs of DiT + refiners, for `batch` examples.

    Args:
      config: the run config (model, text).
      llm_widths: hidden size of each LLM branch; text_lengths: tokens per branch (max_length).
      batch: global batch size; hw: (H, W) of x (latent or pixel); in_channels: its channels.
      context_len: text tokens the DiT cross-attends to; default sum(text_lengths) (the refined
        branches concatenated on the token axis, instruction tokens masked, not removed).
    """
    context_len = sum(text_lengths) if context_len is None else context_len
    forward = (dit_forward_flops(config.model, in_channels, hw, context_len)
               + refiner_forward_flops(config.text, llm_widths, config.model.width, text_lengths))
    return 3 * batch * forward
