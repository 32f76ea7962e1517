"""Gradescope autograder bundles: `python -m exercises gradescope NAME [NAME ...] --out DIR [--seed N]`.

One zip per assignment, `DIR/NAME-autograder.zip`, laid out as Gradescope's specification asks
(https://gradescope-autograders.readthedocs.io/en/latest/specs/): at its root `setup.sh` (run once, as root,
when Gradescope builds the image: apt-get installs Python and bubblewrap, pip installs the pinned packages of
`requirements.txt` into /opt/exercises-venv, torch from PyTorch's CPU index) and `run_autograder` (run per
submission: grades the one notebook in /autograder/submission with this package's grader and writes
/autograder/results/results.json). Beside them: `gradescope.json` (the assignment, the seed of the hidden cases,
the sandbox's limits), the `exercises`, `refimpl` and `dskernels` packages (Python files and refimpl's known
configs; of the source notebooks only this assignment's, which `exercises.assignments` reads for the points).

Gradescope unzips the bundle into /autograder/source. `run_autograder` calls `python -m exercises.gradescope`,
which does the work here (`run`), under AUTOGRADER_ROOT (default /autograder, set elsewhere for a test).

What the submission can see is what `exercises.sandbox` hides: with bubblewrap (the image has it; it needs a
container that allows namespaces) the submission sees the interpreter's folders and a scaffold refimpl only, not
/autograder; with namespaces, /autograder/source is covered; with uid nobody alone (root in a container that
forbids namespaces) it sees what any user may read. `run` makes /autograder 0700 first, so that uid nobody can
read neither the seed nor the solved notebook nor write results.json. With limits only (not root) the
submission runs as the grader's user and could: a bundle refuses to grade then (every submission gets 0 and the
reason) unless it was built with `--allow-limits-only`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import tempfile
import traceback
import zipfile
from importlib import metadata
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG = "gradescope.json"
PACKAGES = ("exercises", "refimpl", "dskernels")
DATA = ("refimpl/known_configs",)  # folders of non-Python files the grader reads
PINNED = ("triton", "numpy", "tqdm", "safetensors", "matplotlib")  # constraints.txt: the grader, the notebooks
UNPINNED = ("nbformat", "PyYAML", "ipython")  # not in constraints.txt: pinned to the versions tested here
VENV = "/opt/exercises-venv"

SETUP_SH = r"""#!/usr/bin/env bash
# Gradescope runs this once, as root, when it builds the autograder image (Ubuntu 22.04 or 24.04, network on).
# It installs Python >= 3.11 and bubblewrap with apt-get, then the grader's packages into VENV with pip.
#   bash setup.sh --dry-run    prints the commands instead of running them (nothing is installed)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${EXERCISES_VENV:-__VENV__}"
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
run() { if [ "$DRY" = 1 ]; then echo "+ $*"; else "$@"; fi; }
export DEBIAN_FRONTEND=noninteractive

run apt-get update -qq
run apt-get install -y -qq --no-install-recommends ca-certificates bubblewrap util-linux python3 python3-venv
PY=""
for candidate in python3 python3.13 python3.12 python3.11; do
    if command -v "$candidate" >/dev/null &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        PY="$candidate"; break
    fi
done
if [ -z "$PY" ]; then  # Ubuntu 22.04's python3 is 3.10; its universe has 3.11
    run apt-get install -y -qq --no-install-recommends python3.11 python3.11-venv
    PY=python3.11
