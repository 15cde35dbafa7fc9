"""Imports run downhill: each lidit_jax module imports only its own layer and the layers below
it, and no two modules import each other, even through others (function-level imports count).

The layers, bottom first, are the package map of README.md; a new module must be placed in one.
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Bottom first. A module belongs to the layer of its longest matching prefix.
LAYERS = (
    ("base", ("errors", "paths", "hardware", "host_allocator", "fingerprint", "config_files",
              "compilation_cache")),
    ("parallel", ("parallel",)),
    ("layers", ("nn",)),
    # The frozen text transformers: the base they share and the three families on it.
    ("text models", ("text.transformer", "text.decoder", "text.bert", "text.t5")),
    ("data and text", ("data", "text")),
    ("diffusion", ("diffusion",)),
    ("scoring", ("evaluate.scorer", "evaluate.shapes_eval", "evaluate.statistics",
                 "evaluate.readout_prompts", "evaluate.readout_stats")),
    ("configuration", ("configuration",)),
    ("training", ("train", "inference")),
    ("modes", ("main", "aot", "aot_compile", "aot_cost", "describe", "encode", "export",
               "sample", "evaluate.mode", "evaluate.ablation", "evaluate.benchmarks",
               "evaluate.probes", "evaluate.readout", "evaluate.readout_model",
               "evaluate.scratch_lm")),
)


def _modules():
    """{'lidit_jax.x.y': path} for every module of the package."""
    found = {}
    for path in (ROOT / "lidit_jax").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(path, modules):
    """The lidit_jax modules `path` imports, wherever in the file (function bodies included)."""
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lidit_jax"):
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                targets.add(name if name in modules else node.module)
        elif isinstance(node, ast.Import):
            targets.update(a.name for a in node.names if a.name.startswith("lidit_jax"))
    return targets


def _layer(module):
    """Index into LAYERS of `module` ('lidit_jax.train.loop' -> the 'training' layer)."""
    name = module.removeprefix("lidit_jax.")
    best = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if name == prefix or name.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    if best is None:
        raise AssertionError(f"{module} is in no layer of tests/test_imports.py: add it")
    return best[0]


@pytest.fixture(scope="module")
def graph():
    modules = _modules()
    return {module: _imports(path, modules) - {module}
            for module, path in modules.items() if module != "lidit_jax"}


def _uphill(graph):
    """'a (layer) -> b (layer)' for every import of a module from a higher layer."""
    return [f"{module} ({LAYERS[_layer(module)][0]}) -> {target} ({LAYERS[_layer(target)][0]})"
            for module, targets in graph.items() for target in sorted(targets)
            if target != "lidit_jax" and _layer(target) > _layer(module)]


def _cycles(graph):
    """'a -> b -> a' for every import cycle found by a depth-first walk."""
    cycles = []
    state = {}  # module -> "open" while on the depth-first stack, "done" after.

    def visit(module, stack):
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return cycles


def test_every_import_runs_downhill(graph):
    uphill = _uphill(graph)
    assert not uphill, "imports that run back up:\n" + "\n".join(uphill)


def test_no_module_imports_itself_through_others(graph):
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_text_model_families_import_only_their_shared_base(graph):
    # BERT and T5 once imported the decoder LLM's module (text/llm.py) for the base they share.
    other = [f"{module} -> {target}" for module in ("decoder", "bert", "t5")
             for target in sorted(graph[f"lidit_jax.text.{module}"])
             if target.startswith("lidit_jax.text.") and target != "lidit_jax.text.transformer"]
    assert not other, "text model families importing other text modules:\n" + "\n".join(other)


def test_the_checks_catch_what_they_are_for():
    # The import that ran back up before context parallelism moved under nn/.
    assert _uphill({"lidit_jax.parallel.context": {"lidit_jax.nn.attention"}})
    assert not _uphill({"lidit_jax.nn.context_parallel": {"lidit_jax.nn.attention"}})
    assert _cycles({"lidit_jax.a": {"lidit_jax.b"}, "lidit_jax.b": {"lidit_jax.c"},
                    "lidit_jax.c": {"lidit_jax.a"}}) == [
        "lidit_jax.a -> lidit_jax.b -> lidit_jax.c -> lidit_jax.a"]
