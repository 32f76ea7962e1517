"""The book shows the outputs stored in each lesson, so every lesson is committed executed, top to bottom.

CI runs each notebook once (nbval, which writes nothing back) and the book renders what was committed: a lesson
committed half-run, run out of order, or with an error would be shown that way. Fix one with
`PYTHONPATH=$PWD jupyter nbconvert --to notebook --execute --inplace lessons/NN_x.ipynb`.
"""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LESSONS = sorted((ROOT / "lessons").glob("*.ipynb"))


def code_cells(path: Path) -> list[dict]:
    return [c for c in json.loads(path.read_text(encoding="utf-8"))["cells"] if c["cell_type"] == "code"]


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.name)
def test_lesson_is_committed_executed_in_order(path):
    cells = code_cells(path)
    empty = [i for i, c in enumerate(cells, 1) if not "".join(c["source"]).strip()]
    assert not empty, f"{path.name}: empty code cells (numbers {empty} among code cells): delete them"
    counts = [c["execution_count"] for c in cells]
    assert counts == list(range(1, len(cells) + 1)), (
        f"{path.name}: execution counts {counts}, expected 1..{len(cells)} (restart and run all, then commit)")
    errors = [f"cell {c['execution_count']}: {o.get('ename')}: {o.get('evalue')}"
              for c in cells for o in c["outputs"] if o["output_type"] == "error"]
    assert not errors, f"{path.name} stores error outputs: {errors}"
