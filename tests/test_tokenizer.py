"""Prompt template and prompt-span bookkeeping (lidit_jax.text.tokenizer) on the real GGUF
tokenizers of SmolLM2-135M-Instruct (ChatML chat template) and Gemma 3 270M (base: plain text)."""
import numpy as np
import pytest

from configs import common
from lidit_jax.text import weights
from lidit_jax.text.models import default_model_path
from lidit_jax.text.tokenizer import PromptTemplate

PROMPTS = [
    "a red cube on the left of a small blue sphere",
    "   leading spaces, punctuation!? (and \"quotes\"); done.",
    "café naïve über 日本語の猫 🎉🐱 emoji",
    "",
]


@pytest.fixture(scope="module", params=["smollm2", pytest.param("gemma3", marks=pytest.mark.slow)])
def tokenizer(request):
    """The tokenizer a run builds from the GGUF file (test_gguf_tokenizer: equal to
    transformers' own GGUF tokenizer, which is slower to build: docs/performance.md)."""
    return weights.open_source(default_model_path(request.param)).tokenizer()


def make(tokenizer, **overrides):
    config = common.get_config().text
    config.update(overrides)
    return PromptTemplate.from_config(config, tokenizer)


def prompt_span(encoded, i):
    """[start, stop) of row i's prompt tokens: its prompt mask is one contiguous run."""
    where = np.flatnonzero(encoded["prompt_mask"][i])
    assert where.size and (np.diff(where) == 1).all(), encoded["prompt_mask"][i]
    return int(where[0]), int(where[-1]) + 1


def decoded_span(template, encoded, i):
    start, stop = prompt_span(encoded, i)
    return template.tokenizer.decode(encoded["input_ids"][i, start:stop])


def check_span_text(template, prompt, text):
    """The span decodes to the prompt, plus at most a merged tail of the template's prefix (the
    instruction's trailing space joins the prompt's first token)."""
    assert text.endswith(prompt), (prompt, text)
    assert template.prefix.endswith(text[:len(text) - len(prompt)]), (prompt, text)


def test_span_decodes_to_the_prompt(tokenizer):
    template = make(tokenizer)
    encoded = template.encode_batch(PROMPTS)
    assert encoded["input_ids"].shape == (len(PROMPTS), 128)
    assert set(encoded) == {"input_ids", "mask", "prompt_mask"}  # One encoder's token inputs.
    assert encoded["input_ids"].dtype == np.int32
    assert encoded["mask"].dtype == bool and encoded["prompt_mask"].dtype == bool
    for i, prompt in enumerate(PROMPTS):
        if prompt:  # The empty prompt has no prompt tokens (below).
            check_span_text(template, prompt, decoded_span(template, encoded, i))
        # The whole sequence is the tokenizer's own special tokens + prefix + prompt + suffix.
        real = encoded["input_ids"][i][encoded["mask"][i]]
        bos = "" if tokenizer.chat_template else (tokenizer.bos_token or "")
        assert tokenizer.decode(real) == bos + template.prefix + prompt + template.suffix
    assert template.truncated_count == 0
    empty = len(PROMPTS) - 1
    assert not encoded["prompt_mask"][empty].any()
    assert int(encoded["mask"][empty].sum()) == template.template_length


def test_template_uses_chat_template_only_where_there_is_one(tokenizer):
    template = make(tokenizer)
    description = template.description()
    assert description["use_chat_template"] == bool(tokenizer.chat_template)
    assert description["instruction"] == common.PAPER_INSTRUCTION
    if tokenizer.chat_template:  # SmolLM2: ChatML.
        assert template.prefix.startswith("<|im_start|>system\n")
        assert "<|im_start|>user\n" + common.PAPER_INSTRUCTION in template.prefix
        assert template.suffix == "<|im_end|>\n<|im_start|>assistant\n"
        assert len(description["chat_template_sha256"]) == 64
        plain = make(tokenizer, use_chat_template=False, system_prompt="Be precise.")
        assert plain.prefix == "Be precise.\n\n" + common.PAPER_INSTRUCTION
        system = make(tokenizer, system_prompt="Be precise.")
        assert "<|im_start|>system\nBe precise.<|im_end|>" in system.prefix
    else:  # Gemma 3 base: plain text after the tokenizer's <bos>.
        assert template.prefix == common.PAPER_INSTRUCTION and template.suffix == ""
        assert description["chat_template_sha256"] == ""
    bare = make(tokenizer, use_instruction=False)
    assert bare.description()["instruction"] == ""
    assert common.PAPER_INSTRUCTION not in bare.prefix
    assert bare.template_length < template.template_length
    encoded = bare.encode_batch(PROMPTS[:1])
    check_span_text(bare, PROMPTS[0], decoded_span(bare, encoded, 0))


