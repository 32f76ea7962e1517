"""Grade a folder of submitted notebooks: `python -m exercises grade ASSIGNMENT SUBMISSIONS_DIR OUT_DIR --seed N`.

The grader never runs a submission's code in its own process. Per submission it parses the notebook, starts a
sandboxed process (`exercises._child`) that runs the notebook's code cells, then sends it the inputs of each
test case (visible cases from a fixed seed, hidden cases drawn from the instructor's `--seed`) and compares what
comes back with refimpl's answer, here. The sandbox: its own session and process group (killed whole at the
end), a wall-clock limit per cell and per call, memory (RLIMIT_AS), file-size and process-count limits, a
private HOME and TMPDIR; as root on Linux also new mount, network and PID namespaces (no network; every process
it starts dies with it; private /tmp) and an unprivileged uid (it can write nowhere in the grader's files).
Where that is not possible the grader says in one line what isolation is missing and goes on.

Outputs, written by the grader once every submission is graded: `scores.csv` (one row per student and test),
`summary.csv` (one row per input file, with the reason when a score is 0 and a flag for review when tampering
was seen) and `<student>/results.json` in Gradescope's format.
"""

from __future__ import annotations

import csv
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import torch
from tqdm import tqdm

from exercises import assignments, wire
from exercises.compare import mismatch
from exercises.questions import Question

REPO_ROOT = Path(__file__).resolve().parent.parent
NOBODY = 65534
MAX_RESTARTS = 4  # sandbox restarts per submission (after a hang or a crash) before the rest is given up


@dataclass(frozen=True)
class Limits:
    memory_mb: int = 3072  # address space of the submission's process
    cell_timeout: float = 60.0  # seconds per notebook cell
    startup_timeout: float = 120.0  # seconds to start Python and import torch
    call_timeout_scale: float = 1.0  # multiplies each question's per-call limit
    submission_timeout: float = 600.0  # seconds per submission in all


@dataclass
class Test:
    name: str
    max_score: float
    visibility: str  # "visible" or "hidden" (Gradescope's names)
    score: float = 0.0
    output: str = ""


@dataclass
class Report:
    student: str
    file: str
    tests: list[Test] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # why points were lost beyond the tests' own messages
    tampering: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def score(self) -> float:
        return sum(t.score for t in self.tests)

    @property
    def max_score(self) -> float:
        return sum(t.max_score for t in self.tests)


# ---------------------------------------------------------------------------------------------------- sandbox
def _visible_paths() -> list[Path]:
    """What the sandboxed process must read: the interpreter, the venv, every import path, the repository."""
    paths = {Path(sys.base_prefix), Path(sys.prefix), REPO_ROOT}
    paths.update(Path(p) for p in sys.path if p and Path(p).is_dir())
    return sorted(p.resolve() for p in paths)


def _hidden_ancestor(path: Path) -> Path | None:
    """The outermost directory above `path` that other users cannot enter (e.g. /root), if any."""
    for parent in reversed(path.parents):
        if parent != Path("/") and not os.stat(parent).st_mode & 0o001:
            return parent
    return None


TEMP_DIRS = ("/tmp", "/dev/shm", "/var/tmp")  # each gets a private, empty tmpfs in the sandbox


def _namespace_script() -> str:
    """Shell run as root in the new namespaces: private /tmp, /dev/shm, /var/tmp; hide directories other users
    cannot enter; keep the paths Python needs (bound aside first, so that a checkout or venv that lives under
    /tmp, as in many CI jobs, stays visible); then drop to uid nobody and exec Python."""
    def hidden(path: Path) -> bool:
        return _hidden_ancestor(path) is not None or any(path.is_relative_to(d) for d in TEMP_DIRS)

    keep = [p for p in _visible_paths() if hidden(p)]
    lines = ["set -e", "mkdir -p /mnt", "mount -t tmpfs -o mode=700 tmpfs /mnt"]  # root-only holding place
    lines += [f"mkdir -p /mnt/keep/{i} && mount --bind '{path}' /mnt/keep/{i}" for i, path in enumerate(keep)]
    lines += [f"mount -t tmpfs -o size={'512m' if d == '/tmp' else '16m'},mode=1777 tmpfs {d}"
              for d in TEMP_DIRS if os.path.isdir(d)]
    for ancestor in sorted({a for p in keep if (a := _hidden_ancestor(p)) is not None}):
        lines.append(f"mount -t tmpfs -o mode=755 tmpfs '{ancestor}'")
    lines += [f"mkdir -p '{path}' && mount --bind /mnt/keep/{i} '{path}'" for i, path in enumerate(keep)]
    lines += [f"mkdir -p /tmp/home /tmp/work && chown {NOBODY}:{NOBODY} /tmp/home /tmp/work", "cd /tmp/work",
              f"exec setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups --no-new-privs "
              "--inh-caps=-all --bounding-set=-all \"$@\""]
    return "\n".join(lines)


