"""Test setup: 8 fake CPU devices, CPU only, absl flags parsed (Grain workers need them).

XLA_FLAGS must be set before JAX is imported anywhere, which is why this lives in conftest.
"""
import os

from cpu_flags import xla_flags

_USER_XLA_FLAGS = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = f"{_USER_XLA_FLAGS} {xla_flags(8)}".strip()
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
# XLA:CPU reads XLA_FLAGS once, at the process's first compile; libtpu (the TPU-topology
# compiles) reads it when it starts and refuses XLA:CPU's own flags (cpu_flags.py).
jax.jit(lambda x: x + 1)(0.0)
os.environ["XLA_FLAGS"] = f"{_USER_XLA_FLAGS} {xla_flags(8, libtpu=True)}".strip()

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


@pytest.fixture(scope="module")
def tpu_compile_precision():
    """JAX's own matmul precision for a module's TPU compiles, as `--mode=compile` and a pod
    run compile: under the "highest" set above (float32 parity on CPU) libtpu lowers every
    float32 matmul as several bf16 passes, a program no run compiles, which took twice as long
    to compile (the demo step's compile report: 135 s against 73 s)."""
    with jax.default_matmul_precision("default"):
        yield


@pytest.fixture(scope="session")
def compilation_cache(tmp_path_factory):
    """One JAX persistent compilation cache for the child runs of the whole test run, shared by
    the xdist workers: a child compiles what no earlier child compiled (the tiny train step, a
    sampler, a restore), not the whole program set again. Not for the tests' own process: the
    programs that close over pretrained weights would each write and compress hundreds of MB
    (docs/performance.md, "The test suite")."""
    run_dir = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        run_dir = run_dir.parent  # Each worker's basetemp is popen-gwN inside the run's folder.
    directory = run_dir / "jax_compilation_cache"
    directory.mkdir(exist_ok=True)
    return directory


@pytest.fixture(scope="session")
def tiny_args(tiny_llm, tmp_path_factory, compilation_cache):
    """The tiny CLI config's overrides (train_helpers.TINY on `tiny_llm`), with the text cache
    filled once per session by --mode=encode: every end-to-end module trains from this cache.
    The child runs share the test run's compilation cache: a child compiles what no earlier
    child compiled, not the whole program set again (a run that must compile names its own
    train.compilation_cache_dir after these)."""
    import re

    from train_helpers import TINY, run_main

    cache = tmp_path_factory.mktemp("text_cache")
    args = (*TINY, f"--config.text.llms.smollm2.path={tiny_llm}",
            "--config.text.llms.smollm2.width=0",
            f"--config.text.cache_dir={cache}",
            f"--config.train.compilation_cache_dir={compilation_cache}")
    result = run_main(tmp_path_factory.mktemp("encode"), "encode", *args)
    assert re.search(r"text_cache=\S+ records=64 written=64", result.stdout), result.stdout
    return args


def pytest_collection_modifyitems(items):
    """Modules with a slow test run first, each module's tests kept together.

    The longest tests starting early keep both xdist workers busy to the end instead of one
    finishing a 4-minute test alone; whole modules move so that a module-scoped fixture (an AOT
    compile, a GCS emulator) is still built once per worker. Every worker sorts the same
    collection the same way, as xdist requires.
    """
    has_slow = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module.__name__ not in has_slow)
