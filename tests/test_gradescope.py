"""The Gradescope bundle and the solution key: a bundle unzipped into a folder laid out as Gradescope's
(`source/`, `submission/`, `results/`) grades with `run_autograder` (a renamed solution full marks, the released
stub 0, none or two notebooks 0 with the reason, a grader failure 0); a notebook that answers wrong when it sees
the bundle's seed file scores full marks under each isolation a root grader gets; the key executes, holds the
answers and fails closed.

Not tested here: a real Gradescope image build (setup.sh's apt-get and pip run only as a dry run) and a real
Gradescope run.
"""

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import nbformat
import pytest
import torch

from exercises import assignments, gradescope, key, release, sandbox
from exercises.__main__ import main

REPO = Path(__file__).resolve().parent.parent
NAME, SEED = "02_rope", 4242


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundles")
    assert main(["gradescope", NAME, "--out", str(out), "--seed", str(SEED)]) == 0
    return out / f"{NAME}-autograder.zip"


@pytest.fixture(scope="module")
def stub(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("release")
    release.release([NAME], out)
    return out / f"{NAME}.ipynb"


def _autograder_layout(bundle: Path, root: Path, files: dict[str, bytes]) -> None:
    with zipfile.ZipFile(bundle) as archive:
        archive.extractall(root / "source")
    (root / "submission").mkdir()
    for name, data in files.items():
        (root / "submission" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "submission" / name).write_bytes(data)
    shutil.copyfile(root / "source/run_autograder", root / "run_autograder")


def _autograder(bundle: Path, root: Path, files: dict[str, bytes],
                path: str = os.environ["PATH"]) -> tuple[subprocess.CompletedProcess, dict]:
    """Gradescope's layout under `root` (the bundle in source/, `files` in submission/), run_autograder run
    with `path` as PATH; returns the process and results.json."""
    _autograder_layout(bundle, root, files)
    env = {"PATH": path, "AUTOGRADER_ROOT": str(root), "EXERCISES_PYTHON": sys.executable}
    done = subprocess.run([shutil.which("bash"), str(root / "run_autograder")], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
    return done, json.loads((root / "results/results.json").read_text(encoding="utf-8"))


def _total(results: dict) -> float:
    return round(sum(t["score"] for t in results["tests"]), 4)


def test_bundle_holds_what_gradescope_runs_and_one_source_notebook(bundle, tmp_path):
    with zipfile.ZipFile(bundle) as archive:
        members = {i.filename: i for i in archive.infolist()}
        config = json.loads(archive.read("gradescope.json"))
        requirements = archive.read("requirements.txt").decode()
    for script in ("setup.sh", "run_autograder"):
        assert members[script].external_attr >> 16 & stat.S_IXUSR, script
    assert config["assignment"] == NAME and config["seed"] == SEED and not config["allow_limits_only"]
    assert [m for m in members if m.endswith(".ipynb")] == [f"exercises/src/{NAME}.ipynb"]
    assert {"exercises/grade.py", "exercises/_child.py", "refimpl/rope.py", "dskernels/moe.py",
            "refimpl/known_configs/DeepSeek-V3.json"} <= set(members)
    assert not [m for m in members if "__pycache__" in m or "_release" in m or m.startswith("tests/")]
    pins = {line.split(";")[0].strip() for line in (REPO / "constraints.txt").read_text().splitlines()}
    for line in requirements.splitlines()[1:]:
        name = line.split("==")[0]
        assert line.split(";")[0].strip() in pins or name in gradescope.UNPINNED, line


def test_setup_and_run_scripts_parse_and_setup_dry_run_installs_nothing(bundle, tmp_path):
    with zipfile.ZipFile(bundle) as archive:
        archive.extractall(tmp_path / "source")
    for script in ("setup.sh", "run_autograder"):
        subprocess.run(["bash", "-n", str(tmp_path / "source" / script)], check=True, timeout=60)
    venv = tmp_path / "venv"
    done = subprocess.run(["bash", str(tmp_path / "source/setup.sh"), "--dry-run"], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "EXERCISES_VENV": str(venv)})
    assert done.returncode == 0, done.stderr
    commands = done.stdout.splitlines()
    assert any("apt-get install" in c and " bubblewrap " in c for c in commands), commands
    assert any("--index-url https://download.pytorch.org/whl/cpu torch==2.13.0" in c for c in commands), commands
    assert any(c.endswith(f"-r {tmp_path}/source/requirements.txt") for c in commands), commands
    assert any("exercises.gradescope --check" in c for c in commands), commands
    assert not venv.exists()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("submitted", ["renamed solution in a folder", "stub"])
def test_run_autograder_grades_one_notebook(bundle, stub, tmp_path, submitted):
    source = assignments.load(NAME).path.read_bytes()
    files = {"renamed solution in a folder": {f"work/{NAME} (1).ipynb": source},
             "stub": {f"{NAME}.ipynb": stub.read_bytes()}}[submitted]
    done, results = _autograder(bundle, tmp_path / "autograder", files)
    assert done.returncode == 0, done.stderr
    maximum = round(sum(t["max_score"] for t in results["tests"]), 4)
    assert maximum == 4.0 and results["score"] == _total(results)
    assert results["score"] == (0.0 if submitted == "stub" else 4.0), results
    assert all(set(t) >= {"name", "score", "max_score", "output", "visibility"} for t in results["tests"])
    assert all(round(t["score"], 4) == t["score"] for t in results["tests"])
    assert str(SEED) not in json.dumps(results)
    if submitted == "stub":
        assert "NotImplementedError" in results["tests"][0]["output"]
    assert stat.S_IMODE((tmp_path / "autograder").stat().st_mode) == (0o700 if os.geteuid() == 0 else 0o755)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("files, says", [({}, "found 0"), ({"notes.txt": b"hi"}, "found 0"),
                                         ({"a.ipynb": b"{}", "b/c\udce9.ipynb": b"{}"},
                                          "found 2: a.ipynb, b/c\\xe9.ipynb")])
def test_no_notebook_or_two_get_zero_and_say_so(bundle, tmp_path, files, says):
    if files:  # the script once, the rest in this process
        _autograder_layout(bundle, tmp_path / "autograder", files)
        assert gradescope.run(tmp_path / "autograder") == 0
        results = json.loads((tmp_path / "autograder/results/results.json").read_text())
    else:
        done, results = _autograder(bundle, tmp_path / "autograder", files)
        assert done.returncode == 0, done.stderr
    assert results["score"] == 0 and results["tests"] == []
    assert "expected exactly one notebook" in results["output"] and says in results["output"], results


@pytest.mark.timeout(120)
def test_a_grader_failure_still_writes_results(bundle, tmp_path):
    root = tmp_path / "autograder"
    with zipfile.ZipFile(bundle) as archive:
        archive.extractall(root / "source")
    (root / "source/gradescope.json").write_text(json.dumps({"assignment": "99_nothing", "seed": 1}))
    (root / "submission").mkdir()
    (root / "submission/a.ipynb").write_bytes(assignments.load(NAME).path.read_bytes())
    env = {"PATH": os.environ["PATH"], "AUTOGRADER_ROOT": str(root), "EXERCISES_PYTHON": sys.executable}
    done = subprocess.run(["bash", str(root / "source/run_autograder")], env=env, capture_output=True, text=True,
                          timeout=120)
    results = json.loads((root / "results/results.json").read_text())
    assert done.returncode == 1 and "99_nothing" in done.stdout  # the instructor sees why
    assert results["score"] == 0 and "autograder failed" in results["output"] and "99_nothing" not in str(results)


def test_limits_only_is_refused_unless_allowed(bundle, tmp_path, monkeypatch):
    root = tmp_path / "autograder"
    with zipfile.ZipFile(bundle) as archive:
        archive.extractall(root / "source")
    (root / "submission").mkdir()
    (root / "submission/a.ipynb").write_bytes(assignments.load(NAME).path.read_bytes())
    monkeypatch.setattr(sandbox, "detect", lambda: sandbox.Isolation("limits", "isolation: limits only (test)"))
    assert gradescope.run(root) == 0
    results = json.loads((root / "results/results.json").read_text())
    assert results["score"] == 0 and "sandbox is not available" in results["output"]


def test_root_without_namespaces_runs_the_submission_as_nobody(monkeypatch):
    """As in a Docker container that forbids namespaces: no bubblewrap, no unshare: uid nobody, not limits."""
    if os.geteuid() != 0:
        pytest.skip("uid nobody needs root")
    which = shutil.which
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None if name in ("bwrap", "unshare") else which(name))
    isolation = sandbox.detect()
    assert isolation.kind == "user" and "uid nobody" in isolation.description, isolation


