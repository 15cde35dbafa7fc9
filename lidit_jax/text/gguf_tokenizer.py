"""The tokenizer a GGUF file describes, built without PyTorch.

    tokenizer = gguf_tokenizer(gguf.GGUFReader(path))   # what GGUFFile.tokenizer() returns

transformers builds it with `AutoTokenizer.from_pretrained(folder, gguf_file=name)`, but its GGUF
metadata reader imports torch (transformers 5.24, integrations/gguf/reader.py), which only the test
extra installs. The builders that turn that metadata into a `tokenizers` backend
(integrations/gguf/gguf_tokenizer_mapping.py: vocabulary, merges, pre-tokenizer split, control and
user-defined tokens) need no torch. Here the `gguf` package reads the metadata, transformers' own
builders make the backend, and it is wrapped in the class AutoTokenizer picks for the architecture,
so the result is the same tokenizer: tests/test_gguf_tokenizer.py compares the metadata, ids,
offsets, special tokens, padding and chat template with AutoTokenizer's on SmolLM2 and Gemma 3.
"""
from transformers import TokenizersBackend
from transformers.integrations.gguf.gguf_tokenizer_mapping import (GGUF_TOKENIZER_MAPPING,
                                                                    convert_gguf_tokenizer)
from transformers.models.auto.tokenization_auto import (TOKENIZER_MAPPING_NAMES,
                                                        tokenizer_class_from_name)

# transformers' tokenizer attribute -> GGUF metadata key of its token id (get_gguf_tokenizer).
_SPECIAL_TOKEN_IDS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}


def tokenizer_metadata(reader):
    """gguf.GGUFReader -> (architecture, tokenizer_dict, tokenizer_config), the three values
    transformers' `get_gguf_tokenizer(path)` returns for the same file (tests compare them)."""
    fields = reader.fields

    def value(key):
        return fields[key].contents() if key in fields else None

    architecture = value("general.architecture")
    grouped = {group: {name: value(f"tokenizer.{key}") for key, name in renames.items()
                       if f"tokenizer.{key}" in fields}
               for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    tokenizer_dict, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
    if "tokens" not in tokenizer_dict:
        raise ValueError("the GGUF file has no tokenizer.ggml.tokens: it carries no tokenizer")
    # As get_gguf_tokenizer: llama.cpp adds BOS to a SentencePiece vocabulary unless the file
    # says otherwise; Gemma 4's chat template writes its own <bos>.
    kind = tokenizer_dict.get("tokenizer_type")
    if kind == "llama":
        tokenizer_config.setdefault("add_bos_token", True)
    elif kind == "gemma4":
        tokenizer_config["add_bos_token"] = False
    for name, key in _SPECIAL_TOKEN_IDS.items():
        token_id = value(key)
        tokenizer_config[name] = None if token_id is None else tokenizer_dict["tokens"][token_id]
    return architecture, tokenizer_dict, tokenizer_config


def gguf_tokenizer(reader):
    """gguf.GGUFReader -> transformers fast tokenizer (TokenizersBackend or the subclass
    AutoTokenizer uses for the architecture, e.g. GemmaTokenizer, which pads on the left)."""
    architecture, tokenizer_dict, tokenizer_config = tokenizer_metadata(reader)
    backend, extra_kwargs = convert_gguf_tokenizer(architecture, tokenizer_dict)
    class_name = TOKENIZER_MAPPING_NAMES.get(architecture)
    cls = (class_name and tokenizer_class_from_name(class_name)) or TokenizersBackend
    return cls(tokenizer_object=backend, **tokenizer_config, **extra_kwargs)