def _isolation() -> tuple[list[str] | None, str]:
    """(command prefix for the namespaces, or None; a one-line description of the isolation)."""
    if sys.platform != "linux":
        return None, (f"isolation: {sys.platform}: time limits, memory limit where the system enforces "
                      "RLIMIT_AS (macOS does not), own process group and private temp directory only; no "
                      "network/PID namespace, no unprivileged uid (run on Linux as root for those)")
    if os.geteuid() != 0:
        return None, ("isolation: not root: time and memory limits, own process group and private temp directory "
                      "only; no network/PID namespace, no unprivileged uid (a process a submission detaches "
                      "could outlive it; run as root for full isolation)")
    prefix = ["unshare", "--mount", "--net", "--pid", "--fork", "--kill-child", "--mount-proc",
              "--propagation", "private", "/bin/sh", "-c", _namespace_script(), "sh"]
    missing = [tool for tool in ("unshare", "setpriv") if shutil.which(tool) is None]
    if not missing:
        probe = subprocess.run(prefix + ["/bin/true"], capture_output=True, text=True, timeout=60)
        if probe.returncode == 0:
            return prefix, ("isolation: full (mount, network and PID namespaces, uid nobody, time, memory and "
                            "file limits)")
        missing = [probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else "unshare failed"]
    return None, (f"isolation: namespaces unavailable ({'; '.join(missing)}): time and memory limits, own "
                  "process group and private temp directory only; no network/PID namespace, no unprivileged uid")


FILE_SIZE = 256 << 20  # bytes, the largest file the submission may write
PROCESSES = 1024  # processes and threads of uid nobody (or of the grader's uid, without root)


def _prlimit(memory_mb: int) -> list[str]:
    # the process count is per uid: limited only for uid nobody (as root), not for a user's whole session
    nproc = [f"--nproc={PROCESSES}"] if os.geteuid() == 0 else []
    return ["prlimit", f"--as={memory_mb << 20}", f"--fsize={FILE_SIZE}", "--core=0", *nproc, "--"]


def _set_limits(memory_mb: int) -> None:
    """Where `prlimit` is missing (macOS): the same limits from Python; one the system refuses is skipped."""
    limits = [(resource.RLIMIT_AS, memory_mb << 20), (resource.RLIMIT_FSIZE, FILE_SIZE), (resource.RLIMIT_CORE, 0)]
    if os.geteuid() == 0:
        limits.append((resource.RLIMIT_NPROC, PROCESSES))
    for kind, value in limits:
        try:
            resource.setrlimit(kind, (value, value))
        except (ValueError, OSError):
            pass


