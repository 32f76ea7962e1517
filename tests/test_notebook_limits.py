"""The test run enforces the notebooks' time limits (conftest.py) and checks their marked outputs (nbval).

Each test runs pytest in a subprocess on a notebook in a temporary directory, so a failure there is the
expected result here. Sources: the hooks in conftest.py; `# NBVAL_CHECK_OUTPUT` cells under `--nbval-lax`.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent


def run_pytest(directory: Path, *args: str, pythonpath: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
                          cwd=directory, env=env, capture_output=True, text=True, timeout=600)


def write_project(directory: Path, per_notebook: float, total: float) -> Path:
    """The repository's conftest.py, an ini with the given limits (seconds), one one-cell notebook."""
    shutil.copy(ROOT / "conftest.py", directory / "conftest.py")
    (directory / "pytest.ini").write_text(
        "[pytest]\naddopts = --nbval-lax --nbval-current-env\n"
        f"notebook_time_limit = {per_notebook}\nnotebooks_total_time_limit = {total}\n")
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")])
    path = directory / "tiny.ipynb"
    nbformat.write(notebook, path)
    return path


def test_a_notebook_over_its_limit_fails_naming_its_time(tmp_path):
    write_project(tmp_path, per_notebook=0.01, total=1000)
    result = run_pytest(tmp_path, "tiny.ipynb")
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "1 passed, 1 error" in out, out  # the cell ran; its teardown reports the time
    assert "tiny.ipynb took" in out and "over the limit of 0 s per notebook" in out, out


def test_all_notebooks_over_the_total_limit_fail_the_run(tmp_path):
    write_project(tmp_path, per_notebook=1000, total=0.01)
    result = run_pytest(tmp_path, "tiny.ipynb")
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "1 passed" in out and "error" not in out, out  # under its own limit
    assert "all notebooks together took" in out and "notebooks_total_time_limit" in out, out


def test_a_changed_shipped_config_fails_lesson_3s_checked_table(tmp_path):
    """Lesson 3's KV-cache table (a `# NBVAL_CHECK_OUTPUT` cell) against a copy of refimpl in which one shipped
    config changed: Llama-3-8B with 4 key-value heads instead of 8. No assert reads that row, so only the
    output check can catch it; the same cells with the original refimpl pass (the control)."""
    lesson = nbformat.read(ROOT / "lessons" / "03_kv_cache.ipynb", as_version=4)
    code = [c for c in lesson.cells if c.cell_type == "code"]
    table = [c for c in code if "NBVAL_CHECK_OUTPUT" in c.source and "def tokens_held" in c.source]
    assert len(table) == 1, "lesson 3: expected one checked cell with the KV-cache table"
    lesson.cells = [code[0], table[0]]  # the imports, the table
    shutil.copy(ROOT / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "pytest.ini").write_text("[pytest]\naddopts = --nbval-lax --nbval-current-env\n")
    nbformat.write(lesson, tmp_path / "table.ipynb")

    control = run_pytest(tmp_path, "table.ipynb")
    assert control.returncode == 0, control.stdout + control.stderr

    changed = tmp_path / "changed"
    shutil.copytree(ROOT / "refimpl", changed / "refimpl",
                    ignore=shutil.ignore_patterns("__pycache__"))
    config_path = changed / "refimpl" / "known_configs" / "Llama-3-8B.json"
    config = json.loads(config_path.read_text())
    assert config["num_key_value_heads"] == 8
    config_path.write_text(json.dumps({**config, "num_key_value_heads": 4}))
    result = run_pytest(tmp_path, "table.ipynb", pythonpath=changed)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "1 failed, 1 passed" in out and "Cell outputs differ" in out, out
    assert "65.5     8,192" in out, out  # the changed row: half the KB per token
