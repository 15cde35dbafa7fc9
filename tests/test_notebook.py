"""launch/colab_tpu_demo.ipynb runs headless on CPU in its reduced form (so it cannot rot)."""
import glob
import json
import os

import pytest

from cpu_flags import xla_flags

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_colab_notebook_executes_on_cpu(tiny_llm, tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient")  # The test extra has it; skipped only without.
    import nbformat

    workdir = tmp_path / "demo"
    # The kernel inherits these; its children (python -m lidit_jax.main) too.
    monkeypatch.setenv("LIDIT_NOTEBOOK_REDUCED", "1")
    monkeypatch.setenv("LIDIT_CHECKOUT", ROOT)
    monkeypatch.setenv("LIDIT_WORKDIR", str(workdir))
    # The reduced form's encoder: SmolLM2's tokenizer and template, random tiny weights (the
    # pretrained SmolLM2 runs in CI's demo and the text encoder tests).
    monkeypatch.setenv("LIDIT_NOTEBOOK_LLM", str(tiny_llm))
    monkeypatch.setenv("XLA_FLAGS", xla_flags(1))
    notebook = nbformat.read(os.path.join(ROOT, "launch", "colab_tpu_demo.ipynb"), as_version=4)
    nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()

    with open(workdir / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2]
    assert len(glob.glob(str(workdir / "samples" / "notebook" / "*.png"))) == 3
    shown = [output for cell in notebook.cells if cell.cell_type == "code"
             for output in cell.get("outputs", []) if "image/png" in output.get("data", {})]
    assert len(shown) == 3