class Sandbox:
    """One submission's process: started, told what to run, asked to call functions, killed whole."""

    def __init__(self, prefix: list[str] | None, limits: Limits, cells: list[str], skip: set[int],
                 forbidden: list[str], triton: bool):
        self.limits = limits
        self.tmp = tempfile.mkdtemp(prefix="grade-")
        home = "/tmp/home" if prefix else self.tmp
        env = {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": "/tmp/work" if prefix else self.tmp,
               "PYTHONPATH": str(REPO_ROOT), "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0",
               "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TRITON_INTERPRET": "1",
               "MPLCONFIGDIR": f"{home}/.mpl", "TRITON_CACHE_DIR": f"{home}/.triton", "LANG": "C.UTF-8"}
        command = (prefix or []) + [sys.executable, "-m", "exercises._child"]
        preexec = None
        if shutil.which("prlimit"):  # a command, not preexec_fn, which is unsafe with the grader's threads
            command = _prlimit(limits.memory_mb) + command
        else:
            preexec = lambda: _set_limits(limits.memory_mb)  # noqa: E731
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
            cwd=self.tmp, start_new_session=True, preexec_fn=preexec)
        self.stderr_tail: deque[bytes] = deque(maxlen=16)
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        self.out, self.into = self.process.stdout.fileno(), self.process.stdin.fileno()
        os.set_blocking(self.into, False)  # a process that stops reading cannot block the grader
        try:
            wire.write(self.into, {"cells": cells, "skip": sorted(skip), "forbidden": forbidden,
                                   "triton": triton}, deadline=time.monotonic() + limits.startup_timeout)
        except (OSError, wire.Timeout):
            self.kill()
            raise

    def _drain_stderr(self) -> None:
        """Keep the last bytes of the submission's stderr (it may print hundreds of MB)."""
        for line in iter(lambda: self.process.stderr.read(1 << 16), b""):
            self.stderr_tail.append(line)

    def read(self, timeout: float):
        return wire.read(self.out, deadline=time.monotonic() + timeout)

    def call(self, name: str, args: tuple, mutated: tuple[int, ...], forbidden: tuple[str, ...], timeout: float):
        deadline = time.monotonic() + timeout
        wire.write(self.into, {"name": name, "args": wire.dumps(args), "mutated": mutated, "forbidden": forbidden},
                   deadline=deadline)
        return wire.read(self.out, deadline=deadline)

    def kill(self) -> None:
        """Kill the process group (and with it the PID namespace, where there is one)."""
        try:
            os.killpg(self.process.pid, 9)
        except ProcessLookupError:
            pass
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- grading
@dataclass
class Case:
    question: Question
    label: str
    args: tuple
    expected: object
    expected_mutated: tuple
    points: float


def build_cases(assignment: assignments.Assignment, seed: int) -> list[Case]:
    """Every test case of the assignment, with refimpl's answers: the visible ones, then the hidden ones."""
    cases = []
    for question, points in assignment.questions:
        drawn = question.cases(None) + question.cases(seed)
        for label, args in drawn:
            expected, mutated = question.expected(args)
            cases.append(Case(question, label, args, expected, mutated, points / len(drawn)))
    return cases


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


def _verdict(case: Case, reply: dict) -> tuple[bool, str]:
    q = case.question
    if reply.get("forbidden"):
        return False, "0 points: " + "; ".join(f"calls {name}" for name in reply["forbidden"]) + \
            f", which {q.name} must not use (the exercise asks you to write it)"
    if reply.get("error"):
        return False, f"raised {reply['error']}"
    if q.triton and not reply.get("launches"):
        return False, "launched no Triton kernel (kernel[grid](...)); the exercise is to write one"
    canon = q.canonical or (lambda x: x)
    problem = mismatch(canon(reply.get("value")), canon(case.expected), "the result", q.atol, q.rtol)
    for i, want in zip(q.mutated_args, case.expected_mutated):
        mutated = reply.get("mutated") or ()
        got = mutated[q.mutated_args.index(i)] if len(mutated) == len(q.mutated_args) else None
        problem = problem or mismatch(got, want, f"{q.arg_names[i]} after the call", q.atol, q.rtol)
    return problem is None, problem or "passed"


