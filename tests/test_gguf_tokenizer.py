"""The torch-free GGUF tokenizer (lidit_jax.text.gguf_tokenizer) equals transformers'
`AutoTokenizer.from_pretrained(folder, gguf_file=...)` (which needs torch, from the test extra) on
SmolLM2-135M-Instruct (byte-level BPE, ChatML) and Gemma 3 270M (SentencePiece BPE, no chat
template): metadata, backend, special tokens, padding, chat template, and ids / offsets / masks on
a few hundred varied strings; and the runtime path imports neither torch nor diffusers."""
import random
import subprocess
import sys

import numpy as np
import pytest
import transformers
from transformers.integrations.gguf import get_gguf_tokenizer

from configs import common
from lidit_jax.text.gguf_tokenizer import tokenizer_metadata
from lidit_jax.text.models import default_model_path
from lidit_jax.text.tokenizer import PromptTemplate
from lidit_jax.text.weights import GGUFFile
from train_helpers import ROOT, child_env

# Hand-picked edge cases: whitespace runs, tabs / newlines, digits, unicode, emoji (ZWJ, skin
# tone, flags), CJK, literal special tokens, byte-fallback characters.
CASES = [
    "", " ", "  ", "     ", "\t", "\n", "\n\n", "\r\n", " \t \n ", "a", "a b", "a  b", "a   b",
    "  leading", "trailing  ", "\ttab\tseparated\t", "line one\nline two\n\nline four",
    "0", "7", "42", "123", "1234", "12345678901234567890", "3.14159", "1,000,000", "-0.5e-10",
    "2024-06-17 12:34:56", "v1.2.3", "#ff00aa", "x1y22z333",
    "café naïve über façade", "Ελληνικά", "Русский текст", "العربية", "हिन्दी", "ไทย",
    "日本語の猫", "中文字符测试", "한국어 문장", "ｆｕｌｌｗｉｄｔｈ", "\u3000ideographic space",
    "🎉", "🐱🐶", "👍🏽", "👩‍👩‍👧‍👦", "🇯🇵🇫🇷", "❤️", "a\u200bb", "a\u00a0b", "e\u0301", "\ufffd",
    "\ue000private\ue001", "\U0001f9ea\U0001fae0", "<|im_start|>", "<|im_end|>",
    "<|im_start|>user\nhi<|im_end|>", "<bos>", "<eos>", "<start_of_turn>user\nhi<end_of_turn>",
    "<pad><unk><mask>", "<think>x</think>", "```python\nprint('hi')\n```", "{{ x }} {% if %}",
    "https://example.com/a?b=1&c=%20", "don't won't I'm you're we've they'll he'd",
    "ALL CAPS SHOUTING", "MiXeD cAsE", "!!!???...", "(parens) [brackets] {braces}",
    "a red cube on the left of a small blue sphere",
    common.PAPER_INSTRUCTION + "a red cube on the left of a small blue sphere",
]
PIECES = [
    "a", "the", "cube", " sphere", "red", "Blue", "triangle's", "over", "and", "3", "17",
    "2048", "0.25", "x2", " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", "\u00a0", "\u3000", ",",
    ".", "!", "?", ":", "-", "'", '"', "/", "#", "%", "é", "ß", "Ω", "ж", "ي", "क", "猫", "日本",
    "中文", "한", "ｶ", "😀", "🚀", "👍🏽", "👨‍💻", "🇩🇪", "♥", "∑", "→", "½", "<|im_end|>",
    "<bos>", "<start_of_turn>", "\u200b", "e\u0301",
]
MODELS = ["smollm2", pytest.param("gemma3", marks=pytest.mark.slow)]  # Gemma 3 loads in 20-50 s.


def varied_strings(count=300, seed=0):
    """CASES plus `count` seeded random mixes of PIECES (joined by nothing, spaces or newlines)."""
    rng = random.Random(seed)
    mixes = ["".join(rng.choice(["", "", " ", "\n"]) + rng.choice(PIECES)
                     for _ in range(rng.randint(1, 12))) for _ in range(count)]
    return CASES + mixes


@pytest.fixture(scope="module", params=MODELS)
def pair(request):
    """(GGUFFile, ours, transformers'): loading Gemma 3's 262k vocabulary takes 10-30 s each."""
    source = GGUFFile(default_model_path(request.param))
    path = source.path
    reference = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return source, source.tokenizer(), reference


