"""The solution key, for after the deadline: `python -m exercises release --key [NAME ...] [--out DIR]`.

Each source notebook `exercises/src/NN_topic.ipynb` with its worked answers, executed top to bottom: otter's raw
marker cells (`# ASSIGNMENT CONFIG`, `# BEGIN QUESTION`, `# BEGIN SOLUTION`, `# BEGIN TESTS`, their ends) are
dropped; in a solution cell the `# BEGIN SOLUTION NO PROMPT` / `# END SOLUTION` lines and the stub (the string
between `# BEGIN PROMPT` and `# END PROMPT`) go, and a line's trailing `# SOLUTION` comment. The check cells stay, and
they run the visible cases, as in the student's notebook. Hidden cases are not in any notebook (drawn at grading
time from the instructor's seed, which the key never sees). It fails closed, like the release: the key
is written to `--out` only when every notebook executed without an error and no otter marker and no machine path
(the checkout's, the home folder's, the interpreter's) is left in it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import nbformat
import yaml

from exercises import assignments
from exercises.release import MARKERS, SINGLE_LINE, ReleaseError

DEFAULT_KEY_OUT = Path(__file__).parent / "_key"
REPO_ROOT = Path(__file__).resolve().parent.parent
OTTER_RAW = re.compile(r"\s*#\s*(ASSIGNMENT CONFIG|(BEGIN|END) (QUESTION|SOLUTION|TESTS))")
PROMPT = re.compile(r'^[ \t]*""" # BEGIN PROMPT\n.*?^[ \t]*""" # END PROMPT[ \t]*\n?', re.DOTALL | re.MULTILINE)
SOLUTION_MARKER = re.compile(r"^[ \t]*#\s*(BEGIN SOLUTION( NO PROMPT)?|END SOLUTION)[ \t]*\n?", re.MULTILINE)
CELL_TIMEOUT = 300  # seconds per cell
MACHINE_PATHS = (str(REPO_ROOT), str(Path.home()), sys.prefix)  # none may show in a published output


def key_notebook(source: Path) -> nbformat.NotebookNode:
    """The source notebook with the worked answers and without otter's markers (not executed)."""
    notebook = nbformat.read(source, as_version=4)
    cells, question, in_tests = [], None, False
    for cell in notebook.cells:
        if cell.cell_type == "raw" and OTTER_RAW.match(cell.source):
            marker = cell.source.strip()
            if marker.startswith("# BEGIN QUESTION"):
                question = (yaml.safe_load(marker.split("\n", 1)[1]) or {}).get("name")
            in_tests = marker.startswith("# BEGIN TESTS") or (in_tests and not marker.startswith("# END TESTS"))
            continue
        if cell.cell_type == "code":
            text = SOLUTION_MARKER.sub("", PROMPT.sub("", cell.source))
            cell.source = "\n".join(SINGLE_LINE.sub("", line) for line in text.splitlines()).rstrip()
            if in_tests:
                cell.source += f'\nprint("{question}: the visible cases pass")'
            cell.outputs, cell.execution_count = [], None
        cells.append(cell)
    notebook.cells = cells
    notebook.metadata.pop("otter", None)
    return notebook


@contextlib.contextmanager
def _environment(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _execute(notebook: nbformat.NotebookNode, folder: Path) -> None:
    """Run the notebook in place in a kernel started in `folder`, with the checkout importable and Triton's
    interpreter on (the exercises run on a CPU)."""
    import nbclient  # slow to import: only here

    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    with _environment(PYTHONPATH=path, TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1")):
        nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT, resources={"metadata": {"path": str(folder)}}
                                ).execute()


def problems(notebook: nbformat.NotebookNode, name: str) -> list[str]:
    """What keeps a key notebook from being published: otter markers, errors, machine paths."""
    found = []
    for i, cell in enumerate(notebook.cells):
        text = cell.source + "".join(str(o) for o in cell.get("outputs", []))
        found += [f"{name} cell {i}: marker {m.group(0)!r}" for m in MARKERS.finditer(text)]
        found += [f"{name} cell {i}: the machine's path {p!r}" for p in MACHINE_PATHS if p in text]
        if any(o.get("output_type") == "error" for o in cell.get("outputs", [])):
            found.append(f"{name} cell {i}: an error")
    return found


def release_key(names: list[str] | None = None, out_dir: Path = DEFAULT_KEY_OUT) -> list[Path]:
    """Write the executed key notebooks of the named assignments (all by default) to out_dir; raise
    ReleaseError (nothing written) when one fails to execute or keeps a marker or a machine path."""
    sources = [assignments.load(n).path for n in (names or assignments.names())]
    with tempfile.TemporaryDirectory(prefix="key-") as staging:
        ready = []
        for source in sources:
            notebook = key_notebook(source)
            try:
                _execute(notebook, Path(staging))
            except Exception as error:  # nbclient's CellExecutionError names the cell and the error
                raise ReleaseError(f"the key of {source.name} failed to execute: {str(error)[-2000:]}")
            found = problems(notebook, source.name)
            if found:
                raise ReleaseError("the key is not fit to publish (nothing was written):\n" + "\n".join(found))
            nbformat.write(notebook, Path(staging, source.name))
            ready.append(Path(staging, source.name))
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for path in ready:
            shutil.copyfile(path, out_dir / path.name)
    return [out_dir / p.name for p in ready]