def grade_one(path: Path, student: str, cases: list[Case], prefix, limits: Limits) -> Report:
    """Grade one submission; never raises (every failure becomes a reason in the report)."""
    report = Report(student, path.name)
    started = time.monotonic()
    tests = [Test(f"{c.question.name} ({c.label})", c.points, c.label.split()[0]) for c in cases]
    report.tests = tests
    try:
        cells = read_cells(path)
    except ValueError as error:
        report.notes.append(str(error))
        for t in tests:
            t.output = "not graded: the notebook could not be read"
        return report
    forbidden = sorted({name for c in cases for name in c.question.forbidden})
    triton = any(c.question.triton for c in cases)
    skip: set[int] = set()
    restarts, failures = 0, {}
    sandbox = None
    try:
        i = 0
        while i < len(cases):
            case, test = cases[i], tests[i]
            if time.monotonic() - started > limits.submission_timeout:
                test.output = f"not run: the submission used up its {limits.submission_timeout:.0f} s"
                i += 1
                continue
            if failures.get(case.question.name, 0) >= 2:
                test.output = f"not run: {case.question.name} timed out or crashed on 2 earlier cases"
                i += 1
                continue
            if sandbox is None:
                if restarts > MAX_RESTARTS:
                    test.output = "not run: the submission's process was restarted too many times"
                    i += 1
                    continue
                sandbox, load_note = _start(prefix, limits, cells, skip, forbidden, triton, report,
                                            started + limits.submission_timeout)
                restarts += 1
                if sandbox is None:  # a cell hung or ended the process: skip it and start again
                    if load_note is not None:
                        skip.add(load_note)
                    continue
            timeout = case.question.call_timeout * limits.call_timeout_scale
            try:
                reply = sandbox.call(case.question.name, case.args, case.question.mutated_args,
                                     case.question.forbidden, timeout)
            except (wire.Timeout, wire.Closed, wire.BadMessage, OSError) as error:
                if isinstance(error, wire.Timeout):
                    test.output = f"took longer than {timeout:.0f} s (stopped)"
                elif isinstance(error, wire.BadMessage):
                    test.output = f"the process sent {error}"
                    report.tampering.append(f"sent {error}")
                else:  # wire.Closed, or a broken pipe
                    test.output = "the process ended during the call (exit, crash or memory limit)"
                failures[case.question.name] = failures.get(case.question.name, 0) + 1
                sandbox.kill()
                sandbox = None
                i += 1
                continue
            for note in reply.get("tampering") or []:
                if note not in report.tampering:
                    report.tampering.append(note)
            passed, test.output = _verdict(case, reply)
            test.score = test.max_score if passed else 0.0
            i += 1
    except Exception as error:  # a bug in the grader: this submission gets a reason, the others go on
        report.notes.append(f"grader error: {type(error).__name__}: {error}")
    finally:
        if sandbox is not None:
            sandbox.kill()
    report.seconds = time.monotonic() - started
    return report


def _start(prefix, limits: Limits, cells, skip, forbidden, triton, report: Report, end: float):
    """Start a sandbox and run the cells, by the time `end` at the latest. (sandbox, None) when loaded;
    (None, cell index) when a cell hung or ended the process, which is then skipped; (None, None) when the
    process failed to start or the time ran out."""
    current, timeout = None, limits.startup_timeout
    try:
        sandbox = Sandbox(prefix, limits, cells, skip, forbidden, triton)
    except (OSError, wire.Timeout) as error:
        report.notes.append(f"the submission's process did not start ({type(error).__name__}: {error})")
        return None, None
    try:
        while True:
            message = sandbox.read(min(timeout, end - time.monotonic()))
            if message.get("event") == "cell":
                current, timeout = message["index"], limits.cell_timeout
            elif message.get("event") == "loaded":
                for note in message.get("errors") or []:
                    if note not in report.notes:
                        report.notes.append(note)
                for note in message.get("tampering") or []:
                    if note not in report.tampering:
                        report.tampering.append(note)
                return sandbox, None
            else:
                raise wire.BadMessage("an unexpected message")
    except (wire.Timeout, wire.Closed, wire.BadMessage) as error:
        tail = b"".join(sandbox.stderr_tail).decode(errors="replace").strip().splitlines()[-1:]
        sandbox.kill()
        if time.monotonic() >= end:
            report.notes.append(f"the notebook's cells used up the submission's {limits.submission_timeout:.0f} s")
            return None, None
        if current is None:
            report.notes.append(f"the submission's process did not start ({type(error).__name__}"
                                f"{': ' + tail[0] if tail else ''})")
            return None, None
        what = {wire.Timeout: f"ran longer than {limits.cell_timeout:.0f} s",
                wire.Closed: "ended the process (exit, crash or memory limit)"}.get(type(error), f"sent {error}")
        report.notes.append(f"cell {current + 1} {what}: skipped, the other cells ran without it")
        if isinstance(error, wire.BadMessage):
            report.tampering.append(f"cell {current + 1} sent {error}")
        return None, current


