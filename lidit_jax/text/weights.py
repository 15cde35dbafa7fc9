"""Loads a frozen text encoder from a Hugging Face folder or a GGUF file into its Flax module:
`decoder.DecoderLM` (LLMs and multimodal language towers), `bert.BertEncoder`, `t5.T5Encoder`,
chosen by config.json's model_type.

    llm = load_llm("default:smollm2" resolved, or "/models/Llama-3.1-8B", dtype=jnp.bfloat16,
                   mesh=mesh, rules=config.mesh.rules)

Both sources serve tensors under their Hugging Face names and conventions ([out, in] kernels,
Gemma norm weights w): the GGUF reader finds each tensor through the gguf package's own name
table (gguf.get_tensor_name_map, the one llama.cpp's converter writes with), dequantizes every
type gguf.quants can, undoes llama.cpp's q/k row permutation for Llama files and subtracts
Gemma's stored 1 + w. Tensors are read lazily (memory maps); each parameter (one name, all
layers stacked) is converted, placed on the devices with the NamedSharding its logical axes get
from the rules table, and dropped from host memory before the next, so the host never holds more
than one parameter of the model.
"""
import functools
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lidit_jax.fingerprint import file_fingerprint
from lidit_jax.parallel import sharding
from lidit_jax.text import bert, decoder, t5
from lidit_jax.text.decoder import DecoderLM, LLMConfig
from lidit_jax.text.llm import LLM

SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3")
SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                      "BF16": jnp.bfloat16}


# ---- Parameter table: our variable <- Hugging Face tensor ---------------------------------------

def _parameter_sources(config):
    """variable path -> (HF tensor name, with {i} for the layer, HF shape, HF array -> ours)."""
    e, h, kv, d, f, vocab = (config.hidden_size, config.num_heads, config.num_kv_heads,
                             config.head_dim, config.intermediate_size, config.vocab_size)
    layer = "model.layers.{i}."

    def qkv(heads):
        return lambda w: w.T.reshape(e, heads, d)

    sources = {
        ("embed",): ("model.embed_tokens.weight", (vocab, e), None),
        ("final_norm",): ("model.norm.weight", (e,), None),
        ("layers", "attn_norm"): (layer + "input_layernorm.weight", (e,), None),
        ("layers", "q"): (layer + "self_attn.q_proj.weight", (h * d, e), qkv(h)),
        ("layers", "k"): (layer + "self_attn.k_proj.weight", (kv * d, e), qkv(kv)),
        ("layers", "v"): (layer + "self_attn.v_proj.weight", (kv * d, e), qkv(kv)),
        ("layers", "o"): (layer + "self_attn.o_proj.weight", (e, h * d),
                          lambda w: w.T.reshape(h, d, e)),
        ("layers", "gate"): (layer + "mlp.gate_proj.weight", (f, e), np.transpose),
        ("layers", "up"): (layer + "mlp.up_proj.weight", (f, e), np.transpose),
        ("layers", "down"): (layer + "mlp.down_proj.weight", (e, f), np.transpose),
    }
    if not config.tie_word_embeddings:
        sources[("lm_head",)] = ("lm_head.weight", (vocab, e), np.transpose)
    if config.qkv_bias:
        for name, heads in (("q", h), ("k", kv), ("v", kv)):
            sources[("layers", f"{name}_bias")] = (
                layer + f"self_attn.{name}_proj.bias", (heads * d,),
                lambda b, heads=heads: b.reshape(heads, d))
    if config.o_bias:
        sources[("layers", "o_bias")] = (layer + "self_attn.o_proj.bias", (e,), None)
    if config.qk_norm:
        sources.update({
            ("layers", "q_norm"): (layer + "self_attn.q_norm.weight", (d,), None),
            ("layers", "k_norm"): (layer + "self_attn.k_norm.weight", (d,), None),
        })
    if config.is_gemma:
        sources.update({
            ("layers", "mlp_norm"): (layer + "pre_feedforward_layernorm.weight", (e,), None),
            ("layers", "attn_post_norm"): (layer + "post_attention_layernorm.weight", (e,), None),
            ("layers", "mlp_post_norm"): (layer + "post_feedforward_layernorm.weight", (e,), None),
        })
    else:
        sources[("layers", "mlp_norm")] = (layer + "post_attention_layernorm.weight", (e,), None)
    return sources


