"""The prompt template: system prompt + the paper's instruction + the caption -> LLM token ids.

LI-DiT feeds each frozen LLM `[system prompt] instruction prompt`, wrapped in the LLM's own chat
template where it has one (text.use_chat_template; plain text for base models such as Gemma 3
270M, whose tokenizer has no chat template), and later keeps only the prompt's own tokens
(refiner.py), so every example records where its prompt lies among its tokens.

How the span is found, for any BPE / SentencePiece tokenizer: the template is rendered once with a
sentinel in place of the prompt, which splits it into a fixed text prefix and suffix; each example
is tokenized as prefix + prompt + suffix with character offsets (fast tokenizers), and the prompt
tokens are those whose characters overlap the prompt's. A token that merges template characters
with the prompt's first or last characters (e.g. "·a" after the instruction's trailing space)
counts as a prompt token. Too-long prompts lose their last tokens, cut between characters (a
byte-level BPE spreads one CJK character or emoji over several tokens); the template never loses
any. An empty prompt (caption dropout, the unconditional pass of classifier-free guidance) has an
empty span and an all-False prompt_mask; the refiner then keeps one template token (refiner.py).
"""
import hashlib

import numpy as np
from absl import logging

PADDING_SIDES = ("left", "right")
# Private-use code points: no caption or template contains them.
_SENTINEL = "\ue000lidit-prompt\ue001"