def test_metadata_equals_transformers(pair):
    source, _, _ = pair
    assert tokenizer_metadata(source.reader) == get_gguf_tokenizer(str(source.path))


def test_backend_and_special_tokens_equal(pair):
    _, ours, reference = pair
    assert type(ours) is type(reference)
    # The whole tokenizers pipeline: model, vocabulary, merges, added tokens, normalizer,
    # pre-tokenizer, post-processor, decoder.
    assert ours.backend_tokenizer.to_str() == reference.backend_tokenizer.to_str()
    for attribute in ("special_tokens_map", "all_special_tokens", "all_special_ids",
                      "bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id",
                      "padding_side", "truncation_side", "model_max_length", "chat_template",
                      "add_bos_token", "add_eos_token", "added_tokens_decoder"):
        assert getattr(ours, attribute) == getattr(reference, attribute), attribute
    assert ours.is_fast and len(ours) == len(reference)


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encodings_equal_on_varied_strings(pair, add_special_tokens):
    _, ours, reference = pair
    texts = varied_strings()
    assert len(texts) > 300
    got = ours(texts, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    want = reference(texts, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    for key in ("input_ids", "attention_mask", "offset_mapping"):
        for text, a, b in zip(texts, got[key], want[key]):
            assert a == b, (key, text)
    assert ours.batch_decode(got["input_ids"]) == reference.batch_decode(want["input_ids"])


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_equal(pair, side):
    _, ours, reference = pair
    texts = varied_strings(count=40, seed=1)
    got = ours(texts, padding=True, padding_side=side, return_tensors="np")
    want = reference(texts, padding=True, padding_side=side, return_tensors="np")
    np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
    np.testing.assert_array_equal(got["attention_mask"], want["attention_mask"])
    lengths = want["attention_mask"].sum(1)
    assert lengths.min() < lengths.max()  # Padding happened.


CONVERSATIONS = [
    [{"role": "user", "content": "a red cube"}],
    [{"role": "system", "content": "You draw."}, {"role": "user", "content": "日本語 🎉\n\tx"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello  there"},
     {"role": "user", "content": common.PAPER_INSTRUCTION + "two   spheres"}],
]


@pytest.mark.parametrize("generation_prompt", [True, False])
def test_chat_template_equal(pair, generation_prompt):
    source, ours, reference = pair
    if reference.chat_template is None:  # Gemma 3 270M is a base model: no template.
        assert ours.chat_template is None and source.config.is_gemma
        return
    for messages in CONVERSATIONS:
        for tokenize in (False, True):
            kwargs = dict(tokenize=tokenize, add_generation_prompt=generation_prompt)
            assert (ours.apply_chat_template(messages, **kwargs)
                    == reference.apply_chat_template(messages, **kwargs)), messages


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("use_instruction", [True, False])
def test_prompt_template_equal(pair, side, use_instruction):
    """The project's prompt template (configs/common.py text.*): same ids and masks."""
    _, ours, reference = pair
    config = common.get_config().text
    config.update(padding_side=side, use_instruction=use_instruction, max_length=96)
    prompts = varied_strings(count=60, seed=2)
    got = PromptTemplate.from_config(config, ours).encode_batch(prompts)
    want = PromptTemplate.from_config(config, reference).encode_batch(prompts)
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


# Run in child_env(): torch, diffusers and accelerate cannot be imported (tests/without_torch).
_WITHOUT_TORCH = """
import importlib, pkgutil, sys
import lidit_jax
for module in pkgutil.walk_packages(lidit_jax.__path__, "lidit_jax."):
    importlib.import_module(module.name)
from configs import common
from lidit_jax.text import models, tokenizer, weights
source = weights.open_source(models.default_model_path("smollm2"))
template = tokenizer.PromptTemplate.from_config(common.get_config().text, source.tokenizer())
assert template.encode_batch(["a red cube", ""])["prompt_mask"][0].any()
loaded = sorted(m for m in sys.modules if m.partition(".")[0] in ("torch", "diffusers"))
assert not loaded, loaded
"""


def test_runtime_path_needs_no_torch():
    """Every lidit_jax module imports, and the SmolLM2 GGUF tokenizer encodes, with torch and
    diffusers hidden (CI's fresh-venv demo run checks the same on a real install)."""
    result = subprocess.run([sys.executable, "-c", _WITHOUT_TORCH], capture_output=True,
                            text=True, timeout=300, cwd=ROOT, env=child_env())
    assert result.returncode == 0, result.stderr[-3000:]
