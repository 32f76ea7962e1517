"""Write the student versions of the exercises: `python -m exercises release [NAME ...] [--out DIR]`.

`otter assign` does the work (solutions replaced by the stub between `# BEGIN PROMPT` / `# END PROMPT`, hidden tests
and outputs removed, an otter init cell and `grader.check(...)` cells added); only the student notebooks are kept
(otter's autograder folder holds the solutions), with an init cell that finds the notebook whatever the file is
called (`exercises.feedback.notebook_file`: a second download is `02_rope (1).ipynb`). Each test cell gets a success
message saying that only the visible cases ran and the hidden ones run at grading. Then every released file, zip
members included, is searched for the solutions' text in every form otter knows (`# BEGIN SOLUTION` blocks in or
outside a question, the lines of a raw-cell solution block, a line ending in `# SOLUTION`) and for any otter marker,
and the release fails if any survives (otter copies a solution silently when its markers are misplaced). It fails
closed: the notebooks are written and checked in a temporary folder, and copied to `--out` only when all pass. """

from __future__ import annotations

import contextlib
import io
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

import nbformat

from exercises import assignments

DEFAULT_OUT = Path(__file__).parent / "_release"
MIN_LEAK_LENGTH = 12  # solution text at least this long is also searched inside lines and in other files
MARKERS = re.compile(r"#\s*(BEGIN |END )?SOLUTION|BEGIN\s+PROMPT|BEGIN\s+(HIDDEN\s+)?TESTS?|BEGIN\s+QUESTION|"
                     r"hidden\s*=\s*True", re.IGNORECASE)
SINGLE_LINE = re.compile(r"\s*#\s*SOLUTION\s*$")
SUCCESS = ("only the visible cases ran here, and they passed; the hidden cases (other sizes) run when your "
           "notebook is graded")


class ReleaseError(Exception):
    pass


def solution_lines(source: Path) -> set[str]:
    """The stripped code lines of the source notebook's solutions (`# BEGIN SOLUTION` blocks, lines ending in
    `# SOLUTION`) that appear nowhere else in it (a kernel's signature may be both in the solution and in the
    statement)."""
    secret, public, in_block = set(), set(), False
    for cell in nbformat.read(source, as_version=4).cells:
        for line in cell.source.splitlines():
            text = line.strip()
            if cell.cell_type != "code":
                public.add(text)
            elif text.startswith("# BEGIN SOLUTION") or text.startswith("# END SOLUTION"):
                in_block = text.startswith("# BEGIN")
            elif SINGLE_LINE.search(line):
                secret.add(SINGLE_LINE.sub("", line).strip())
            elif in_block:
                secret.add(text)
            else:
                public.add(text)
    return {t for t in secret - public if len(t) >= 4 and not t.startswith("#") and t not in ("...", "pass")}


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


def _code_lines(text: str) -> set[str]:
    try:
        notebook = nbformat.reads(text, as_version=4)
    except Exception:
        return {line.strip() for line in text.splitlines()}
    return {line.strip() for c in notebook.cells for line in c.source.splitlines()}


def find_leaks(folder: Path, sources: list[Path]) -> list[str]:
    """Problems in a release folder: solution text, otter markers, hidden tests, stored outputs."""
    secrets = set().union(*(solution_lines(s) for s in sources))
    problems = []
    for name, text in _texts(folder):
        lines = _code_lines(text)
        for line in sorted(secrets):
            if line in lines or (len(line) >= MIN_LEAK_LENGTH and line in text):
                problems.append(f"{name}: solution text {line!r}")
        for marker in sorted({m.group(0) for m in MARKERS.finditer(text)}):
            problems.append(f"{name}: marker {marker!r}")
        if name.endswith(".ipynb"):
            for cell in nbformat.reads(text, as_version=4).cells:
                if cell.cell_type == "code" and (cell.outputs or cell.execution_count):
                    problems.append(f"{name}: a code cell keeps its outputs")
                    break
    return problems


def _with_success_messages(source: Path, target: Path) -> None:
    """The source notebook with a success message on each test cell (otter prints it after a pass)."""
    notebook = nbformat.read(source, as_version=4)
    in_tests = False
    for cell in notebook.cells:
        if cell.cell_type == "raw" and cell.source.strip().startswith(("# BEGIN TESTS", "# END TESTS")):
            in_tests = cell.source.strip().startswith("# BEGIN")
        elif in_tests and cell.cell_type == "code" and "BEGIN TEST CONFIG" not in cell.source:
            cell.source = (f'""" # BEGIN TEST CONFIG\nsuccess_message: "{SUCCESS}"\n""" # END TEST CONFIG\n'
                           + cell.source)
    nbformat.write(notebook, target)


def _init_cell_any_name(notebook_path: Path, target: Path) -> None:
    """otter's init cell names the file (`otter.Notebook("02_rope.ipynb")`: a renamed download, `02_rope (1).ipynb`,
    raises there and every check then fails with NameError); make it find the notebook whatever its name
    (exercises.feedback.notebook_file)."""
    notebook = nbformat.read(notebook_path, as_version=4)
    first = notebook.cells[0]
    otter_init = f'grader = otter.Notebook("{notebook_path.name}")'
    if first.cell_type != "code" or otter_init not in first.source:
        raise ReleaseError(f"{notebook_path.name}: otter's init cell ({otter_init}) is not the first cell")
    first.source = first.source.replace(otter_init, "from exercises.feedback import notebook_file\n\n"
                                        f'grader = otter.Notebook(notebook_file("{notebook_path.stem}"))')
    nbformat.write(notebook, target)


def release(names: list[str] | None = None, out_dir: Path = DEFAULT_OUT) -> list[Path]:
    """Release the named assignments (all by default) into out_dir; raise ReleaseError on any leak, leaving
    nothing in out_dir."""
    from otter.assign import main as otter_assign  # slow to import: only here

    sources = [assignments.load(n).path for n in (names or assignments.names())]
    with tempfile.TemporaryDirectory() as staging:
        ready = Path(staging, "release")
        ready.mkdir()
        for source in sources:
            work = Path(staging, source.stem)
            work.mkdir()
            _with_success_messages(source, work / source.name)
            try:
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    otter_assign(str(work / source.name), str(work / "dist"), no_pdfs=True, no_run_tests=True)
            except BaseException as error:  # otter's asserts and sys.exit too: the release stops
                raise ReleaseError(f"otter assign failed on {source.name}: {type(error).__name__}: {error}")
            _init_cell_any_name(work / "dist" / "student" / source.name, ready / source.name)
        problems = find_leaks(ready, sources)
        if problems:
            raise ReleaseError("the release leaks (nothing was written):\n" + "\n".join(problems))
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for source in sources:
            shutil.copyfile(ready / source.name, out_dir / source.name)
            written.append(out_dir / source.name)
    return written