class PromptTemplate:
    """Turns captions into fixed-length token ids, masks and prompt masks for one LLM.

    `PromptTemplate(tokenizer, instruction=..., use_instruction=..., system_prompt=...,
    use_chat_template=..., max_length=..., padding_side=...)`, or `from_config(config.text,
    tokenizer)`. `tokenizer` is a transformers fast tokenizer (offset mappings are needed).
    """

    def __init__(self, tokenizer, *, instruction, use_instruction, system_prompt,
                 use_chat_template, max_length, padding_side="right"):
        if padding_side not in PADDING_SIDES:
            raise ValueError(f"text.padding_side={padding_side!r}; known: {PADDING_SIDES}")
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no offset mapping (not a "
                             "fast tokenizer); give a folder with tokenizer.json or a GGUF file")
        self.tokenizer = tokenizer
        self.instruction = instruction if use_instruction else ""
        self.system_prompt = system_prompt
        # Base models (Gemma 3 270M) have no chat template: plain text then.
        self.chat_template = (getattr(tokenizer, "chat_template", None) if use_chat_template
                              else None)
        self.max_length = int(max_length)
        self.padding_side = padding_side
        self.pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id)
                            if i is not None), 0)
        self.prefix, self.suffix = self._render()
        self.truncated_count = 0
        template_tokens = len(self._tokenize([""])[0][0])
        if template_tokens > self.max_length:
            raise ValueError(
                f"the prompt template alone takes {template_tokens} tokens, more than "
                f"text.max_length={self.max_length}; raise text.max_length or shorten "
                "text.instruction / text.system_prompt")
        self.template_length = template_tokens

    @classmethod
    def from_config(cls, text_config, tokenizer):
        """From config.text: instruction, use_instruction, system_prompt, use_chat_template,
        max_length, padding_side."""
        t = text_config
        return cls(tokenizer, instruction=t.instruction, use_instruction=t.use_instruction,
                   system_prompt=t.system_prompt, use_chat_template=t.use_chat_template,
                   max_length=t.max_length, padding_side=t.padding_side)

    def _render(self):
        """(prefix, suffix): the template's text before and after the prompt."""
        content = self.instruction + _SENTINEL
        if self.chat_template:
            messages = [{"role": "user", "content": content}]
            if self.system_prompt:
                messages.insert(0, {"role": "system", "content": self.system_prompt})
            # Without a system message a template may insert its own default (SmolLM2 does);
            # that is the LLM's own convention, kept.
            text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=True)
        else:
            text = (self.system_prompt + "\n\n" if self.system_prompt else "") + content
        if text.count(_SENTINEL) != 1:
            raise ValueError("the chat template does not reproduce the user message verbatim; "
                             "set text.use_chat_template=False")
        return tuple(text.split(_SENTINEL))

    def _tokenize(self, prompts):
        """-> list of (ids, offsets [n, 2], (start, stop)) for prefix + prompt + suffix, before
        truncation; offsets are character offsets into that text ((0, 0) for special tokens)."""
        texts = [self.prefix + p + self.suffix for p in prompts]
        # A rendered chat template already holds its special tokens (BOS included); plain text
        # gets the tokenizer's own (e.g. Gemma's <bos>).
        encoded = self.tokenizer(texts, add_special_tokens=self.chat_template is None,
                                 return_offsets_mapping=True)
        out = []
        for prompt, ids, offsets in zip(prompts, encoded["input_ids"], encoded["offset_mapping"]):
            lo, hi = len(self.prefix), len(self.prefix) + len(prompt)
            offsets = np.asarray(offsets, np.int64).reshape(-1, 2)
            # Special tokens added by the tokenizer have empty (0, 0) offsets: never overlap.
            inside = (offsets[:, 0] < hi) & (offsets[:, 1] > lo) & (offsets[:, 1] > offsets[:, 0])
            if inside.any():
                where = np.flatnonzero(inside)
                span = (int(where[0]), int(where[-1]) + 1)
            else:  # Empty prompt: an empty span before the first template token after it.
                has_text = offsets[:, 1] > offsets[:, 0]
                after = np.flatnonzero(has_text & (offsets[:, 0] >= lo))
                before = np.flatnonzero(has_text & (offsets[:, 0] < lo))
                start = int(after[0]) if after.size else (
                    int(before[-1]) + 1 if before.size else len(ids))
                span = (start, start)
            out.append((list(ids), offsets, span))
        return out

    def encode_batch(self, prompts):
        """list of str -> one encoder's token inputs (host numpy; the text-state convention of
        train/inputs.py, "input_ids" in place of "states"): input_ids int32 [b, max_length],
        mask bool [b, max_length] (True on real tokens), prompt_mask bool [b, max_length] (True
        exactly on the prompt's tokens, one contiguous run; all False for an empty prompt)."""
        batch = len(prompts)
        input_ids = np.full((batch, self.max_length), self.pad_id, np.int32)
        mask = np.zeros((batch, self.max_length), bool)
        prompt_mask = np.zeros((batch, self.max_length), bool)
        for i, (prompt, (ids, offsets, (start, stop))) in enumerate(
                zip(prompts, self._tokenize(prompts))):
            excess = len(ids) - self.max_length
            if excess > 0:
                stop_kept = stop - excess
                # Cut between characters, not inside one spread over several byte tokens.
                while stop_kept > start and offsets[stop_kept, 0] < offsets[stop_kept - 1, 1]:
                    stop_kept -= 1
                if stop_kept < start:  # Template tokens alone never exceed it (__init__).
                    raise ValueError(f"prompt template needs more than text.max_length="
                                     f"{self.max_length} tokens; raise text.max_length")
                ids = ids[:stop_kept] + ids[stop:]
                self.truncated_count += 1
                # Logged at counts 1, 2, 4, 8, ...: a data set of long captions must not flood
                # the log; truncated_count keeps the exact number.
                if self.truncated_count & (self.truncated_count - 1) == 0:
                    logging.warning(
                        "prompt truncated to %d of its %d tokens (text.max_length=%d; %d prompts "
                        "truncated so far): %.80r", stop_kept - start, stop - start,
                        self.max_length, self.truncated_count, prompt)
                stop = stop_kept
            offset = self.max_length - len(ids) if self.padding_side == "left" else 0
            input_ids[i, offset:offset + len(ids)] = ids
            mask[i, offset:offset + len(ids)] = True
            prompt_mask[i, offset + start:offset + stop] = True
        return {"input_ids": input_ids, "mask": mask, "prompt_mask": prompt_mask}

    def description(self):
        """What identifies this template, for cache and checkpoint metadata (JSON-friendly)."""
        chat = self.chat_template or ""
        return {
            "instruction": self.instruction,
            "system_prompt": self.system_prompt,
            "use_chat_template": bool(self.chat_template),
            "chat_template_sha256": hashlib.sha256(chat.encode()).hexdigest() if chat else "",
            "max_length": self.max_length,
        }
