"""Exercises: the release strips solutions, the grader scores solutions full and released notebooks 0, the
in-notebook check explains failures, and the cheating/breakage corpus scores as it must.

The corpus and the released notebooks are written into temporary folders: pytest's notebook collection (nbval)
never sees them.
"""

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch

from exercises import assignments, feedback, grade, release
from exercises.questions import QUESTIONS

REPO = Path(__file__).resolve().parent.parent
corpus_spec = importlib.util.spec_from_file_location("grading_corpus", REPO / "tests/grading_corpus/corpus.py")
corpus = sys.modules["grading_corpus"] = importlib.util.module_from_spec(corpus_spec)
corpus_spec.loader.exec_module(corpus)


def _summary(out: Path) -> dict[str, dict]:
    with open(out / "summary.csv") as f:
        return {row["student"]: row for row in csv.DictReader(f)}


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


def test_leak_scan_finds_a_surviving_solution_line(released, tmp_path):
    source = assignments.load("01_attention").path
    secret = sorted(release.solution_lines(source))[0]
    notebook = nbformat.read(released / "01_attention.ipynb", as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(f"# kept by mistake\n{secret}"))
    nbformat.write(notebook, tmp_path / "01_attention.ipynb")
    import zipfile
    with zipfile.ZipFile(tmp_path / "bundle.zip", "w") as z:
        z.writestr("inner/solution.py", secret)
    problems = release.find_leaks(tmp_path, [source])
    assert any(p.startswith("01_attention.ipynb: solution text") for p in problems)
    assert any(p.startswith("bundle.zip:inner/solution.py: solution text") for p in problems)


def test_solutions_score_full_and_released_notebooks_zero(released, tmp_path):
    for name in assignments.names():
        subs = tmp_path / name / "submissions"
        subs.mkdir(parents=True)
        (subs / "solution.ipynb").write_bytes(assignments.load(name).path.read_bytes())
        (subs / "student.ipynb").write_bytes((released / f"{name}.ipynb").read_bytes())
        reports = {r.student: r for r in grade.grade(name, subs, tmp_path / name / "out", seed=11, jobs=2,
                                                     progress=False)}
        assert reports["solution"].score == pytest.approx(reports["solution"].max_score), \
            [t for t in reports["solution"].tests if t.score < t.max_score]
        assert reports["student"].score == 0, name
        assert "NotImplementedError" in reports["student"].tests[0].output
        assert not reports["solution"].tampering and not reports["student"].tampering
        results = json.loads((tmp_path / name / "out/solution/results.json").read_text())
        assert sum(t["score"] for t in results["tests"]) == pytest.approx(reports["solution"].max_score)
        assert {t["visibility"] for t in results["tests"]} == {"visible", "hidden"}


def test_hidden_cases_depend_on_the_seed_and_differ_from_the_visible_ones():
    def fingerprint(cases):  # shapes and sums of every tensor argument, per case
        return [tuple((tuple(a.shape), round(float(a.sum()), 4)) for a in args if isinstance(a, torch.Tensor))
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


def _leftover_processes(marker: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker in open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace"):
                found.append(pid)
        except OSError:
            pass
    return found


def test_cheat_corpus_scores_as_it_must(tmp_path):
    subs, out = tmp_path / "submissions", tmp_path / "out"
    subs.mkdir()
    corpus.write(subs, out)
    honest_bytes = (subs / "honest.ipynb").read_bytes()
    limits = grade.Limits(cell_timeout=5.0, call_timeout_scale=0.3, memory_mb=3072)
    grade.grade("01_attention", subs, out, seed=5, jobs=2, limits=limits, progress=False)
    rows = _summary(out)
    assert sorted(rows) == sorted(c.id for c in corpus.CASES)  # every input file has a row
    for case in corpus.CASES:
        row = rows[case.id]
        score, flag = float(row["score"]), row["flagged"]
        if case.score is None:
            assert 6.0 <= score < corpus.FULL, (case.student, row)
        else:
            assert score == pytest.approx(case.score), (case.student, row)
        assert bool(flag) == case.flagged, (case.student, row)
        assert case.reason in row["reason"] + flag, (case.student, row)
        results = json.loads((out / case.id / "results.json").read_text())
        assert sum(t["score"] for t in results["tests"]) == pytest.approx(score)
    assert (subs / "honest.ipynb").read_bytes() == honest_bytes
    assert not _leftover_processes("echo tampered")
    assert "tampered" not in (REPO / "exercises/questions.py").read_text()


def test_without_namespaces_limits_still_hold(tmp_path, monkeypatch):
    monkeypatch.setattr(grade, "_isolation", lambda: (None, "isolation: none (test)"))
    subs = tmp_path / "submissions"
    subs.mkdir()
    corpus.write(subs, tmp_path / "out")
    keep = {"honest.ipynb", "loop_top_level.ipynb", "memory_bomb_in_answer.ipynb"}
    for path in subs.iterdir():
        if path.name not in keep:
            path.unlink()
    limits = grade.Limits(cell_timeout=5.0, call_timeout_scale=0.3)
    grade.grade("01_attention", subs, tmp_path / "out", seed=5, jobs=2, limits=limits, progress=False)
    rows = _summary(tmp_path / "out")
    expected = {c.student: c.score for c in corpus.CASES if f"{c.student}.ipynb" in keep}
    assert {s: float(r["score"]) for s, r in rows.items()} == pytest.approx(expected)
    assert "isolation: none (test)" in json.loads((tmp_path / "out/honest/results.json").read_text())["output"]


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


def test_kernel_exercises_need_a_triton_kernel(tmp_path):
    softmax_by_torch = "import torch\n\ndef softmax_rows(x):\n    return torch.softmax(x, dim=-1)\n"
    softmax_by_exp = ("import torch\n\ndef softmax_rows(x):\n    e = (x - x.max(-1, keepdim=True).values).exp()\n"
                      "    return e / e.sum(-1, keepdim=True)\n")
    with pytest.raises(AssertionError, match="launched no Triton kernel"):
        namespace = {}
        exec(softmax_by_exp, namespace)
        feedback.check("softmax_rows", namespace["softmax_rows"])
    subs = tmp_path / "submissions"
    subs.mkdir()
    for name, source in (("by_torch", softmax_by_torch), ("by_exp", softmax_by_exp)):
        nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)]), subs / f"{name}.ipynb")
    reports = {r.student: r for r in grade.grade("06_kernels", subs, tmp_path / "out", seed=3, jobs=2,
                                                 progress=False)}
    for student, reason in (("by_torch", "calls torch.softmax"), ("by_exp", "launched no Triton kernel")):
        softmax = [t for t in reports[student].tests if t.name.startswith("softmax_rows")]
        assert all(t.score == 0 and reason in t.output for t in softmax), (student, softmax)
        assert reports[student].score == 0


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
    assert "All test cases passed" in checks[1], checks[1]


def test_kernel_exercise_inputs_go_to_the_kernels_device(monkeypatch):
    """On a GPU a compiled kernel refuses CPU tensors: the check hands a Triton exercise its inputs on the
    device `kernel_device()` names ("meta" stands in for "cuda" here), and the other exercises CPU tensors."""
    monkeypatch.setattr(feedback, "kernel_device", lambda: "meta")
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
