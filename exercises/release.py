"""Write the student versions of the exercises: `python -m exercises release [NAME ...] [--out DIR]`.

`otter assign` does the work (solutions replaced by the stub between `# BEGIN PROMPT` / `# END PROMPT`, hidden
tests and outputs removed, an otter init cell and `grader.check(...)` cells added); only the student notebooks are
kept (otter's autograder folder holds the solutions). Then every released file, zip members included, is searched
for the solutions' text, and the release fails if any survives (otter copies a solution silently when its
markers are misplaced).
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import zipfile
from pathlib import Path

import nbformat

from exercises import assignments

DEFAULT_OUT = Path(__file__).parent / "_release"
MIN_LEAK_LENGTH = 12  # solution lines shorter than this ("return out") may appear in honest text


class ReleaseError(Exception):
    pass


def solution_lines(source: Path) -> set[str]:
    """The stripped code lines between `# BEGIN SOLUTION` and `# END SOLUTION` in the source notebook that appear
    nowhere else in it (a kernel's signature may be both in the solution and in the statement)."""
    secret, public, inside = set(), set(), False
    for cell in nbformat.read(source, as_version=4).cells:
        for line in cell.source.splitlines():
            text = line.strip()
            if cell.cell_type == "code" and text.startswith("# BEGIN SOLUTION"):
                inside = True
            elif cell.cell_type == "code" and text.startswith("# END SOLUTION"):
                inside = False
            elif inside and cell.cell_type == "code":
                secret.add(text)
            else:
                public.add(text)
    return {t for t in secret - public if len(t) >= MIN_LEAK_LENGTH and not t.startswith("#")}


def _texts(folder: Path):
    """(name, text) of every file under folder, and of every member of every zip file there."""
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                for member in archive.namelist():
                    yield f"{path.name}:{member}", archive.read(member).decode(errors="replace")
        else:
            yield path.name, path.read_bytes().decode(errors="replace")


def find_leaks(folder: Path, sources: list[Path]) -> list[str]:
    """Problems in a release folder: solution text, solution markers, hidden tests, stored outputs."""
    secrets = set().union(*(solution_lines(s) for s in sources))
    problems = []
    for name, text in _texts(folder):
        for line in sorted(secrets):
            if line in text:
                problems.append(f"{name}: solution text {line!r}")
        for marker in ("BEGIN SOLUTION", "hidden=True"):
            if marker in text:
                problems.append(f"{name}: {marker!r}")
        if name.endswith(".ipynb"):
            for cell in nbformat.reads(text, as_version=4).cells:
                if cell.cell_type == "code" and (cell.outputs or cell.execution_count):
                    problems.append(f"{name}: a code cell keeps its outputs")
                    break
    return problems


def release(names: list[str] | None = None, out_dir: Path = DEFAULT_OUT) -> list[Path]:
    """Release the named assignments (all by default) into out_dir; raise ReleaseError on any leak."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from otter.assign import main as otter_assign  # slow to import: only here

    sources = [assignments.load(n).path for n in (names or assignments.names())]
    written = []
    for source in sources:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    otter_assign(str(source), f"{tmp}/dist", no_pdfs=True, no_run_tests=True)
            except Exception as error:
                raise ReleaseError(f"otter assign failed on {source.name}: {type(error).__name__}: {error}")
            student = Path(tmp, "dist", "student", source.name)
            target = out_dir / source.name
            target.write_bytes(student.read_bytes())
            written.append(target)
    problems = find_leaks(out_dir, sources)
    if problems:
        raise ReleaseError("the release leaks:\n" + "\n".join(problems))
    return written
