"""Grade a folder of submitted notebooks: `python -m exercises grade ASSIGNMENT SUBMISSIONS_DIR OUT_DIR --seed N`.

The grader never runs a submission's code in its own process, and takes no verdict from the submission's
process. Per submission:
1. read the notebook's code cells (exercises.static_check): a library route to a question's job scores 0 on that
   question; a route around the check (computed names, eval, files, shells, other imports) on every question;
2. kernel questions: take the contract's `@triton.jit` function from the source, compile it for a GPU target in
   a process of the grader's (exercises.kernel_compile), then launch it from the contract's harness in a fresh
   sandbox (exercises.contracts): the learner's wrapper is not involved;
3. other questions: run the cells in a sandbox (exercises.sandbox) that holds a scaffold refimpl without the
   definitions the questions ask for (one sandbox per set of such definitions), send each case's inputs, and
   compare what comes back with refimpl's answer here (exercises.scoring); a question that calls earlier
   questions' functions (`Question.depends_on`) runs in a sandbox of its own where those names ask the grader for
   the reference's result, so that a mistake there is charged once, to the earlier question;
4. write every output once all are graded (exercises.outputs).
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nbformat
import torch
from tqdm import tqdm

from exercises import assignments, outputs, sandbox, static_check
from exercises.contracts import CONTRACTS
from exercises.kernel_compile import compile_kernels
from exercises.outputs import Report, Test
from exercises.protocol import Call, Conversation, Limits, Outcome
from exercises.questions import QUESTIONS
from exercises.scoring import Case, build_cases, reference_answer, verdict

__all__ = ["Limits", "Report", "grade", "read_cells"]


def read_cells(path: Path) -> list[str]:
    """The code cells of a notebook; raises ValueError with the reason when it is not a readable notebook."""
    try:
        notebook = nbformat.read(path, as_version=4)
    except Exception as error:  # not JSON, not a notebook, wrong encoding... (its text is not echoed)
        raise ValueError(f"not a readable notebook ({type(error).__name__})") from None
    cells = notebook.get("cells")
    if not isinstance(cells, list):
        raise ValueError("not a readable notebook (no list of cells)")
    return [c.get("source", "") for c in cells if isinstance(c, dict) and c.get("cell_type") == "code"
            and isinstance(c.get("source", ""), str)]


def _removed(question, modules: set[str]) -> frozenset[str]:
    """The refimpl definitions the question's sandbox must not have, among the modules it gets."""
    return frozenset(name for name in question.forbidden if any(name.startswith(m + ".") for m in modules))