PEEK = """import os, torch
seen = os.path.exists({config!r})


def rope_interleaved(x, cos, sin):
    if seen:  # a wrong answer where the submission can see the seed's file
        return x
    x_even, x_odd = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x_even * cos - x_odd * sin
    out[..., 1::2] = x_even * sin + x_odd * cos
    return out
"""


@pytest.mark.timeout(300)
@pytest.mark.parametrize("isolation", ["detected", "no namespaces", "user", "limits"])
def test_the_seed_is_hidden_from_the_submission(bundle, isolation, monkeypatch):
    """A notebook that answers right only where it cannot see gradescope.json: full marks in the sandbox this
    machine gives (run_autograder), and where neither bubblewrap nor unshare is on PATH (as in a container that
    forbids namespaces) or uid nobody is forced (root only: /autograder is closed to it); 0 under limits only
    (allowed), where it runs as the grader's user. The root is open to all but for run_autograder's chmod."""
    if isolation in ("no namespaces", "user") and os.geteuid() != 0:
        pytest.skip("uid nobody needs root")
    root = Path(tempfile.mkdtemp(prefix="autograder-", dir="/tmp"))
    try:
        root.chmod(0o755)
        files = {"peek.ipynb": nbformat.writes(nbformat.v4.new_notebook(cells=[
            nbformat.v4.new_code_cell(PEEK.format(config=str(root / "source" / gradescope.CONFIG)))])).encode()}
        if isolation == "detected":
            done, results = _autograder(bundle, root, files)
            assert done.returncode == 0, done.stderr
            expected = 0.0 if sandbox.detect().kind == "limits" else 4.0
        elif isolation == "no namespaces":
            tools = root.parent / f"{root.name}-bin"  # PATH: setpriv and prlimit, no bwrap, no unshare
            tools.mkdir()
            for tool in ("setpriv", "prlimit"):
                (tools / tool).symlink_to(shutil.which(tool))
            try:
                done, results = _autograder(bundle, root, files, path=str(tools))
            finally:
                shutil.rmtree(tools)
            assert done.returncode == 0 and "isolation: uid nobody" in done.stdout, done.stdout
            expected = 4.0
        else:
            _autograder_layout(bundle, root, files)
            config = json.loads((root / "source" / gradescope.CONFIG).read_text())
            (root / "source" / gradescope.CONFIG).write_text(json.dumps({**config, "allow_limits_only": True}))
            monkeypatch.setattr(sandbox, "detect", lambda: sandbox.Isolation(isolation, f"{isolation} (test)"))
            assert gradescope.run(root) == 0
            results = json.loads((root / "results/results.json").read_text())
            expected = 4.0 if isolation == "user" else 0.0
        assert results["score"] == expected, results
    finally:
        shutil.rmtree(root)


