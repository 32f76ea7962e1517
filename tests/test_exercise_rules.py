"""Issue 22's grading rules, end to end through the grader (exercises.grade) and the learner's check: the memory
budget in grading, a failure of an earlier function charged once, a renamed download, the per-question columns,
the visible share and what results.json shows a student."""

import csv
import json
import sys
from pathlib import Path

import nbformat
import pytest

from exercises import assignments, grade
from exercises.questions import QUESTIONS

sys.path.insert(0, str(Path(__file__).parent))
from exercise_mutants import answers  # noqa: E402


def _submission(name: str, replace: dict[str, str], folder: Path, file: str) -> Path:
    """The solved source notebook `name` with the cells defining the functions in `replace` replaced by their
    code (the other cells, otter's markers included, as they are)."""
    notebook = nbformat.read(assignments.load(name).path, as_version=4)
    for cell in notebook.cells:
        for function, code in replace.items():
            if cell.cell_type == "code" and f"def {function}(" in cell.source and "BEGIN SOLUTION" in cell.source:
                cell.source = code
    folder.mkdir(parents=True, exist_ok=True)
    nbformat.write(notebook, folder / file)
    return folder / file


def _scores(report) -> dict[str, list[tuple[str, int, str]]]:
    """question -> [(label, units, output)] of one report."""
    out: dict[str, list] = {}
    for test in report.tests:
        question, label = test.name.split(" (", 1)
        out.setdefault(question, []).append((label.rstrip(")"), test.units, test.output))
    return out


def _as(fn, name: str) -> str:
    """The source of a mutant in tests/exercise_mutants/answers.py, defined under the question's name."""
    import inspect
    import textwrap

    return "import torch\n\n\n" + textwrap.dedent(inspect.getsource(fn)).replace(f"def {fn.__name__}(", f"def {name}(")


def test_grading_enforces_the_memory_budget_on_visible_and_hidden_cases(tmp_path):
    """A naive mla_absorbed (right values, decompressed cache) loses the long cases, visible included, with a
    message naming the rule; the solution keeps every point (tests/test_exercises.py)."""
    subs = tmp_path / "subs"
    _submission("03_mla", {"mla_absorbed": _as(answers.mla_absorbed_naive, "mla_absorbed")}, subs, "naive.ipynb")
    (report,) = grade.grade("03_mla", subs, tmp_path / "out", seed=0, jobs=1, progress=False)
    cases = _scores(report)["mla_absorbed"]
    long_cases = [c for c, (_, args) in zip(cases, QUESTIONS["mla_absorbed"].cases(None) +
                                            QUESTIONS["mla_absorbed"].cases(0)) if args[3].shape[1] >= 4096]
    assert {c[0].split()[0] for c in long_cases} == {"visible", "hidden"}
    for label, units, output in long_cases:
        assert units == 0 and output.startswith("ran out of memory: each call may use 512 MiB more"), (label, output)
        assert "decompressing the cache into per-head keys and values does not" in output
    assert all(units > 0 for label, units, _ in cases if (label, units, _) not in long_cases), cases