def test_truncation_keeps_the_template(tokenizer):
    long_prompt = " ".join(f"a red cube number {i} next to a blue ball" for i in range(20))
    template = make(tokenizer, max_length=make(tokenizer).template_length + 7)
    encoded = template.encode_batch([long_prompt, PROMPTS[0][:5]])
    assert template.truncated_count == 1
    assert encoded["mask"][0].all()
    start, stop = prompt_span(encoded, 0)
    assert stop - start >= 7  # The free slots (+ a template token merged into the first).
    text = decoded_span(template, encoded, 0)
    head = text[len(text) - len(text.lstrip()):]
    assert long_prompt.startswith(head) and len(head) > 10
    # The suffix (end of turn, assistant header) survives: the same tokens as untruncated.
    suffix_len = template.max_length - stop
    full = make(tokenizer, max_length=512).encode_batch([long_prompt])
    full_stop = prompt_span(full, 0)[1]
    np.testing.assert_array_equal(encoded["input_ids"][0, stop:],
                                  full["input_ids"][0, full_stop:full_stop + suffix_len])
    np.testing.assert_array_equal(encoded["input_ids"][0, :start], full["input_ids"][0, :start])
    template.encode_batch([long_prompt])
    assert template.truncated_count == 2


def test_truncation_boundary_cuts_between_characters(tokenizer):
    """max_length = the exact length: untouched; each token less: the prompt loses its tail,
    never inside a character (SmolLM2's byte-level BPE spreads CJK and emoji over 2-3 tokens)."""
    for prompt in PROMPTS[:-1]:
        full = make(tokenizer, max_length=512)
        whole = full.encode_batch([prompt])
        length = int(whole["mask"][0].sum())
        whole_text = decoded_span(full, whole, 0)
        kept = []
        for cut in range(0, 6):
            template = make(tokenizer, max_length=length - cut)
            encoded = template.encode_batch([prompt])
            assert template.truncated_count == (cut > 0)
            text = decoded_span(template, encoded, 0)
            assert "\ufffd" not in text and whole_text.startswith(text), (prompt, cut, text)
            real = int(encoded["mask"][0].sum())
            assert real <= length - cut
            # The template's suffix is intact: the tokens after the span match the full ones.
            stop, whole_stop = prompt_span(encoded, 0)[1], prompt_span(whole, 0)[1]
            np.testing.assert_array_equal(encoded["input_ids"][0, stop:real],
                                          whole["input_ids"][0, whole_stop:length])
            kept.append(len(text))
        assert kept[0] == len(whole_text) and kept == sorted(kept, reverse=True)
        assert kept[-1] < kept[0]


def test_template_too_long_names_the_key(tokenizer):
    length = make(tokenizer).template_length
    with pytest.raises(ValueError, match="text.max_length"):
        make(tokenizer, max_length=length - 1)
    make(tokenizer, max_length=length).encode_batch([""])  # Exactly fits: fine.


def test_padding_sides_hold_the_same_tokens(tokenizer):
    right = make(tokenizer, padding_side="right").encode_batch(PROMPTS)
    left = make(tokenizer, padding_side="left").encode_batch(PROMPTS)
    pad = make(tokenizer).pad_id
    for i in range(len(PROMPTS)):
        n = int(right["mask"][i].sum())
        assert right["mask"][i, :n].all() and not right["mask"][i, n:].any()
        assert left["mask"][i, -n:].all() and not left["mask"][i, :-n].any()
        np.testing.assert_array_equal(left["input_ids"][i, -n:], right["input_ids"][i, :n])
        assert (right["input_ids"][i, n:] == pad).all()
        np.testing.assert_array_equal(left["prompt_mask"][i, -n:], right["prompt_mask"][i, :n])
    with pytest.raises(ValueError, match="text.padding_side"):
        make(tokenizer, padding_side="middle")