fi
run "$PY" -m venv "$VENV"
run "$VENV/bin/python" -m pip install -q --upgrade pip
run "$VENV/bin/python" -m pip install -q --index-url https://download.pytorch.org/whl/cpu "__TORCH__"
run "$VENV/bin/python" -m pip install -q -r "$HERE/requirements.txt"
# the grader imports, finds its assignment and says which isolation this image gives (in the build log)
run env PYTHONPATH="$HERE" "$VENV/bin/python" -m exercises.gradescope --check
"""

RUN_AUTOGRADER = r"""#!/usr/bin/env bash
# Gradescope runs this per submission, as root, from /autograder (AUTOGRADER_ROOT elsewhere, for a test):
# grades the one notebook in $ROOT/submission and writes $ROOT/results/results.json.
ROOT="${AUTOGRADER_ROOT:-/autograder}"
PYTHON="${EXERCISES_PYTHON:-__VENV__/bin/python}"
export AUTOGRADER_ROOT="$ROOT" PYTHONPATH="$ROOT/source"
exec "$PYTHON" -m exercises.gradescope 2>&1  # all in Gradescope's stdout, which only the instructor sees
"""


# ---------------------------------------------------------------------------------------------------- bundle
def requirements() -> str:
    """requirements.txt: constraints.txt's pins for what the grader imports, and the tested versions of the
    rest (read from this environment)."""
    pins = {}
    for line in (REPO_ROOT / "constraints.txt").read_text().splitlines():
        spec = line.split("#")[0].strip()
        name = spec.split("==")[0].strip()
        if name in PINNED:
            pins[name] = spec
    missing = [n for n in PINNED if n not in pins]
    if missing:
        raise ValueError(f"constraints.txt: expected pins for {missing}")
    lines = [pins[n] for n in PINNED] + [f"{n}=={metadata.version(n)}" for n in UNPINNED]
    return "# the grader's packages (torch comes first, from PyTorch's CPU index: see setup.sh)\n" + \
        "\n".join(lines) + "\n"


def torch_pin() -> str:
    for line in (REPO_ROOT / "constraints.txt").read_text().splitlines():
        if line.startswith("torch=="):
            return line.split("#")[0].strip()
    raise ValueError("constraints.txt: expected a line `torch==VERSION`")


def _package_files(name: str) -> list[Path]:
    """The files of the assignment's bundle, relative to the checkout."""
    from exercises import assignments

    files = []
    for package in PACKAGES:
        files += [p for p in (REPO_ROOT / package).glob("*.py")]
    for folder in DATA:
        files += [p for p in (REPO_ROOT / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    files.append(assignments.load(name).path)
    return sorted(p.relative_to(REPO_ROOT) for p in files)


def _add(archive: zipfile.ZipFile, name: str, data: bytes, executable: bool = False) -> None:
    info = zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0))  # fixed: the same inputs give the same zip
    info.external_attr = (0o755 if executable else 0o644) << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    archive.writestr(info, data)


def build_bundle(name: str, out_dir: Path, seed: int, allow_limits_only: bool = False,
                 memory_mb: int = 3072, cell_timeout: float = 60.0, call_timeout_scale: float = 1.0,
                 visible_share: float | None = None) -> Path:
    """Write `out_dir/NAME-autograder.zip` (see the module docstring); return its path. `visible_share`: as
    `grade --visible-share` (None: every case weighs the same).
    Raises ValueError for an unknown assignment or a constraints.txt without the pins."""
    from exercises import assignments  # torch: only where needed (run_autograder without a notebook is quick)

    assignments.load(name)  # a clear error for an unknown name before anything is written
    config = {"assignment": name, "seed": seed, "allow_limits_only": allow_limits_only, "memory_mb": memory_mb,
              "cell_timeout": cell_timeout, "call_timeout_scale": call_timeout_scale, "visible_share": visible_share}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}-autograder.zip"
    with zipfile.ZipFile(path, "w") as archive:
        _add(archive, "setup.sh", SETUP_SH.replace("__VENV__", VENV).replace("__TORCH__", torch_pin()).encode(),
             executable=True)
        _add(archive, "run_autograder", RUN_AUTOGRADER.replace("__VENV__", VENV).encode(), executable=True)
        _add(archive, "requirements.txt", requirements().encode())
        _add(archive, CONFIG, json.dumps(config, indent=1).encode())
        for relative in _package_files(name):
            _add(archive, relative.as_posix(), (REPO_ROOT / relative).read_bytes())
    return path


def build_bundles(names: list[str], out_dir: Path, seed: int | None = None, **options) -> tuple[list[Path], int]:
    """One bundle per assignment, all with the same seed (drawn at random when None); returns (paths, seed)."""
    seed = secrets.randbelow(2**31) if seed is None else seed
    return [build_bundle(n, out_dir, seed, **options) for n in names], seed