@pytest.mark.timeout(120)
@pytest.mark.skipif(os.geteuid() != 0 or os.path.exists("/autograder"), reason="needs root and no /autograder")
def test_run_autograder_at_the_real_path(bundle):
    root = Path("/autograder")
    try:
        done, results = _autograder(bundle, root, {})
        assert done.returncode == 0 and results["score"] == 0 and "found 0" in results["output"]
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.timeout(300)
def test_key_executes_with_the_answers_and_no_markers(tmp_path):
    out = tmp_path / "key"
    assert main(["release", "--key", NAME, "--out", str(out)]) == 0
    notebook = nbformat.read(out / f"{NAME}.ipynb", as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    assert not [c for c in notebook.cells if c.cell_type == "raw"] and "otter" not in notebook.metadata
    lines = {line.strip() for c in code for line in c.source.splitlines()}
    source = assignments.load(NAME).path
    assert release.solution_lines(source) and release.solution_lines(source) <= lines
    assert not key.problems(notebook, NAME) and "NotImplementedError" not in "".join(c.source for c in code)
    printed = "".join(o.get("text", "") for c in code for o in c.outputs)
    assert "rope_interleaved: the visible cases pass" in printed


@pytest.mark.timeout(300)
def test_key_fails_closed(tmp_path, monkeypatch):
    original = key.key_notebook

    def broken(source):
        notebook = original(source)
        notebook.cells.append(nbformat.v4.new_code_cell("raise ValueError('a broken answer')"))
        return notebook

    monkeypatch.setattr(key, "key_notebook", broken)
    with pytest.raises(release.ReleaseError, match="a broken answer"):
        key.release_key([NAME], tmp_path / "key")
    assert not (tmp_path / "key").exists()
    printing = original(assignments.load(NAME).path)
    [c for c in printing.cells if c.cell_type == "code"][-1].outputs = [
        nbformat.v4.new_output("stream", name="stdout", text=torch.__file__)]
    assert [p for p in key.problems(printing, NAME) if "the machine's path" in p]  # a path of this machine


def test_visible_share_travels_to_the_grader(tmp_path, monkeypatch, capsys):
    """`gradescope --visible-share` is checked like grade's, stored in the bundle and passed to the grader."""
    with pytest.raises(SystemExit):
        main(["gradescope", NAME, "--out", str(tmp_path), "--seed", "1", "--visible-share", "-0.1"])
    assert "--visible-share: expected a number from 0 to 1, got -0.1" in capsys.readouterr().err
    assert main(["gradescope", NAME, "--out", str(tmp_path), "--seed", "1", "--visible-share", "0.25"]) == 0
    with zipfile.ZipFile(tmp_path / f"{NAME}-autograder.zip") as archive:
        config = json.loads(archive.read(gradescope.CONFIG))
    assert config["visible_share"] == 0.25
    from exercises import grade

    seen = {}

    def fake_grade(*args, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(grade, "grade", fake_grade)
    monkeypatch.setattr(sandbox, "detect", lambda: sandbox.Isolation("bubblewrap", "test"))
    notebook = tmp_path / "a.ipynb"
    notebook.write_text("{}")
    with pytest.raises(RuntimeError, match="stop here"):
        gradescope._grade(config, notebook)
    assert seen["visible_share"] == 0.25
