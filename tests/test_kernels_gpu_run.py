"""`python -m dskernels.gpu_run --tiny` runs its four stages end to end on a CPU under Triton's interpreter,
and the notebooks' code cells become runnable scripts without IPython.
On a GPU the command runs everything compiled on the device; here it is the CPU."""

import json

import nbformat

from dskernels import gpu_run


def test_gpu_run_tiny_end_to_end(tmp_path):
    record = gpu_run.main(["--tiny", "--out", str(tmp_path)])
    assert record["ok"], {k: v for k, v in record.items() if isinstance(v, dict) and not v.get("ok", True)}
    assert record["tests"]["passed"] == record["tests"]["tests"] > 0
    kernels = {row["kernel"] for row in record["sweep"]["rows"]}
    assert kernels == {"softmax", "rmsnorm", "matmul", "flash attention", "MLA decode", "MoE experts"}
    assert {row["dtype"] for row in record["sweep"]["rows"]} == {"float32", "float16"}
    assert [n["notebook"] for n in record["notebooks"]["notebooks"]] == gpu_run.NOTEBOOKS
    saved = json.loads((tmp_path / "gpu_run.json").read_text())
    assert set(saved["environment"]) >= {"gpu", "driver", "torch", "triton", "date", "commit"}
    assert "| sweep | ok" in (tmp_path / "gpu_run.md").read_text()
    assert (tmp_path / "results.md").exists() and (tmp_path / "roofline.png").exists()


def test_notebook_code_runs_as_a_script_without_ipython(tmp_path):
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("# title"),
        nbformat.v4.new_code_cell("%matplotlib inline\nx = 2"),
        nbformat.v4.new_code_cell("%%time\nraise SystemExit('a cell magic is dropped whole')"),
        nbformat.v4.new_code_cell("!pip list\nprint('x is', x * 21)")])
    path = tmp_path / "nb.ipynb"
    nbformat.write(notebook, path)
    script = gpu_run.notebook_script(path)
    scope = {}
    exec(compile(script, "nb.py", "exec"), scope)  # noqa: S102 - our own synthetic notebook
    assert scope["x"] == 2 and "pip list" in script and "SystemExit" not in script