# ---------------------------------------------------------------------------------------------------- outputs
def student_ids(paths: list[Path]) -> list[str]:
    """File name without extension, made safe as a folder name and unique."""
    seen, ids = set(), []
    for path in paths:
        base = re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem if path.suffix == ".ipynb" else path.name).strip(".")
        base = base or "student"
        sid, n = base, 1
        while sid in seen:
            n += 1
            sid = f"{base}_{n}"
        seen.add(sid)
        ids.append(sid)
    return ids


def _reason(report: Report) -> str:
    parts = list(report.notes)
    if report.score < report.max_score:
        lost = [f"{t.name}: {t.output}" for t in report.tests if t.score < t.max_score]
        parts += lost[:3] + ([f"... and {len(lost) - 3} more tests"] if len(lost) > 3 else [])
    return " | ".join(parts)


def write_outputs(out_dir: Path, reports: list[Report], isolation: str) -> None:
    """The CSVs and each student's results.json (which students may see: it names no seed and no input)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "scores.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["student", "test", "score", "max_score", "output"])
        for r in reports:
            for t in r.tests:
                writer.writerow([r.student, t.name, round(t.score, 4), round(t.max_score, 4), t.output])
    with open(out_dir / "summary.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["student", "file", "score", "max_score", "flagged", "seconds", "reason"])
        for r in reports:
            writer.writerow([r.student, r.file, round(r.score, 4), round(r.max_score, 4),
                             "yes: " + "; ".join(r.tampering) if r.tampering else "", round(r.seconds, 1),
                             _reason(r)])
    for r in reports:
        folder = out_dir / r.student
        folder.mkdir(exist_ok=True)
        output = "\n".join([isolation] + r.notes
                           + ([f"flagged for review: {'; '.join(r.tampering)}"] if r.tampering else []))
        results = {"tests": [{"name": t.name, "score": t.score, "max_score": t.max_score, "output": t.output,
                              "visibility": t.visibility} for t in r.tests],
                   "output": output, "execution_time": round(r.seconds, 1)}
        (folder / "results.json").write_text(json.dumps(results, indent=1))


def grade(assignment_name: str, submissions: Path, out_dir: Path, seed: int, jobs: int | None = None,
          limits: Limits = Limits(), progress: bool = True) -> list[Report]:
    """Grade every file in `submissions`; write the outputs to `out_dir`; return the reports."""
    assignment = assignments.load(assignment_name)
    prefix, isolation = _isolation()
    print(isolation, file=sys.stderr)
    torch.set_num_threads(1)
    cases = build_cases(assignment, seed)
    paths = sorted(p for p in Path(submissions).iterdir())
    ids = student_ids(paths)
    reports: list[Report | None] = [None] * len(paths)

    def run(k: int) -> None:
        path = paths[k]
        if path.is_file():
            try:
                reports[k] = grade_one(path, ids[k], cases, prefix, limits)
                return
            except Exception as error:  # a grader bug: this file still gets its row
                note = f"grader error: {type(error).__name__}: {error}"
        else:
            note = "not a file: expected one .ipynb notebook per student"
        reports[k] = Report(ids[k], path.name, notes=[note])
        reports[k].tests = [Test(f"{c.question.name} ({c.label})", c.points, c.label.split()[0],
                                 output="not graded") for c in cases]

    jobs = jobs or os.cpu_count() or 1
    with ThreadPoolExecutor(jobs) as pool, tqdm(total=len(paths), desc="grading", unit="notebook",
                                                disable=not progress) as bar:
        for _ in pool.map(lambda k: (run(k), bar.update())[0], range(len(paths))):
            pass
    write_outputs(Path(out_dir), reports, isolation)
    return reports