def config_from_hf(raw, name="model", where="config.json"):
    """A Hugging Face config.json dict -> the config of the family its model_type names."""
    model_type = raw.get("model_type")
    if model_type in bert.SUPPORTED_HF_MODEL_TYPES:
        return bert.BertConfig.from_hf(raw, name=name, where=where)
    if model_type in t5.SUPPORTED_HF_MODEL_TYPES:
        return t5.T5Config.from_hf(raw, name=name, where=where)
    if model_type in (*decoder.SUPPORTED_HF_MODEL_TYPES, *decoder.MULTIMODAL_HF_MODEL_TYPES):
        return LLMConfig.from_hf(raw, name=name, where=where)
    supported = sorted({*decoder.SUPPORTED_HF_MODEL_TYPES, *decoder.MULTIMODAL_HF_MODEL_TYPES,
                        *bert.SUPPORTED_HF_MODEL_TYPES, *t5.SUPPORTED_HF_MODEL_TYPES})
    raise ValueError(f"{where}: model_type {model_type!r} (architectures "
                     f"{raw.get('architectures')}) is not supported; supported model types: "
                     f"{supported}")


def model_family(config):
    """config -> (module class, parameter table) of its family."""
    if isinstance(config, bert.BertConfig):
        return bert.BertEncoder, bert.parameter_sources(config)
    if isinstance(config, t5.T5Config):
        return t5.T5Encoder, t5.parameter_sources(config)
    return DecoderLM, _parameter_sources(config)


# model_type -> (stored prefix, our prefix) pairs: where a checkpoint keeps, under other names,
# tensors we read. A name stored under our own spelling wins over a renamed one.
_STORED_PREFIXES = {
    # T5EncoderModel folders of some published checkpoints keep the shared embedding under the
    # encoder's name only.
    **{model_type: (("encoder.embed_tokens.", "shared."),)
       for model_type in t5.SUPPORTED_HF_MODEL_TYPES},
    # Multimodal models: the language tower, as published (language_model.model.*, LLaVA) or
    # as transformers 5 saves it (model.language_model.*); Qwen2-VL publishes it as model.*.
    # Vision tower and projector tensors are never read.
    **{model_type: (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                    ("model.language_model.", "model."))
       for model_type in decoder.MULTIMODAL_HF_MODEL_TYPES},
}


# ---- Hugging Face folders -----------------------------------------------------------------------

