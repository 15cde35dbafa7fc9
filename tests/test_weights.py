"""Weight loading: GGUF files written the llama.cpp way load like their Hugging Face folders; bad
inputs fail naming the file, tensor or field; fingerprints; the offline default models.

The GGUF files are named by gguf's own table (gguf.get_tensor_name_map, what llama.cpp's
converter uses), an oracle independent of the loader's code path."""
import gguf
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from lidit_jax.fingerprint import file_fingerprint
from lidit_jax import paths
from lidit_jax.text import load_llm, models, weights
from model_helpers import TINY_MODELS, VOCAB, build_tiny, random_batch


def llama_cpp_permute(w, heads):
    """convert_hf_to_gguf.py's q/k row order for Llama files."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def gguf_tensors(model, arch):
    """HF model -> {llama.cpp name: float32 array} as convert_hf_to_gguf.py would write them."""
    config = model.config
    names = gguf.get_tensor_name_map(
        next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), config.num_hidden_layers)
    out = {}
    for name, tensor in model.state_dict().items():
        w = tensor.numpy().astype(np.float32)
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, name
        if arch == "llama" and name.endswith("self_attn.q_proj.weight"):
            w = llama_cpp_permute(w, config.num_attention_heads)
        if arch == "llama" and name.endswith("self_attn.k_proj.weight"):
            w = llama_cpp_permute(w, config.num_key_value_heads)
        if arch == "gemma3" and "norm" in name:
            w = w + 1
        out[gguf_name] = w
    return out


def write_gguf(path, arch, tensors, fields, raw_types=None):
    """A GGUF file with `fields` (method name -> value of gguf.GGUFWriter) and float32 tensors,
    except those in raw_types (name -> (GGMLQuantizationType, uint8 [rows, bytes per row]))."""
    writer = gguf.GGUFWriter(str(path), arch)
    for method, value in fields.items():
        getattr(writer, method)(value)
    for name, array in tensors.items():
        if raw_types and name in raw_types:
            kind, raw = raw_types[name]
            writer.add_tensor(name, raw, raw_dtype=kind)  # Shape from the byte rows.
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_fields(model, arch):
    c = model.config
    fields = dict(add_block_count=c.num_hidden_layers, add_context_length=128,
                  add_embedding_length=c.hidden_size, add_feed_forward_length=c.intermediate_size,
                  add_head_count=c.num_attention_heads, add_head_count_kv=c.num_key_value_heads,
                  add_layer_norm_rms_eps=c.rms_norm_eps)
    if arch == "qwen3":
        fields["add_key_length"] = c.head_dim
    if arch == "gemma3":
        fields.update(add_key_length=c.head_dim, add_sliding_window=c.sliding_window,
                      add_rope_freq_base=c.rope_parameters["full_attention"]["rope_theta"])
    else:
        fields["add_rope_freq_base"] = c.rope_parameters["rope_theta"]
    return fields


def tiny_gguf(tmp_path, arch, raw_types=None, drop=(), drop_fields=(), quantized=None,
              as_float32=False):
    """A tiny random HF model of `arch` saved as a folder and as a llama.cpp-style GGUF file.

    quantized: {tensor name: GGMLQuantizationType} stored in that type (gguf.quants.quantize);
    with as_float32, stored instead as float32 of the same dequantized values.
    """
    tmp_path.mkdir(parents=True, exist_ok=True)
    folder = tmp_path / "hf"
    model = build_tiny(arch, folder)
    tensors = gguf_tensors(model, arch)
    raw_types = dict(raw_types or {})
    for name, kind in (quantized or {}).items():
        raw = gguf.quants.quantize(np.ascontiguousarray(tensors[name], np.float32), kind)
        if as_float32:
            tensors[name] = gguf.quants.dequantize(raw, kind).astype(np.float32)
        else:
            raw_types[name] = (kind, raw)
    if arch == "llama":  # Llama 3 rope scaling, the way llama.cpp stores it: divisors.
        c = model.config
        dim = c.hidden_size // c.num_attention_heads
        default = 1.0 / (c.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2).float() / dim))
        tensors["rope_freqs.weight"] = (default / model.model.rotary_emb.inv_freq).numpy()
    tensors = {k: v for k, v in tensors.items() if k not in drop}
    fields = {k: v for k, v in gguf_fields(model, arch).items() if k not in drop_fields}
    return folder, write_gguf(tmp_path / f"tiny-{arch}.gguf", arch, tensors, fields, raw_types)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
def test_gguf_loads_like_the_folder(arch, tmp_path, monkeypatch):
    if arch == "gemma3":  # GGUF Gemma files imply 5 local + 1 global layers, head_dim scale.
        monkeypatch.setitem(TINY_MODELS, "gemma3", (lambda: transformers.
                            Gemma3ForCausalLM(transformers.Gemma3TextConfig(
                                vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                                head_dim=16, query_pre_attn_scalar=16, sliding_window=4)),
                            "gemma3"))
    folder, path = tiny_gguf(tmp_path, arch)
    from_gguf, from_folder = load_llm(path), load_llm(folder)
    assert from_gguf.config.layer_types == from_folder.config.layer_types
    ids, mask = random_batch(seed=4)
    for a, b in zip(from_gguf.hidden_states(ids, mask), from_folder.hidden_states(ids, mask)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no config\.json.*\.gguf"):
        load_llm(tmp_path)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ValueError, match=r"config\.json: model_type 'gpt2'.*supported.*llama"):
        load_llm(tmp_path)
    embedding = {"token_embd.weight": np.zeros((4, 8), np.float32)}
    path = write_gguf(tmp_path / "gpt2.gguf", "gpt2", embedding, {})
    with pytest.raises(ValueError, match=r"gpt2\.gguf: general\.architecture 'gpt2'.*gemma3"):
        load_llm(path)


def _writable(kind):
    try:
        gguf.quants.quantize(np.zeros((1, 256), np.float32), kind)
        return True
    except NotImplementedError:
        return False


# Every type the installed gguf can write (0.19: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
# TQ1_0, TQ2_0, MXFP4); the block-wise ones need rows of 256 values (TQ*): ffn_down's rows are
# the intermediate size.
WRITABLE_TYPES = [kind.name for kind in gguf.GGMLQuantizationType if _writable(kind)]


@pytest.mark.parametrize("kind", WRITABLE_TYPES)
def test_quantized_tensors_load_as_their_dequantized_values(kind, tmp_path, monkeypatch):
    """attn_q also goes through the undone llama.cpp row permutation, which must act on
    dequantized rows."""
    monkeypatch.setitem(TINY_MODELS, "llama", (lambda: transformers.
                        LlamaForCausalLM(transformers.LlamaConfig(
                            vocab_size=VOCAB, hidden_size=256, intermediate_size=256,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            tie_word_embeddings=True)), "llama"))
    quantized = {name: gguf.GGMLQuantizationType[kind]
                 for name in ("blk.0.ffn_down.weight", "blk.1.attn_q.weight")}
    _, stored = tiny_gguf(tmp_path / "quantized", "llama", quantized=quantized)
    _, reference = tiny_gguf(tmp_path / "float32", "llama", quantized=quantized, as_float32=True)
    ids, mask = random_batch(seed=5)
    for a, b in zip(load_llm(stored).hidden_states(ids, mask),
                    load_llm(reference).hidden_states(ids, mask)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_type_gguf_cannot_dequantize_is_refused(tmp_path):
    # Q8_1 blocks: 32 values in 40 bytes; gguf 0.19 writes none and cannot dequantize them.
    raw = np.zeros((96, 64 // 32 * 40), np.uint8)
    _, path = tiny_gguf(tmp_path, "llama",
                        raw_types={"blk.0.ffn_up.weight": (gguf.GGMLQuantizationType.Q8_1, raw)})
    with pytest.raises(ValueError, match=r"tiny-llama\.gguf: tensor 'blk\.0\.ffn_up\.weight' is "
                                         r"stored as Q8_1, which the installed gguf package "
                                         r"cannot dequantize"):
        load_llm(path)


def test_missing_tensor(tmp_path):
    folder, path = tiny_gguf(tmp_path, "qwen2", drop=("blk.1.ffn_up.weight",))
    with pytest.raises(KeyError, match=r"blk\.1\.ffn_up\.weight.*missing from .*tiny-qwen2\.gguf"):
        load_llm(path)
    tensors = safetensors.numpy.load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    safetensors.numpy.save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing from"):
        load_llm(folder)


def test_missing_gguf_field(tmp_path):
    _, path = tiny_gguf(tmp_path, "llama", drop_fields=("add_feed_forward_length",))
    with pytest.raises(KeyError, match=r"tiny-llama\.gguf: .*'llama\.feed_forward_length'"):
        load_llm(path)


def test_misshapen_tensor(tmp_path):
    folder = tmp_path / "hf"
    build_tiny("llama", folder)
    tensors = safetensors.numpy.load_file(folder / "model.safetensors")
    name = "model.layers.2.self_attn.k_proj.weight"
    tensors[name] = tensors[name][:16]
    safetensors.numpy.save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{name}.*model\.safetensors has shape \(16, 64\); "
                                         r"the config .* needs \(32, 64\)"):
        load_llm(folder)


def test_truncated_files(tmp_path):
    folder, path = tiny_gguf(tmp_path, "llama")
    for file in (path, folder / "model.safetensors"):
        data = file.read_bytes()
        file.write_bytes(data[: len(data) * 3 // 5])
    with pytest.raises(ValueError, match=r"tiny-llama\.gguf: cannot read it as GGUF.*truncated"):
        load_llm(path)
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor .* truncated"):
        load_llm(folder)


def test_a_gguf_file_is_parsed_once_until_it_changes_on_disk(tmp_path):
    _, path = tiny_gguf(tmp_path, "llama")
    reader = weights.open_source(path).reader
    assert weights.open_source(path).reader is reader
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 3 // 5])  # Replaced by a cut-off copy: parsed again.
    with pytest.raises(ValueError, match=r"tiny-llama\.gguf: cannot read it as GGUF"):
        weights.open_source(path)
    path.write_bytes(data)
    assert weights.open_source(path).config == load_llm(path).config


def test_fingerprint_is_stable_and_sees_changed_weights(tmp_path):
    folder = tmp_path / "hf"
    build_tiny("qwen2", folder)
    first, again = load_llm(folder).fingerprint, load_llm(folder).fingerprint
    assert first == again and len(first) == 64
    tensors = safetensors.numpy.load_file(folder / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 1.01
    safetensors.numpy.save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    assert load_llm(folder).fingerprint != first
    big = tmp_path / "big.bin"  # A one-byte change past the first 16 MiB chunk is seen.
    big.write_bytes(bytes(20 << 20))
    sampled = file_fingerprint([big])
    big.write_bytes(bytes(17 << 20) + b"x" + bytes((3 << 20) - 1))
    assert file_fingerprint([big]) != sampled


def test_resolve_model_path(tmp_path):
    assert models.resolve_model_path("default:smollm2").name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (models.resolve_model_path("default:minilm") / "config.json").is_file()
    assert models.resolve_model_path(str(tmp_path)) == tmp_path
    with pytest.raises(ValueError, match=r"text\.llms\.x\.path='default:nope'.*default:gemma3"):
        models.resolve_model_path("default:nope", key="text.llms.x.path")
    with pytest.raises(FileNotFoundError, match=r"path='/no/such' does not exist"):
        models.resolve_model_path("/no/such")


def test_gemma3_is_assembled_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path))
    path = models.default_model_path("gemma3")
    assert path == tmp_path / models.GEMMA3_FILE and path.stat().st_size == 253113024
    assert [p.name for p in tmp_path.iterdir()] == [models.GEMMA3_FILE]  # No partial left.
    assert models.default_model_path("gemma3") == path
