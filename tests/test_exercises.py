"""Exercises: the release strips solutions, the grader scores solutions full and released notebooks 0, the
in-notebook check explains failures, and the cheating/breakage corpus scores as it must.

The corpus and the released notebooks are written into temporary folders: pytest's notebook collection (nbval)
never sees them.
"""

import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat
import pytest
import torch

from exercises import assignments, feedback, grade, release
from exercises.questions import QUESTIONS

from _apt import apt_install, unavailable  # tests/_apt.py

REPO = Path(__file__).resolve().parent.parent
corpus_spec = importlib.util.spec_from_file_location("grading_corpus", REPO / "tests/grading_corpus/corpus.py")
corpus = sys.modules["grading_corpus"] = importlib.util.module_from_spec(corpus_spec)
corpus_spec.loader.exec_module(corpus)


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("release")
    release.release(None, out)
    return out


def test_release_strips_solutions_tests_and_outputs(released):
    names = assignments.names()
    assert sorted(p.stem for p in released.glob("*.ipynb")) == names
    for name in names:
        notebook = nbformat.read(released / f"{name}.ipynb", as_version=4)
        code = [c.source for c in notebook.cells if c.cell_type == "code"]
        questions = [q.name for q, _ in assignments.load(name).questions]
        assert code[0].startswith("# Initialize Otter"), name
        assert [f'grader.check("{q}")' for q in questions] == [c for c in code if c.startswith("grader.check")]
        assert sum("raise NotImplementedError" in c for c in code) == len(questions), name
        assert not any(c.outputs for c in notebook.cells if c.cell_type == "code")
        assert not any(c.cell_type == "raw" for c in notebook.cells), name  # otter's markers are gone
    assert release.find_leaks(released, [assignments.load(n).path for n in names]) == []


def test_release_refuses_an_unknown_name_in_one_line(tmp_path, capsys):
    from exercises.__main__ import main
    with pytest.raises(SystemExit):
        main(["release", "99_unknown", "--out", str(tmp_path)])
    assert "NAME: expected names from ['01_attention'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_leak_scan_finds_a_surviving_solution_line(released, tmp_path):
    source = assignments.load("01_attention").path
    secret = sorted(release.solution_lines(source))[0]
    notebook = nbformat.read(released / "01_attention.ipynb", as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(f"# kept by mistake\n{secret}\nanswer = 42  # SOLUTION"))
    nbformat.write(notebook, tmp_path / "01_attention.ipynb")
    import zipfile
    with zipfile.ZipFile(tmp_path / "bundle.zip", "w") as z:
        z.writestr("inner/solution.py", secret)
    problems = release.find_leaks(tmp_path, [source])
    assert any(p.startswith("01_attention.ipynb: solution text") for p in problems)
    assert any(p.startswith("bundle.zip:inner/solution.py: solution text") for p in problems)
    assert "01_attention.ipynb: marker '# SOLUTION'" in problems  # otter's single-line form, outside a question


@pytest.mark.parametrize("leak", ["answer = 41 + 1  # SOLUTION",  # otter's single-line form, outside a question
                                  "# BEGIN SOLUTION\nanswer = 41 + 1\n# END SOLUTION"])  # a misplaced block
