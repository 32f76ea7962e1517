"""The grader's outputs, written so that no one submission can break them for the others.

In OUT_DIR: `summary.csv` (one row per input file: score, maximum, one column per question, seconds, reasons),
`scores.csv` (one row per student and test case), `ids.csv` (each input file's name and the student id it got),
`isolation.txt` (how the submissions were isolated) and `students/<id>/results.json` (Gradescope's format; the
file the student may see: the grader's isolation is not in it). Whatever a submission's name or text:

- student ids are unique and predictable: the file name without `.ipynb` when it is plain (letters, digits,
  `_`, `-`, `.`; not starting with `-` or `.`), else that name made plain plus `-` and 8 hex digits of the
  SHA-256 of the file name's bytes (`a b.ipynb` -> `a_b-1c2d3e4f`; the real `a_b.ipynb` keeps `a_b`);
- every text is capped (MESSAGE_CAP characters) and any character survives: lone surrogates and bytes that are
  not UTF-8 are written as `\\udce9` escapes;
- a CSV cell starting with `=`, `+`, `-`, `@`, a tab or a carriage return is prefixed with `'` (no formula);
- every score shows 4 decimals; totals are sums of exact units (exercises.scoring).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from exercises.scoring import MESSAGE_CAP, UNITS

PLAIN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")


@dataclass
class Test:
    name: str
    max_units: int
    visibility: str  # "visible" or "hidden" (Gradescope's names)
    units: int = 0
    output: str = ""
    question: str = ""  # the question this case belongs to (summary.csv's per-question columns)


@dataclass
class Report:
    student: str
    file: str  # the input file's name, escaped
    tests: list[Test] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # why points were lost beyond the tests' own messages
    seconds: float = 0.0

    @property
    def units(self) -> int:
        return sum(t.units for t in self.tests)

    @property
    def max_units(self) -> int:
        return sum(t.max_units for t in self.tests)

    @property
    def score(self) -> float:
        return self.units / UNITS

    @property
    def max_score(self) -> float:
        return self.max_units / UNITS


def safe_text(value, cap: int = MESSAGE_CAP) -> str:
    """Any string (lone surrogates included) as printable UTF-8 text of at most `cap` characters."""
    text = str(value)
    if len(text) > cap:
        text = text[:cap] + f" ... ({len(text) - cap:,} more characters)"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def file_name(path: Path) -> str:
    """The file's name as text (bytes that are not UTF-8 escaped)."""
    return safe_text(os.fsencode(path.name).decode("utf-8", "surrogateescape"), 300)


def student_id(path: Path) -> str:
    """The id of the student who handed in `path` (see the module docstring): depends on its name alone."""
    raw = os.fsencode(path.name)
    stem = raw[:-6] if raw.endswith(b".ipynb") else raw
    text = stem.decode("utf-8", "surrogateescape")
    if PLAIN.fullmatch(text) and text not in (".", ".."):
        return text
    plain = re.sub(r"[^A-Za-z0-9_.-]", "_", text.encode("ascii", "replace").decode())[:60].lstrip(".-")
    return f"{plain or 'student'}-{hashlib.sha256(raw).hexdigest()[:8]}"


def student_ids(paths: list[Path]) -> list[str]:
    """Ids for every path; a clash (a plain name equal to another's made-plain id) gets a hash suffix too."""
    ids = [student_id(p) for p in paths]
    seen: set[str] = set()
    for i, (path, sid) in enumerate(zip(paths, ids)):
        if sid in seen:
            sid = f"{sid}-{hashlib.sha256(os.fsencode(path.name) + b'/').hexdigest()[:8]}"
        seen.add(sid)
        ids[i] = sid
    return ids


def cell(value) -> str:
    """One CSV cell: safe text, formula characters neutralized."""
    text = safe_text(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def points(units: int) -> str:
    return f"{units / UNITS:.4f}"


def _reason(report: Report) -> str:
    parts = list(report.notes)
    lost = [f"{t.name}: {t.output}" for t in report.tests if t.units < t.max_units]
    parts += lost[:3] + ([f"... and {len(lost) - 3} more tests"] if len(lost) > 3 else [])
    return " | ".join(parts)


def _per_question(report: Report, questions: list[str]) -> list[str]:
    """The report's score on each question, in `questions`' order."""
    return [points(sum(t.units for t in report.tests if t.question == q)) for q in questions]


def write(out_dir: Path, reports: list[Report], isolation: str) -> None:
    """The CSVs, the id map, `isolation.txt` (how the submissions were isolated: for the instructor) and each
    student's results.json (which names no seed, no hidden input and not the grader's isolation)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "ids.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "student"])
        writer.writerows([cell(r.file), cell(r.student)] for r in reports)
    with open(out_dir / "scores.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["student", "test", "score", "max_score", "output"])
        for r in reports:
            writer.writerows([cell(r.student), cell(t.name), points(t.units), points(t.max_units), cell(t.output)]
                             for t in r.tests)
    questions = list(dict.fromkeys(t.question for r in reports for t in r.tests if t.question))
    with open(out_dir / "summary.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["student", "file", "score", "max_score"] + [cell(q) for q in questions] +
                        ["seconds", "reason"])
        writer.writerows([cell(r.student), cell(r.file), points(r.units), points(r.max_units)] +
                         _per_question(r, questions) + [f"{r.seconds:.1f}", cell(_reason(r))] for r in reports)
    (out_dir / "isolation.txt").write_text(safe_text(isolation) + "\n", encoding="utf-8")
    for r in reports:
        folder = out_dir / "students" / r.student
        folder.mkdir(parents=True, exist_ok=True)
        results = {"score": round(r.units / UNITS, 4),  # exact: Gradescope's own sum of the tests' floats is not
                   "tests": [{"name": safe_text(t.name), "score": round(t.units / UNITS, 4),
                              "max_score": round(t.max_units / UNITS, 4), "output": safe_text(t.output),
                              "visibility": t.visibility} for t in r.tests],
                   "output": safe_text("\n".join(r.notes), 4 * MESSAGE_CAP),
                   "execution_time": round(r.seconds, 1)}
        (folder / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=True), encoding="utf-8")
