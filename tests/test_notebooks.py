"""Every notebook in notebooks/ runs top to bottom in a fresh kernel (one test per notebook).

A notebook passes when it is stored without outputs, every cell runs without an error, it
draws at least one inline plot, and its last code cell asserts something (by convention the
numbers the notebook demonstrated, so that a silent regression fails here). The kernel is
the interpreter running the tests, importing rljax from this checkout, in a temporary
working directory (run directories a notebook writes land there), with the test process's
environment (so conftest's XLA_FLAGS, which skip costly compiler passes, apply to it too).
"""
from __future__ import annotations

import ast
import glob
import json
import os
import re
import sys

import pytest

nbformat = pytest.importorskip("nbformat", reason="pip install -e '.[notebooks]'")
nbclient = pytest.importorskip("nbclient", reason="pip install -e '.[notebooks]'")
pytest.importorskip("ipykernel", reason="pip install -e '.[notebooks]'")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))
CELL_TIMEOUT_S = 600  # per cell; each notebook is meant to run in under a minute on 2 CPU cores
STRIP = "python notebooks/strip_outputs.py notebooks/*.ipynb"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def unstripped_cells(nb) -> list[int]:
    """Indices of the code cells that carry outputs, an execution count or recorded timings."""
    return [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (
        c.get("outputs") or c.get("execution_count") is not None or "execution" in c.metadata)]


def kernel_spec_dir(tmp_path) -> str:
    """A JUPYTER_PATH directory whose `python3` kernel is this interpreter (it takes precedence over
    any python3 kernel installed for the user or the system)."""
    from ipykernel.kernelspec import get_kernel_dict

    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps(get_kernel_dict()))  # argv[0] is sys.executable
    return str(tmp_path / "jupyter")


def kernel_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    # plots must come back as image/png outputs: the inline backend, whatever the environment says
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    return env


def code_of(cell) -> str:
    """A cell's source as Python (IPython magics turned into calls)."""
    from IPython.core.inputtransformer2 import TransformerManager

    return TransformerManager().transform_cell(cell.source)


def test_notebooks_exist():
    assert NOTEBOOKS, f"no notebooks in {os.path.join(ROOT, 'notebooks')}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook(path, tmp_path, monkeypatch):
    nb = nbformat.read(path, as_version=4)
    name = os.path.relpath(path, ROOT)
    dirty = unstripped_cells(nb)
    assert not dirty, (f"{name} is stored with outputs or execution counts (code cells {dirty}); notebooks are "
                       f"committed without them so that diffs show only what changed. Strip them: {STRIP}")
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert code_cells, f"{name} has no code cells"
    last = ast.parse(code_of(code_cells[-1]))
    assert any(isinstance(node, ast.Assert) for node in ast.walk(last)), (
        f"{name}: the last code cell should assert the numbers the notebook demonstrates")

    monkeypatch.setenv("JUPYTER_PATH", kernel_spec_dir(tmp_path))
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                                     resources={"metadata": {"path": str(workdir)}})
    error = None
    try:
        client.execute(env=kernel_env())
    except nbclient.exceptions.CellExecutionError as e:
        error = ANSI.sub("", str(e))  # the cell's source and traceback, without terminal colours
    if error is not None:
        pytest.fail(f"{name}: a cell raised\n{error}", pytrace=False)

    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type in ("display_data", "execute_result") and "image/png" in o.get("data", {})]
    assert images, f"{name}: no inline plot (image/png output) was produced"


def test_strip_outputs(tmp_path):
    """notebooks/strip_outputs.py leaves a notebook that the check above accepts, sources and ids unchanged."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("strip_outputs", os.path.join(ROOT, "notebooks", "strip_outputs.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    v4 = nbformat.v4
    cells = [v4.new_markdown_cell("# title"),
             v4.new_code_cell("1 + 1", execution_count=3, outputs=[v4.new_output("execute_result", {"text/plain": "2"},
                                                                                  execution_count=3)]),
             v4.new_code_cell("print('x')", execution_count=4, outputs=[v4.new_output("stream", text="x\n")]),
             v4.new_code_cell("pass")]
    cells[2].metadata["execution"] = {"iopub.execute_input": "2026-01-01T00:00:00Z"}
    cells[2].metadata["tags"] = ["keep"]
    path = tmp_path / "n.ipynb"
    nbformat.write(v4.new_notebook(cells=cells), path)
    assert unstripped_cells(nbformat.read(path, as_version=4)) == [1, 2]
    assert module.strip(str(path)) is True
    nb = nbformat.read(path, as_version=4)
    assert unstripped_cells(nb) == []
    assert [c.source for c in nb.cells] == [c.source for c in cells] and [c.id for c in nb.cells] == [c.id for c in cells]
    assert nb.cells[2].metadata == {"tags": ["keep"]}
    assert module.strip(str(path)) is False


def test_kernel_is_this_interpreter(tmp_path, monkeypatch):
    """The kernel the notebooks run in is sys.executable, with this checkout's rljax and the inline backend."""
    monkeypatch.setenv("JUPYTER_PATH", kernel_spec_dir(tmp_path))
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "import os, sys, rljax, matplotlib\nprint(sys.executable); print(os.path.dirname(os.path.dirname(rljax.__file__)))"
        "\nprint(matplotlib.get_backend())")])
    nbclient.NotebookClient(nb, kernel_name="python3", timeout=120,
                            resources={"metadata": {"path": str(tmp_path)}}).execute(env=kernel_env())
    lines = "".join(o.text for o in nb.cells[0].outputs if o.output_type == "stream").split()
    assert lines[0] == sys.executable
    assert os.path.samefile(lines[1], ROOT)
    assert lines[2] == "module://matplotlib_inline.backend_inline"