def test_release_fails_closed(tmp_path, monkeypatch, leak):
    source = nbformat.read(assignments.load("02_rope").path, as_version=4)
    source.cells.insert(2, nbformat.v4.new_code_cell(leak))
    (tmp_path / "src").mkdir()
    nbformat.write(source, tmp_path / "src/02_rope.ipynb")
    monkeypatch.setattr(assignments, "SOURCE_DIR", tmp_path / "src")
    with pytest.raises(release.ReleaseError, match="answer = 41 \\+ 1|SOLUTION"):
        release.release(["02_rope"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_solutions_score_full_and_released_notebooks_zero(released, tmp_path):
    for name in assignments.names():
        subs = tmp_path / name / "submissions"
        subs.mkdir(parents=True)
        (subs / "solution.ipynb").write_bytes(assignments.load(name).path.read_bytes())
        (subs / "student.ipynb").write_bytes((released / f"{name}.ipynb").read_bytes())
        reports = {r.student: r for r in grade.grade(name, subs, tmp_path / name / "out", seed=11, jobs=2,
                                                     progress=False)}
        assert reports["solution"].score == pytest.approx(reports["solution"].max_score), \
            (name, [(t.name, t.output) for t in reports["solution"].tests if t.units < t.max_units])
        assert reports["student"].score == 0, name
        stub = "no top-level `@triton.jit def" if name == "06_kernels" else "NotImplementedError"  # no kernel yet
        assert stub in reports["student"].tests[0].output, reports["student"].tests[0].output
        results = json.loads((tmp_path / name / "out/students/solution/results.json").read_text())
        assert sum(t["score"] for t in results["tests"]) == pytest.approx(reports["solution"].max_score)
        assert {t["visibility"] for t in results["tests"]} == {"visible", "hidden"}


def test_hidden_cases_depend_on_the_seed_and_differ_from_the_visible_ones():
    def fingerprint(cases):  # shapes and sums of every tensor argument, plain data as written, per case
        return [tuple((tuple(a.shape), round(float(a.double().sum()), 4)) if isinstance(a, torch.Tensor) else repr(a)
                      for a in args if isinstance(a, (torch.Tensor, list, dict, int, float)))
                for _, args in cases]

    for q in QUESTIONS.values():
        if q.name in ("activated_params", "kv_bytes_per_token"):  # configs, not tensors
            continue
        visible, hidden = fingerprint(q.cases(None)), fingerprint(q.cases(1))
        assert visible == fingerprint(q.cases(None)), q.name
        assert hidden != fingerprint(q.cases(2)), q.name
        assert not set(visible) & set(hidden), q.name


def test_check_says_what_is_wrong_in_plain_words():
    def no_mask(q, k, v):
        return (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1) @ v

    with pytest.raises(AssertionError, match=r"causal_sdpa\(q=float32 tensor of shape \(2, 2, 4, 8\).*"
                                             r"the result is wrong at index"):
        feedback.check("causal_sdpa", no_mask)
    with pytest.raises(AssertionError, match=r"the result has shape \(2, 2, 4, 7\), expected \(2, 2, 4, 8\)"):
        feedback.check("causal_sdpa", lambda q, k, v: q @ k.transpose(-2, -1))
    with pytest.raises(AssertionError, match="not written yet"):
        feedback.check("causal_sdpa", lambda q, k, v: (_ for _ in ()).throw(NotImplementedError()))
    from refimpl.attention import scaled_dot_product_attention
    with pytest.raises(AssertionError, match="calls refimpl.attention.scaled_dot_product_attention"):
        feedback.check("causal_sdpa", lambda q, k, v: scaled_dot_product_attention(q, k, v, is_causal=True))
    with pytest.raises(AssertionError, match="cache_k after the call"):
        feedback.check("kv_cache_update", lambda ck, cv, k, v, s: (torch.cat((ck[:, :, :s], k), dim=2),
                                                                    torch.cat((cv[:, :, :s], v), dim=2)))
    assert scaled_dot_product_attention(*[torch.ones(1, 1, 2, 2)] * 3).shape == (1, 1, 2, 2)  # unguarded after


def test_check_names_the_kernel_contract():
    """The learner's check says at once when the kernel is not the one grading launches."""
    namespace: dict = {}
    source = corpus.SOFTMAX_KERNEL.format(body=corpus.HONEST_SOFTMAX_BODY).replace("softmax_kernel", "my_kernel")
    exec(compile(source, "<cell>", "exec"), namespace)
    with pytest.raises(AssertionError, match=r"as `softmax_kernel\(x_ptr, out_ptr, n_cols, BLOCK\)`"):
        feedback.check("softmax_rows", namespace["softmax_rows"])


def _rows(out: Path) -> dict[str, dict]:
    with open(out / "summary.csv", encoding="utf-8") as f:
        return {row["file"]: row for row in csv.DictReader(f)}


SANDBOX_TEST = "the grader's bubblewrap sandbox test"


def test_bubblewrap_is_installed_and_used():
    """Runs before the corpus, so that the corpus is graded in bubblewrap where it can be installed."""
    apt_install("bubblewrap", "bwrap", SANDBOX_TEST)
    isolation = grade.sandbox.detect()
    if isolation.kind != "bubblewrap":
        unavailable(SANDBOX_TEST, isolation.description)


def test_cheat_corpus_scores_as_it_must(tmp_path):
    hidden_files = grade.sandbox.detect().kind in ("bubblewrap", "namespaces")  # else readable (README)
    subs, out = tmp_path / "submissions", tmp_path / "out"
    subs.mkdir()
    corpus.write(subs, REPO)
    honest_bytes = (subs / "honest.ipynb").read_bytes()
    limits = grade.Limits(cell_timeout=5.0, call_timeout_scale=0.3)
    grade.grade("01_attention", subs, out, seed=5, jobs=2, limits=limits, progress=False)
    rows = _rows(out)
    assert len(rows) == len(corpus.CASES) == len(list(subs.iterdir()))  # every input file has a row
    ids = {row["student"] for row in rows.values()}
    assert len(ids) == len(rows) and "a_b" in ids and any(i.startswith("a_b-") for i in ids)
    for case in corpus.CASES:
        name = case.file if isinstance(case.file, str) else \
            case.file.decode("utf-8", "surrogateescape").encode("utf-8", "backslashreplace").decode()
        row = rows["'" + name if name.startswith("=") else name]
        score = float(row["score"])
        assert row["score"] == f"{score:.4f}" and row["max_score"] == "10.0000"
        if case.score is None:
            assert 6.0 <= score < corpus.FULL, (case.file, row)
        elif case.klass == "5" and not hidden_files:
            assert score == corpus.FULL, (case.file, row)
        else:
            assert score == pytest.approx(case.score), (case.file, row)
        assert case.reason in row["reason"], (case.file, row)
        student = row["student"].lstrip("'")
        results = json.loads((out / "students" / student / "results.json").read_text())
        assert sum(t["score"] for t in results["tests"]) == pytest.approx(score)
        for t in results["tests"]:  # hidden cases: no input, no value, no message of the submission's
            if t["visibility"] == "hidden":
                assert "tensor" not in t["output"] and "my inputs" not in t["output"] and "caf" not in t["output"]
    assert (subs / "honest.ipynb").read_bytes() == honest_bytes
    assert all(len(line) < 20_000 for line in (out / "scores.csv").read_text().splitlines())
    assert not any(line.split(",")[0].startswith(("=", "+", "@")) for line in
                   (out / "summary.csv").read_text().splitlines())
    assert "caf\\udce9" in (out / "scores.csv").read_text()  # the lone surrogate, escaped
    with open(out / "ids.csv", encoding="utf-8") as f:
        assert len(list(csv.DictReader(f))) == len(corpus.CASES)


def test_kernel_exercise_is_graded_on_the_kernel_alone(tmp_path):
    """Class 3: torch plus an empty kernel, tl.softmax, a Python call in the kernel: 0; an honest kernel: 4."""
    subs = tmp_path / "submissions"
    subs.mkdir()
    corpus.write_kernels(subs)
    reports = {r.file: r for r in grade.grade("06_kernels", subs, tmp_path / "out", seed=3, jobs=2,
                                              progress=False)}
    for name, (_, points) in corpus.KERNEL_CASES.items():
        softmax = [t for t in reports[name].tests if t.name.startswith("softmax_rows")]
        assert sum(t.units for t in softmax) / 10_000 == points, (name, [t.output for t in softmax])


NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"]


def _python_for_nobody(folder: Path) -> str:
    """This interpreter if uid nobody can run it; else a venv of Debian's /usr/bin/python3 (same version) that
    sees this environment's packages (a pyenv Python under /root is closed to nobody); skip (fail where CI=true)
    when neither works."""
    candidates = [sys.executable]
    system = Path("/usr/bin/python3")
    if system.exists():
        venv = folder / "venv"
        subprocess.run([str(system), "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
        site = next(venv.glob("lib/python3*/site-packages"))
        (site / "parent.pth").write_text("\n".join(p for p in sys.path if p.endswith("site-packages")) + "\n")
        subprocess.run(["chmod", "-R", "a+rX", str(venv)], check=True)
        candidates.append(str(venv / "bin/python"))
    problems = []
    for python in candidates:
        again = "import subprocess, sys; sys.exit(subprocess.run([sys.executable, '-c', 'import torch']).returncode)"
        probe = subprocess.run(NOBODY + [python, "-c", again], capture_output=True, text=True, timeout=300)
        if probe.returncode == 0:
            return python
        problems.append(f"{python}: {probe.stderr.strip()[-150:]}")
    why = "uid nobody cannot run a Python with torch: " + "; ".join(problems)
    if os.environ.get("CI") == "true":
        pytest.fail(why)
    pytest.skip(why)


def test_grading_as_an_unprivileged_user():
    """CI runs as root: grade through `setpriv` as uid nobody too (no namespaces of its own: an unprivileged
    bubblewrap, or limits only)."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to switch to uid nobody")
    folder = Path(tempfile.mkdtemp(prefix="grade-nobody-"))  # pytest's own folder is closed to nobody
    folder.chmod(0o777)
    python = _python_for_nobody(folder)
    subs, out = folder / "submissions", folder / "out"
    subs.mkdir()
    for case in corpus.CASES:
        if case.file in ("honest.ipynb", "torch_c_nn_sdpa.ipynb"):
            (subs / case.file).write_text(corpus._notebook(case.cells))
    subprocess.run(["chmod", "-R", "a+rX", str(subs)], check=True)
    done = subprocess.run(NOBODY + [python, "-m", "exercises", "grade", "01_attention", str(subs), str(out),
                                    "--seed", "4", "--jobs", "2"], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "HOME": str(folder), "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    rows = _rows(out)
    assert {name: float(row["score"]) for name, row in rows.items()} == \
        {"honest.ipynb": 10.0, "torch_c_nn_sdpa.ipynb": 3.0}, rows
    print((out / "isolation.txt").read_text().strip())
    shutil.rmtree(folder)


def test_limits_alone_still_hold(tmp_path, monkeypatch):
    """Without bubblewrap and namespaces: time and memory limits still end a hanging cell and a memory bomb."""
    monkeypatch.setattr(grade.sandbox, "detect", lambda: grade.sandbox.Isolation("limits", "isolation: limits (test)"))
    subs = tmp_path / "submissions"
    subs.mkdir()
    bomb = [corpus._sdpa_by("    hog = torch.ones(1 << 34)\n    return hog")] + corpus.REST
    for name, cells in (("honest", corpus.HONEST + ["while True:\n    pass"]), ("bomb", bomb)):
        (subs / f"{name}.ipynb").write_text(corpus._notebook(cells))
    limits = grade.Limits(cell_timeout=5.0, call_timeout_scale=0.3)
    reports = {r.student: r for r in grade.grade("01_attention", subs, tmp_path / "out", seed=5, jobs=2,
                                                 limits=limits, progress=False)}
    assert {s: r.score for s, r in reports.items()} == {"honest": 10.0, "bomb": 6.0}
    assert "isolation: limits (test)" in (tmp_path / "out/isolation.txt").read_text()
    assert "isolation" not in (tmp_path / "out/students/honest/results.json").read_text()  # the instructor's


def test_namespaces_without_bubblewrap_hide_the_files(tmp_path, monkeypatch):
    """As root without bubblewrap: the checkout and the other submissions are not visible (class 5)."""
    if os.geteuid() != 0:
        pytest.skip("namespaces need root")
    monkeypatch.setattr(grade.sandbox, "detect", lambda: grade.sandbox.Isolation("namespaces", "namespaces (test)"))
    subs = tmp_path / "submissions"
    subs.mkdir()
    for case in corpus.CASES:
        if case.file in ("honest.ipynb", "peeks_at_files.ipynb"):
            cells = [c.replace("{subs}", str(subs)).replace("{repo}", str(REPO)) for c in case.cells]
            (subs / case.file).write_text(corpus._notebook(cells))
    reports = {r.student: r.score for r in grade.grade("01_attention", subs, tmp_path / "out", seed=5, jobs=2,
                                                      progress=False)}
    assert reports == {"honest": 10.0, "peeks_at_files": 6.0}


def test_scaffold_lacks_what_the_questions_ask_for(tmp_path):
    """The sandbox's refimpl for 04_moe's routing questions: no update_bias, a Router.forward that says why it is
    missing, the rest importable."""
    from exercises import sandbox
    runtime = sandbox.build_runtime(tmp_path / "rt", ("refimpl.moe",), {"refimpl.moe.Router.forward",
                                                                       "refimpl.moe.update_bias"})
    assert sorted(p.name for p in (runtime / "refimpl").iterdir()) == ["__init__.py", "checks.py", "config.py",
                                                                        "known_configs", "moe.py"]
    probe = ("import torch, refimpl.moe as m\nassert not hasattr(m, 'update_bias') and hasattr(m, 'dispatch')\n"
             "try:\n    m.Router.forward(None, torch.zeros(1))\nexcept NotImplementedError as e:\n"
             "    assert str(e).startswith('refimpl.moe.Router.forward is not available when grading'), e\n"
             "else:\n    raise AssertionError('Router.forward ran')\n"
             "assert m.DeepSeekMoE.forward.__code__.co_argcount == 2")
    done = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "PYTHONPATH": str(runtime)}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-1000:]


def test_points_split_exactly():
    from exercises.scoring import split_points
    assert split_points(1, 3) == [3333, 3333, 3334] and sum(split_points(0.7, 6)) == 7000


def test_pytest_collects_only_the_source_notebooks(tmp_path):
    probe = REPO / "exercises/_release/_collection_probe.ipynb"
    probe.parent.mkdir(exist_ok=True)
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("while True: pass")]), probe)
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                               "exercises", "tests/grading_corpus"], cwd=REPO, capture_output=True, text=True,
                              timeout=300)
    finally:
        probe.unlink()
    notebooks = {line.split("::")[0] for line in done.stdout.splitlines() if ".ipynb" in line}
    assert notebooks == {f"exercises/src/{n}.ipynb" for n in assignments.names()}, done.stdout[-2000:]


def test_released_notebook_check_cell_explains_then_passes(released, tmp_path):
    """The learner's path: otter's grader.check in a real kernel, on the released notebook."""
    import nbclient
    notebook = nbformat.read(released / "02_rope.ipynb", as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code" and "def rope_interleaved" in cell.source:
            cell.source = cell.source.replace('raise NotImplementedError("rope_interleaved: write the body")',
                                              "return x  # forgot to rotate")
    fixed = ("def rope_interleaved(x, cos, sin):\n    x_even, x_odd = x[..., 0::2], x[..., 1::2]\n"
             "    pairs = (x_even * cos - x_odd * sin, x_even * sin + x_odd * cos)\n"
             "    return torch.stack(pairs, dim=-1).flatten(-2)")
    notebook.cells += [nbformat.v4.new_code_cell(fixed),
                       nbformat.v4.new_code_cell('grader.check("rope_interleaved")')]
    nbformat.write(notebook, tmp_path / "02_rope.ipynb")
    nbclient.NotebookClient(notebook, timeout=300, allow_errors=True,
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    checks = ["".join(o.get("data", {}).get("text/plain", "") + o.get("text", "") for o in c.outputs)
              for c in notebook.cells if c.cell_type == "code" and "grader.check" in c.source]
    assert "the result is wrong at index" in checks[0] and "visible 1 case" in checks[0], checks[0]
    assert "visible cases ran here, and they passed" in checks[1] and "hidden cases" in checks[1], checks[1]


def test_kernel_exercise_inputs_go_to_the_kernels_device(monkeypatch):
    """On a GPU a compiled kernel refuses CPU tensors: the check hands a Triton exercise its inputs on the
    device `kernel_device()` names ("meta" stands in for "cuda" here), and the other exercises CPU tensors."""
    monkeypatch.setattr(feedback, "kernel_device", lambda: "meta")
    monkeypatch.setattr(feedback, "_check_contract", lambda name, fn: None)  # no kernel in these stand-ins
    seen = {}

    def record(name):
        def fn(*args):
            seen[name] = {a.device.type for a in args if isinstance(a, torch.Tensor)}
            raise RuntimeError("recorded")
        return fn

    for name in ("softmax_rows", "mla_decode_block", "causal_sdpa"):
        with pytest.raises(AssertionError, match="raised RuntimeError: recorded"):
            feedback.check(name, record(name))
    assert seen == {"softmax_rows": {"meta"}, "mla_decode_block": {"meta"}, "causal_sdpa": {"cpu"}}