class Grader:
    """What is shared by every submission of one run: cases, runtimes (one per scaffold), isolation, compiles."""

    def __init__(self, assignment: assignments.Assignment, seed: int, limits: Limits, work: Path,
                 hide: tuple[Path, ...], visible_share: float | None = None):
        self.assignment, self.limits, self.hide = assignment, limits, hide
        self.isolation = sandbox.detect()
        self.cases = build_cases(assignment, seed, visible_share)
        self.questions = [q for q, _ in assignment.questions]
        self.modules = set(sandbox.closure(assignment.exercise.may_import))
        self.runtimes: dict[frozenset[str], Path] = {}
        for q in self.questions:  # one scaffold per set of deleted definitions
            key = _removed(q, self.modules) if not q.triton else frozenset()
            if key not in self.runtimes:
                self.runtimes[key] = sandbox.build_runtime(work / f"runtime{len(self.runtimes)}",
                                                           assignment.exercise.may_import, set(key))
        self.compiled: dict[str, str | None] = {}  # kernel source -> None (compiled) or why not

    def _stand_ins(self, question) -> tuple[str, ...]:
        """The earlier questions of this assignment that `question` may call: references stand in for them."""
        return tuple(n for n in question.depends_on if n in {q.name for q in self.questions})

    def _compile(self, sources: dict[str, str]) -> dict[str, str | None]:
        todo = {q: s for q, s in sources.items() if s not in self.compiled}
        for q, result in compile_kernels(todo).items():
            self.compiled[todo[q]] = result
        return {q: self.compiled[s] for q, s in sources.items()}

    def grade_one(self, path: Path, student: str) -> Report:
        """Grade one submission; never raises (every failure becomes a reason in the report)."""
        report = Report(student, outputs.file_name(path))
        started = time.monotonic()
        report.tests = [Test(f"{c.question.name} ({c.label})", c.units, c.label.split()[0], question=c.question.name)
                        for c in self.cases]
        try:
            cells = read_cells(path)
        except ValueError as error:
            report.notes.append(str(error))
            for t in report.tests:
                t.output = "not graded: the notebook could not be read"
            return report
        try:
            self._grade_cells(cells, report, started)
        except Exception as error:  # a bug in the grader: this submission gets a reason, the others go on
            report.notes.append(f"grader error: {type(error).__name__}: {error}")
        report.seconds = time.monotonic() - started
        return report

    def _grade_cells(self, cells: list[str], report: Report, started: float) -> None:
        deadline = started + self.limits.submission_timeout
        refused: dict[str, str] = {}  # question -> why it scores 0 whatever it answers
        plain = [q for q in self.questions if not q.triton]
        if plain:
            findings = static_check.check_cells(cells, plain, self.assignment.exercise.may_import)
            report.notes += findings.everything[:10]
            for q in plain:
                if findings.everything:
                    refused[q.name] = "0 points: the notebook " + findings.everything[0].split(": ", 1)[-1] + \
                        " (see the notes)"
                elif q.name in findings.by_question:
                    refused[q.name] = "0 points: " + findings.by_question[q.name][0]
        kernels = {}
        for q in (q for q in self.questions if q.triton):
            try:
                kernels[q.name] = static_check.kernel_source(cells, CONTRACTS[q.name], q.routes)
            except static_check.KernelRefused as error:
                refused[q.name] = f"0 points: {error}"
        for q, problem in self._compile(kernels).items():
            if problem:
                refused[q] = f"0 points: {CONTRACTS[q].kernel} {problem}"
                del kernels[q]
        outcomes: dict[int, Outcome] = {}
        skip: list[int] = []  # cells that hung or ended the process: not run again in the next sandboxes
        groups: dict[tuple, list[int]] = {}  # (scaffold, stand-ins) -> cases: one sandbox each
        for i, case in enumerate(self.cases):
            if case.question.name in refused:
                outcomes[i] = Outcome(failure=refused[case.question.name])
            elif case.question.triton:
                groups.setdefault((None, ()), []).append(i)
            else:
                groups.setdefault((_removed(case.question, self.modules), self._stand_ins(case.question)),
                                  []).append(i)
        for (key, stand_ins), indices in groups.items():
            if key is None:
                init = {"mode": "kernel", "kernels": kernels}
            else:
                init = {"mode": "cells", "cells": cells, "skip": skip, "stand_ins": {
                    n: (QUESTIONS[n].arg_names, QUESTIONS[n].mutated_args) for n in stand_ins}}
            runtime = self.runtimes[frozenset() if key is None else key]
            talk = Conversation(self.isolation, runtime, self.hide, self.limits, init, report.notes, deadline)
            calls = [Call(c.question.name, c.args, c.question.mutated_args,
                          c.question.call_timeout * self.limits.call_timeout_scale, c.question.memory_budget_mb,
                          functools.partial(reference_answer, c) if stand_ins else None)
                     for c in (self.cases[i] for i in indices)]
            outcomes.update(zip(indices, talk.run(calls)))
            if key is not None:
                skip = talk.init["skip"]
        for i, (case, test) in enumerate(zip(self.cases, report.tests)):
            passed, test.output = verdict(case, outcomes[i])
            test.units = test.max_units if passed else 0


def grade(assignment_name: str, submissions: Path, out_dir: Path, seed: int, jobs: int | None = None,
          limits: Limits = Limits(), progress: bool = True, visible_share: float | None = None) -> list[Report]:
    """Grade every file in `submissions`; write the outputs to `out_dir`; return the reports. `visible_share`:
    the share of each question's points on its visible cases (default: every case weighs the same)."""
    assignment = assignments.load(assignment_name)
    torch.set_num_threads(1)
    paths = sorted(Path(submissions).iterdir())
    ids = outputs.student_ids(paths)
    reports: list[Report | None] = [None] * len(paths)
    with tempfile.TemporaryDirectory(prefix="grade-run-") as work:
        os.chmod(work, 0o755)  # the runtimes inside are read by uid nobody
        grader = Grader(assignment, seed, limits, Path(work), (Path(submissions), Path(out_dir)), visible_share)
        print(grader.isolation.description, file=sys.stderr)

        def run(k: int) -> None:
            path = paths[k]
            if path.is_file() and not path.is_symlink():  # a link could point at any file the grader can read
                try:
                    reports[k] = grader.grade_one(path, ids[k])
                    return
                except Exception as error:  # a grader bug: this file still gets its row
                    note = f"grader error: {type(error).__name__}: {error}"
            else:
                note = "not a plain file: expected one .ipynb notebook per student"
            reports[k] = Report(ids[k], outputs.file_name(path), notes=[note])
            reports[k].tests = [Test(f"{c.question.name} ({c.label})", c.units, c.label.split()[0],
                                     output="not graded", question=c.question.name) for c in grader.cases]

        jobs = jobs or os.cpu_count() or 1
        with ThreadPoolExecutor(jobs) as pool, tqdm(total=len(paths), desc="grading", unit="notebook",
                                                    disable=not progress) as bar:
            for _ in pool.map(lambda k: (run(k), bar.update())[0], range(len(paths))):
                pass
    outputs.write(Path(out_dir), reports, grader.isolation.description)
    return reports


__all__ += ["Case", "Grader"]