def _safetensors_header(path):
    """name -> (dtype, shape, byte offset, byte end) of one .safetensors file, bounds checked."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path}: not a safetensors file ({size} bytes)")
        header_len = int.from_bytes(prefix, "little")
        if header_len > size - 8:
            raise ValueError(f"{path}: header of {header_len} bytes exceeds the file ({size} "
                             "bytes); the file is truncated or not safetensors")
        header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    table = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        if data_start + end > size:
            raise ValueError(f"{path}: tensor {name!r} ends at byte {data_start + end} but the "
                             f"file has {size}; the file is truncated, download it again")
        table[name] = (info["dtype"], tuple(info["shape"]), data_start + start, data_start + end)
    return table


class HuggingFaceFolder:
    """A folder with config.json and one or many .safetensors files (with or without an index)."""

    def __init__(self, folder):
        self.folder = pathlib.Path(folder)
        config_path = self.folder / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(
                f"{self.folder}: no config.json; an LLM path must be a Hugging Face folder "
                "(config.json + *.safetensors) or a .gguf file")
        raw = json.loads(config_path.read_text())
        self.config = config_from_hf(raw, name=self.folder.name, where=str(config_path))
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            self.files = [self.folder / n for n in names]
        else:
            self.files = sorted(self.folder.glob("*.safetensors"))
        if not self.files:
            raise FileNotFoundError(f"{self.folder}: no *.safetensors files (.bin / .pt weights "
                                    "are not supported; convert them with save_pretrained)")
        self.tensors = {}
        for path in self.files:
            for name, entry in _safetensors_header(path).items():
                self.tensors[name] = (path, *entry)
        for stored, ours in _STORED_PREFIXES.get(raw.get("model_type"), ()):
            for name in [n for n in self.tensors if n.startswith(stored)]:
                self.tensors.setdefault(ours + name[len(stored):], self.tensors[name])
        self._maps = {}

    @property
    def fingerprint_files(self):
        return [self.folder / "config.json", *self.files]

    def read(self, name):
        """The tensor `name` as a numpy array (a view of the memory-mapped file)."""
        if name not in self.tensors:
            raise KeyError(f"tensor {name!r} is missing from {self.folder} (files: "
                           f"{', '.join(p.name for p in self.files)})")
        path, dtype, shape, start, end = self.tensors[name]
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {dtype}; supported: "
                             f"{sorted(SAFETENSORS_DTYPES)}")
        if path not in self._maps:
            self._maps[path] = np.memmap(path, np.uint8, mode="r")
        return self._maps[path][start:end].view(SAFETENSORS_DTYPES[dtype]).reshape(shape)

    def where(self, name):
        return str(self.tensors[name][0]) if name in self.tensors else str(self.folder)

    def tokenizer(self):
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(self.folder))


# ---- GGUF files ---------------------------------------------------------------------------------

def _gguf_reader(path):
    """gguf.GGUFReader over `path`, parsed once per process and version of the file.

    Parsing the metadata is most of the cost of opening a GGUF file, the more so the larger its
    vocabulary, and a run opens its encoder's file several times (config, tokenizer, weights).
    The key holds the file's size and modification time, so a file replaced on disk is parsed
    again. A parsed file's metadata stays in host memory for the process, at most four files
    (times and sizes: docs/performance.md, "The test suite").
    """
    stat = os.stat(path)
    return _parsed_gguf(os.path.realpath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _parsed_gguf(path, size, mtime_ns):
    """The reader over a plain ndarray view of the file's memory map: the reader slices its
    buffer once per metadata item (a Gemma vocabulary is 786k slices), and on an np.memmap each
    slice pays memmap bookkeeping, 10x the parse time of a plain view of the same pages."""
    del size, mtime_ns  # Only the cache key.
    import gguf

    class Reader(gguf.GGUFReader):
        @property
        def data(self):
            return self._buffer

        @data.setter
        def data(self, value):
            self._buffer = value.view(np.ndarray)

    return Reader(path)


class GGUFFile:
    """A llama.cpp GGUF file of a supported architecture, serving tensors under HF names."""

    def __init__(self, path):
        self.path = pathlib.Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such GGUF file")
        try:
            self.reader = _gguf_reader(self.path)
        except Exception as err:  # The reader fails in many ways on a cut-off file.
            raise ValueError(f"{self.path}: cannot read it as GGUF ({type(err).__name__}: {err}); "
                             f"the file ({self.path.stat().st_size} bytes) is truncated or "
                             "corrupt: download or assemble it again") from err
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.config = self._config()
        import gguf
        arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == self.config.family)
        self._names = gguf.get_tensor_name_map(arch, self.config.num_layers)

    def field(self, key, default=KeyError):
        field = self.reader.fields.get(key)
        if field is None:
            if default is KeyError:
                raise KeyError(f"{self.path}: GGUF metadata field {key!r} is missing")
            return default
        return field.contents()

    def _config(self):
        arch = self.field("general.architecture")
        if arch not in SUPPORTED_GGUF_ARCHITECTURES:
            raise ValueError(f"{self.path}: general.architecture {arch!r} is not supported; "
                             f"supported: {SUPPORTED_GGUF_ARCHITECTURES}")

        def arch_field(key, default=KeyError):
            return self.field(f"{arch}.{key}", default)

        if "token_embd.weight" not in self.tensors:
            raise KeyError(f"{self.path}: tensor 'token_embd.weight' is missing")
        hidden, heads = arch_field("embedding_length"), arch_field("attention.head_count")
        layers = arch_field("block_count")
        head_dim = arch_field("attention.key_length", hidden // heads)
        gemma = arch == "gemma3"
        layer_types = ["full_attention"] * layers
        scalar = None
        if gemma:
            # Older Gemma 3 GGUF files carry no layer pattern: llama.cpp and transformers then use
            # five sliding-window layers and one global, local rope base 10000, and
            # query_pre_attn_scalar = head_dim except for the 27B model (62 layers).
            pattern = arch_field("attention.sliding_window_pattern", 6)
            if isinstance(pattern, int):
                pattern = [(i + 1) % pattern != 0 for i in range(layers)]
            layer_types = ["sliding_attention" if s else "full_attention" for s in pattern]
            scalar = hidden // heads if layers == 62 else head_dim
        scaling_type = arch_field("rope.scaling.type", None)
        if scaling_type not in (None, "none", "linear"):
            raise ValueError(f"{self.path}: {arch}.rope.scaling.type {scaling_type!r}; "
                             "supported: none, linear")
        rope_scaling = None
        if scaling_type == "linear":
            rope_scaling = (("factor", float(arch_field("rope.scaling.factor"))),
                            ("rope_type", "linear"))
        freq_factors = None
        if "rope_freqs.weight" in self.tensors:  # llama.cpp's form of Llama 3 rope scaling.
            freq_factors = tuple(float(x) for x in self._dequantize("rope_freqs.weight"))
        return LLMConfig(
            family=arch,
            name=self.path.name,
            vocab_size=int(self.tensors["token_embd.weight"].shape[1]),
            hidden_size=int(hidden),
            intermediate_size=int(arch_field("feed_forward_length")),
            num_layers=int(layers),
            num_heads=int(heads),
            num_kv_heads=int(arch_field("attention.head_count_kv", heads)),
            head_dim=int(head_dim),
            rms_norm_eps=float(arch_field("attention.layer_norm_rms_epsilon")),
            rope_theta=float(arch_field("rope.freq_base", 10000.0)),
            rope_scaling=rope_scaling,
            rope_freq_factors=freq_factors,
            local_rope_theta=float(arch_field("rope.freq_base_swa", 10000.0)) if gemma else None,
            layer_types=tuple(layer_types),
            sliding_window=int(arch_field("attention.sliding_window")) if gemma else None,
            attention_scale=scalar**-0.5 if gemma else None,
            qkv_bias="blk.0.attn_q.bias" in self.tensors,
            o_bias="blk.0.attn_output.bias" in self.tensors,
            activation="gelu_tanh" if gemma else "silu",
            tie_word_embeddings="output.weight" not in self.tensors,
        )

    @property
    def fingerprint_files(self):
        return [self.path]

    def gguf_name(self, name):
        """HF tensor name -> its GGUF name, by gguf's table for this architecture (which knows,
        e.g., that Gemma's post_attention_layernorm is a post-attention norm and Llama's the
        pre-MLP ffn_norm)."""
        gguf_name = self._names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise KeyError(f"{self.path}: gguf's {self.config.family} tensor table has no name "
                           f"for {name!r}")
        return gguf_name

    def _dequantize(self, gguf_name):
        import gguf
        tensor = self.tensors[gguf_name]
        try:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as err:
            raise ValueError(f"{self.path}: tensor {gguf_name!r} is stored as "
                             f"{tensor.tensor_type.name}, which the installed gguf package "
                             f"cannot dequantize ({err}); requantize the file (llama-quantize) "
                             "or upgrade gguf") from err
        return np.asarray(values, np.float32)

    def read(self, name):
        """The tensor with HF name `name`, dequantized to float32 in HF conventions."""
        gguf_name = self.gguf_name(name)
        if gguf_name not in self.tensors:
            raise KeyError(f"tensor {gguf_name!r} ({name}) is missing from {self.path}")
        w = self._dequantize(gguf_name)
        c = self.config
        if c.family == "llama" and gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
            # llama.cpp interleaves the two rope halves of each head's rows; undo it.
            heads = c.num_heads if gguf_name.endswith("attn_q.weight") else c.num_kv_heads
            w = w.reshape(heads, w.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
        if c.is_gemma and gguf_name.endswith("norm.weight"):
            w = w - 1.0  # GGUF stores Gemma's 1 + w.
        return w

    def where(self, name):
        return f"{self.path} ({self.gguf_name(name)})"

    def tokenizer(self):
        # Not AutoTokenizer(gguf_file=...): its GGUF reader imports torch (gguf_tokenizer.py).
        from lidit_jax.text.gguf_tokenizer import gguf_tokenizer
        return gguf_tokenizer(self.reader)


# ---- Loading ------------------------------------------------------------------------------------

def open_source(path):
    """A folder or .gguf path -> HuggingFaceFolder / GGUFFile (config, tensors, tokenizer)."""
    path = pathlib.Path(path).expanduser()
    if path.is_dir():
        return HuggingFaceFolder(path)
    if path.suffix == ".gguf":
        return GGUFFile(path)
    raise FileNotFoundError(f"{path}: expected a Hugging Face folder (config.json + "
                            "*.safetensors) or a .gguf file")


def model_name(config):
    """"<family>:<file or folder name>", e.g. "llama:SmolLM2-135M-Instruct.Q4_1.gguf": the
    model's id in text-cache and checkpoint metadata."""
    return f"{config.family}:{config.name}"


