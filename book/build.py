"""Build the course book: stage the notebooks, write the table of contents and landing page, run Jupyter Book.

    python book/build.py [--out DIR]     (what `make book` runs; the site lands in DIR, default book/_build/html)

Every notebook in `lessons/` becomes a page, rendered from its stored outputs (nothing is executed), and so does
every exercise source in `exercises/src/`, reduced to its statement (cells marked as solutions are dropped, code
outputs cleared). The table of contents and the lesson map on the landing page are generated from the notebooks
present, with each page titled by its notebook's first heading: a new lesson needs no change here.
"""

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

BOOK = Path(__file__).resolve().parent
ROOT = BOOK.parent
SOLUTION_MARK = re.compile(r"BEGIN SOLUTION|END SOLUTION|^\s*#+\s*SOLUTION\b", re.MULTILINE)


def notebook_title(path: Path) -> str:
    """The text of the notebook's first Markdown heading; the file name when it has none."""
    for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]:
        if cell["cell_type"] == "markdown":
            match = re.search(r"^#+\s+(.+?)\s*$", "".join(cell["source"]), re.MULTILINE)
            if match:
                return match.group(1)
    return path.stem


def course_notebooks(root: Path = ROOT) -> dict[str, list[Path]]:
    """The notebooks the book shows, by part: every lesson, then every exercise source, in file-name order."""
    return {"Lessons": sorted((root / "lessons").glob("*.ipynb")),
            "Exercises": sorted((root / "exercises" / "src").glob("*.ipynb"))}


def is_solution(cell: dict) -> bool:
    """True for a cell an instructor marked as a solution (a tag, nbgrader metadata, or a SOLUTION marker)."""
    tags = [t.lower() for t in cell.get("metadata", {}).get("tags", [])]
    nbgrader = cell.get("metadata", {}).get("nbgrader", {})
    return (any("solution" in t for t in tags) or nbgrader.get("solution", False)
            or bool(SOLUTION_MARK.search("".join(cell["source"]))))


def exercise_statement(nb: dict) -> dict:
    """The exercise as a learner receives it: solution cells dropped, code outputs and counts cleared."""
    cells = [c for c in nb["cells"] if not is_solution(c)]
    for cell in cells:
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
    return {**nb, "cells": cells}


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def without_widgets(nb: dict) -> dict:
    """The lesson without its live widgets: a progress bar's display is dropped (in the book it would need the
    widget renderer from a CDN, and its stored text is the bar's first frame, 0%); the numbers it showed are
    printed by the lesson's own cells."""
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"] = [o for o in cell["outputs"] if WIDGET_VIEW not in o.get("data", {})]
    nb.get("metadata", {}).pop("widgets", None)
    return nb


def landing_page(parts: dict[str, list[Path]], root: Path) -> str:
    """The landing page: what the book is, how to run it, and the lesson map (one row per notebook)."""
    lines = [(BOOK / "intro.md").read_text(encoding="utf-8").rstrip(), ""]
    for part, paths in parts.items():
        if not paths:
            continue
        lines += [f"## {part}", "", "| # | title | notebook |", "|---|---|---|"]
        for path in paths:
            rel = path.relative_to(root).with_suffix("").as_posix()
            number = path.stem.split("_")[0]
            lines.append(f"| {number} | [{notebook_title(path)}]({rel}.ipynb) | `{path.relative_to(root)}` |")
        lines.append("")
    return "\n".join(lines)


def table_of_contents(parts: dict[str, list[Path]], root: Path) -> str:
    """`_toc.yml` in Jupyter Book 1's format: the landing page, then one captioned part per kind of notebook."""
    lines = ["format: jb-book", "root: index", "parts:"]
    for part, paths in parts.items():
        if paths:
            lines += [f"  - caption: {part}", "    chapters:"]
            lines += [f"      - file: {p.relative_to(root).with_suffix('').as_posix()}" for p in paths]
    return "\n".join(lines) + "\n"


def stage(src: Path, root: Path = ROOT) -> None:
    """Write the book's sources into `src`: config, local extension, notebooks, generated toc and landing page."""
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    for name in ("_config.yml", "offline_book.py"):
        shutil.copy(BOOK / name, src / name)
    parts = course_notebooks(root)
    for part, paths in parts.items():
        for path in paths:
            target = src / path.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            nb = json.loads(path.read_text(encoding="utf-8"))
            nb = exercise_statement(nb) if part == "Exercises" else without_widgets(nb)
            target.write_text(json.dumps(nb, indent=1), encoding="utf-8")
    (src / "_toc.yml").write_text(table_of_contents(parts, root), encoding="utf-8")
    (src / "index.md").write_text(landing_page(parts, root), encoding="utf-8")


def build(out: Path, root: Path = ROOT, timeout: float | None = None, quiet: bool = False) -> Path:
    """Build the site into `out` (replaced if present) and return it; `quiet` prints Sphinx's log only on failure.

    Raises RuntimeError (with the log) if Sphinx fails or warns, TimeoutExpired after `timeout` seconds.
    """
    work = out.parent / (out.name + ".work")
    stage(work / "src", root)
    cmd = [sys.executable, "-c", "from jupyter_book.cli.main import main; main()",  # the jupyter-book command
           "build", str(work / "src"), "--path-output", str(work), "--builder", "html",
           "--warningiserror", "--keep-going"]  # a warning (a broken cross-reference, say) fails the build
    done = subprocess.run(cmd, timeout=timeout, stdout=subprocess.PIPE if quiet else None,
                          stderr=subprocess.STDOUT if quiet else None, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the book build failed (a Sphinx error or warning):\n{(done.stdout or '')[-5000:]}")
    if out.exists():
        shutil.rmtree(out)
    shutil.move(work / "_build" / "html", out)
    shutil.rmtree(work)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=BOOK / "_build" / "html", help="folder for the built site")
    out = parser.parse_args().out.resolve()
    start = time.monotonic()
    build(out)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"book built in {time.monotonic() - start:.0f} s: {out} ({size / 1e6:.0f} MB); "
          f"open {out / 'index.html'} or serve it: python -m http.server -d {out}")


if __name__ == "__main__":
    main()
