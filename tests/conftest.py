"""Test setup: 8 fake CPU devices, CPU only, absl flags parsed (Grain workers need them).

XLA_FLAGS must be set before JAX is imported anywhere, which is why this lives in conftest.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu is installed for AOT; never probe a TPU.
# AOT tests load libtpu (no chip is touched); two xdist workers may do so at once, which libtpu's
# single-process lockfile (/tmp/libtpu_lockfile) would otherwise refuse.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")  # fp32 parity tests on CPU.

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory):
    """A random Llama (2 layers, width 32) + SmolLM2's tokenizer, as a Hugging Face folder:
    a real tokenizer and template at a cost of milliseconds per encoded batch."""
    import torch
    import transformers

    from lidit_jax.text import models

    gguf = models.default_model_path("smollm2")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_llm")
    transformers.LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_args(tiny_llm, tmp_path_factory):
    """The tiny CLI config's overrides (train_helpers.TINY on `tiny_llm`), with the text cache
    filled once per session by --mode=encode: every end-to-end module trains from this cache.
    One JAX compilation cache serves every tiny run of this session (worker): a child compiles
    what no earlier child compiled, not the whole program set again (a run that must compile
    names its own train.compilation_cache_dir after these)."""
    import re

    from train_helpers import TINY, run_main

    cache = tmp_path_factory.mktemp("text_cache")
    args = (*TINY, f"--config.text.llms.smollm2.path={tiny_llm}",
            "--config.text.llms.smollm2.width=0",
            f"--config.text.cache_dir={cache}",
            f"--config.train.compilation_cache_dir={tmp_path_factory.mktemp('compile_cache')}")
    result = run_main(tmp_path_factory.mktemp("encode"), "encode", *args)
    assert re.search(r"text_cache=\S+ records=64 written=64", result.stdout), result.stdout
    return args