def _read_parameter(source, path, hf_name, hf_shape, convert, target_shape, np_dtype, config):
    """One variable as a host array in its final layout and dtype (layers stacked)."""
    layer_ids = range(config.num_layers) if path[0] == "layers" else [None]
    out = np.empty(target_shape, np_dtype)
    for i in layer_ids:
        name = hf_name.format(i=i)
        array = source.read(name)
        if tuple(array.shape) != tuple(hf_shape):
            raise ValueError(f"tensor {name!r} in {source.where(name)} has shape "
                             f"{tuple(array.shape)}; the config ({config.name}) needs "
                             f"{tuple(hf_shape)}")
        array = convert(array) if convert is not None else array
        if i is None:
            out[...] = array
        else:
            out[i] = array
    return out


def _place(host, named_sharding):
    if named_sharding is None:
        return jax.device_put(host)
    return jax.make_array_from_callback(host.shape, named_sharding, lambda index: host[index])


def load_llm(path, dtype=jnp.float32, mesh=None, rules=None, attention="xla"):
    """A Hugging Face folder or .gguf file -> `LLM` with parameters in `dtype`.

    With `mesh`, each parameter is placed with the NamedSharding that `rules` (the config's
    mesh.rules table) gives its logical axes, as it is read; nothing is replicated by accident.
    `attention` is the `dot_product_attention` implementation (config.text.attention).
    """
    if mesh is not None and rules is None:
        raise ValueError("load_llm: a mesh needs the logical axis rules (config.mesh.rules)")
    source = open_source(path)
    config = source.config
    module, sources = model_family(config)
    abstract = nnx.eval_shape(lambda: module(config, dtype, attention))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = None
    if mesh is not None:
        sharding.validate_rules(rules, mesh.axis_names)
        shardings = sharding.state_shardings(abstract_state, mesh, rules)
    np_dtype = np.dtype(dtype)

    def fill(key_path, variable):
        path = tuple(getattr(k, "key", k) for k in key_path)
        hf_name, hf_shape, convert = sources[path]
        host = _read_parameter(source, path, hf_name, hf_shape, convert, variable.shape,
                               np_dtype, config)
        named = None
        if shardings is not None:
            named = _lookup(shardings, path)
        return variable.replace(value=_place(host, named))

    state = jax.tree.map_with_path(fill, abstract_state,
                                   is_leaf=lambda x: isinstance(x, nnx.Variable))
    model = nnx.merge(graphdef, state)
    return LLM(model, name=model_name(config),
               fingerprint_fn=lambda: file_fingerprint(source.fingerprint_files),
               tokenizer_fn=source.tokenizer, mesh=mesh, rules=rules)


def _lookup(tree, path):
    for key in path:
        tree = tree[key]
    return getattr(tree, "value", tree)