# ---------------------------------------------------------------------------------------------------- run
def _notebooks(submission: Path) -> list[Path]:
    """The notebooks a student handed in (any depth, checkpoints and links left out)."""
    if not submission.is_dir():
        return []
    return sorted(p for p in submission.rglob("*.ipynb") if p.is_file() and not p.is_symlink()
                  and ".ipynb_checkpoints" not in p.relative_to(submission).parts)


def _printable(path: Path) -> str:
    """A file name as printable text: bytes that are not UTF-8 as `\\xe9`, at most 100 characters."""
    return os.fsencode(path.as_posix()).decode("utf-8", "backslashreplace")[:100]


def _zero(message: str) -> dict:
    return {"score": 0.0, "output": message, "tests": []}


def _grade(config: dict, notebook: Path) -> dict:
    """Gradescope's results for one notebook: the grader's students/<id>/results.json (exact total included)."""
    from exercises import grade, sandbox

    isolation = sandbox.detect()
    if isolation.kind == "limits" and not config.get("allow_limits_only"):
        print(isolation.description, file=sys.stderr)
        return _zero("Not graded: the autograder's sandbox is not available on this machine (your instructor "
                     "sees why). Your score will come when your instructor has fixed it.")
    limits = grade.Limits(memory_mb=config.get("memory_mb", 3072), cell_timeout=config.get("cell_timeout", 60.0),
                          call_timeout_scale=config.get("call_timeout_scale", 1.0))
    with tempfile.TemporaryDirectory(prefix="gradescope-") as work:
        subs, out = Path(work, "submissions"), Path(work, "out")
        subs.mkdir()
        shutil.copyfile(notebook, subs / "submission.ipynb")  # a plain name: the id is "submission"
        [report] = grade.grade(config["assignment"], subs, out, int(config["seed"]), jobs=1, limits=limits,
                               progress=False, visible_share=config.get("visible_share"))
        results = json.loads((out / "students" / report.student / "results.json").read_text(encoding="utf-8"))
    return results


def run(root: Path) -> int:
    """Grade the submission under `root` (Gradescope's /autograder layout); always write results.json.
    Returns 0, or 1 when the grader itself failed (the traceback goes to stderr: run_autograder sends it to
    Gradescope's stdout, which only the instructor sees)."""
    results_dir = root / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        os.chmod(root, 0o700)  # a sandbox's uid nobody cannot enter source/, submission/ or results/
    status = 0
    try:
        config = json.loads((root / "source" / CONFIG).read_text(encoding="utf-8"))
        found = _notebooks(root / "submission")
        if len(found) == 1:
            results = _grade(config, found[0])
        else:
            names = ", ".join(_printable(p.relative_to(root / "submission")) for p in found[:10])
            results = _zero(f"Not graded: expected exactly one notebook (.ipynb) for {config['assignment']}, "
                            f"found {len(found)}{': ' + names if names else ''}. Submit one notebook.")
    except Exception:
        traceback.print_exc()
        results, status = _zero("Not graded: the autograder failed (your instructor sees the error)."), 1
    (results_dir / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=True), encoding="utf-8")
    print(f"score {results['score']:.4f}; wrote {results_dir / 'results.json'}")
    return status


def check(source: Path) -> int:
    """setup.sh's last step: the config in the bundle `source` reads, the assignment loads, and which isolation
    this image gives."""
    from exercises import assignments, sandbox

    config = json.loads((source / CONFIG).read_text(encoding="utf-8"))
    assignment = assignments.load(config["assignment"])
    isolation = sandbox.detect()
    print(f"{assignment.name}: {len(assignment.questions)} questions; {isolation.description}")
    if isolation.kind == "limits" and not config.get("allow_limits_only"):
        print("this bundle refuses to grade under limits only (rebuild with --allow-limits-only to accept it)")
    return 0


if __name__ == "__main__":
    ROOT = Path(os.environ.get("AUTOGRADER_ROOT", "/autograder"))
    sys.exit(check(REPO_ROOT) if sys.argv[1:] == ["--check"] else run(ROOT))
