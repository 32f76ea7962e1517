"""Issue 22's grading rules, end to end through the grader (exercises.grade) and the learner's check: the memory
budget in grading, a failure of an earlier function charged once, a renamed download, the per-question columns,
the visible share and what results.json shows a student."""

import csv
import json
import sys
from pathlib import Path

import nbformat
import pytest

from exercises import assignments, grade
from exercises.questions import QUESTIONS

sys.path.insert(0, str(Path(__file__).parent))
from exercise_mutants import answers  # noqa: E402


def _submission(name: str, replace: dict[str, str], folder: Path, file: str) -> Path:
    """The solved source notebook `name` with the cells defining the functions in `replace` replaced by their
    code (the other cells, otter's markers included, as they are)."""
    notebook = nbformat.read(assignments.load(name).path, as_version=4)
    for cell in notebook.cells:
        for function, code in replace.items():
            if cell.cell_type == "code" and f"def {function}(" in cell.source and "BEGIN SOLUTION" in cell.source:
                cell.source = code
    folder.mkdir(parents=True, exist_ok=True)
    nbformat.write(notebook, folder / file)
    return folder / file


def _scores(report) -> dict[str, list[tuple[str, int, str]]]:
    """question -> [(label, units, output)] of one report."""
    out: dict[str, list] = {}
    for test in report.tests:
        question, label = test.name.split(" (", 1)
        out.setdefault(question, []).append((label.rstrip(")"), test.units, test.output))
    return out


def _as(fn, name: str) -> str:
    """The source of a mutant in tests/exercise_mutants/answers.py, defined under the question's name."""
    import inspect
    import textwrap

    return "import torch\n\n\n" + textwrap.dedent(inspect.getsource(fn)).replace(f"def {fn.__name__}(", f"def {name}(")


def test_grading_enforces_the_memory_budget_on_visible_and_hidden_cases(tmp_path):
    """A naive mla_absorbed (right values, decompressed cache) loses the long cases, visible included, with a
    message naming the rule; the solution keeps every point (tests/test_exercises.py)."""
    subs = tmp_path / "subs"
    _submission("03_mla", {"mla_absorbed": _as(answers.mla_absorbed_naive, "mla_absorbed")}, subs, "naive.ipynb")
    (report,) = grade.grade("03_mla", subs, tmp_path / "out", seed=0, jobs=1, progress=False)
    cases = _scores(report)["mla_absorbed"]
    long_cases = [c for c, (_, args) in zip(cases, QUESTIONS["mla_absorbed"].cases(None) +
                                            QUESTIONS["mla_absorbed"].cases(0)) if args[3].shape[1] >= 4096]
    assert {c[0].split()[0] for c in long_cases} == {"visible", "hidden"}
    for label, units, output in long_cases:
        assert units == 0 and output.startswith("ran out of memory: each call may use 512 MiB more"), (label, output)
        assert "decompressing the cache into per-head keys and values does not" in output
    assert all(units > 0 for label, units, _ in cases if (label, units, _) not in long_cases), cases


def _run(notebook, folder: Path) -> list[str]:
    """Execute the notebook in a real kernel in `folder`; the text output of each grader.check cell."""
    import nbclient

    nbclient.NotebookClient(notebook, timeout=300, allow_errors=True,
                            resources={"metadata": {"path": str(folder)}}).execute()
    return ["".join(o.get("data", {}).get("text/plain", "") + o.get("text", "") + o.get("evalue", "")
                    for o in c.outputs) for c in notebook.cells if c.cell_type == "code" and "grader.check" in c.source]


def test_a_renamed_download_still_checks(tmp_path, monkeypatch):
    """A second download is `02_rope (1).ipynb`: otter's init cell named the file, and every check then failed
    with NameError. The released init cell finds the notebook whatever its name."""
    from exercises import release

    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    (written,) = release.release(["02_rope"], tmp_path / "release")
    notebook = nbformat.read(written, as_version=4)
    solution = nbformat.read(assignments.load("02_rope").path, as_version=4)
    answer = next(c.source for c in solution.cells if c.cell_type == "code" and "def rope_interleaved" in c.source)
    for cell in notebook.cells:
        if cell.cell_type == "code" and "def rope_interleaved" in cell.source:
            cell.source = answer
    folder = tmp_path / "downloads"
    folder.mkdir()
    nbformat.write(notebook, folder / "02_rope (1).ipynb")
    (folder / "03_mla.ipynb").write_text("{}")  # another notebook in the folder is not taken for it
    (check,) = _run(notebook, folder)
    assert "visible cases ran here, and they passed" in check, check


def test_notebook_file_prefers_the_session_then_the_name(tmp_path, monkeypatch):
    from exercises.feedback import notebook_file

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    with pytest.raises(FileNotFoundError, match="no notebook of 02_rope in"):
        notebook_file("02_rope")
    rope = {"metadata": {"otter": {"tests": {"rope_interleaved": "..."}}}}
    for name in ("02_rope (2).ipynb", "02_rope (1).ipynb", "copy.ipynb"):
        (tmp_path / name).write_text(json.dumps(rope))
    (tmp_path / "01_attention.ipynb").write_text(json.dumps({"metadata": {"otter": {"tests": {"causal_sdpa": ""}}}}))
    assert notebook_file("02_rope") == str(tmp_path / "02_rope (1).ipynb")
    monkeypatch.setenv("JPY_SESSION_NAME", str(tmp_path / "copy.ipynb"))
    assert notebook_file("02_rope") == str(tmp_path / "copy.ipynb")
    monkeypatch.setenv("JPY_SESSION_NAME", str(tmp_path / "01_attention.ipynb"))  # another assignment's
    (tmp_path / "02_rope.ipynb").write_text(json.dumps(rope))
    assert notebook_file("02_rope") == "02_rope.ipynb"


def test_outputs_per_question_visible_share_and_no_isolation_for_students(tmp_path):
    """A renamed download grades as 02_rope; summary.csv has a column per question; `visible_share` puts that
    share of a question's points on its visible cases, exactly; results.json has the exact total and does not show
    the isolation."""
    subs = tmp_path / "subs"
    _submission("01_attention", {}, subs, "01_attention (1).ipynb")
    _submission("01_attention", {"causal_sdpa": "def causal_sdpa(q, k, v):\n    return q"}, subs, "wrong.ipynb")
    reports = {r.file: r for r in grade.grade("01_attention", subs, tmp_path / "out", seed=3, jobs=2,
                                              progress=False, visible_share=0.5)}
    assert reports["01_attention (1).ipynb"].score == 10.0
    with open(tmp_path / "out/summary.csv", encoding="utf-8") as f:
        rows = {row["file"]: row for row in csv.DictReader(f)}
    row = rows["wrong.ipynb"]
    assert [row[q] for q in ("causal_sdpa", "kv_cache_update", "decode_step")] == ["0.0000", "3.0000", "3.0000"]
    assert row["score"] == "6.0000" and rows["01_attention (1).ipynb"]["causal_sdpa"] == "4.0000"
    visible = [t.max_units for t in reports["wrong.ipynb"].tests if t.name.startswith("causal_sdpa (visible")]
    hidden = [t.max_units for t in reports["wrong.ipynb"].tests if t.name.startswith("causal_sdpa (hidden")]
    assert sum(visible) == 20_000 and sum(hidden) == 20_000 and len(visible) == 2, (visible, hidden)
    results = json.loads((tmp_path / "out/students/wrong/results.json").read_text())
    assert "isolation" not in results["output"], results["output"]
    assert round(sum(t["score"] for t in results["tests"]), 4) == 6.0 and results["score"] == 6.0
    assert (tmp_path / "out/isolation.txt").read_text().startswith("isolation: ")


NO_SCALE_SDPA = '''import torch


def causal_sdpa(q, k, v):
    s, t = q.shape[-2], k.shape[-2]
    allowed = torch.ones(s, t, dtype=torch.bool).tril(diagonal=t - s)
    return (q @ k.transpose(-2, -1)).masked_fill(~allowed, float("-inf")).softmax(-1) @ v  # no 1/sqrt(d)
'''
STALE_CACHE_UPDATE = '''def kv_cache_update(cache_k, cache_v, k_new, v_new, start_pos):
    end = start_pos + k_new.shape[2]
    cache_k[:, :, start_pos:end] = k_new  # forgets the values
    return cache_k[:, :, :end], cache_v[:, :, :end]
'''


def test_a_failing_earlier_function_is_charged_once(tmp_path):
    """01's decode_step calls the learner's causal_sdpa and kv_cache_update: graded with the references standing
    in for them, so a wrong causal_sdpa (or kv_cache_update) costs its own points only."""
    subs = tmp_path / "subs"
    _submission("01_attention", {"causal_sdpa": NO_SCALE_SDPA}, subs, "sdpa.ipynb")
    _submission("01_attention", {"kv_cache_update": STALE_CACHE_UPDATE}, subs, "cache.ipynb")
    decode_inline = ("import torch\n\n\ndef decode_step(q, k_new, v_new, cache_k, cache_v, pos):\n"
                     "    cache_k[:, :, pos:pos + 1], cache_v[:, :, pos:pos + 1] = k_new, v_new\n"
                     "    k, v = cache_k[:, :, :pos + 1], cache_v[:, :, :pos + 1]\n"
                     "    return (q @ k.transpose(-2, -1)).softmax(-1) @ v  # its own attention, no scale\n")
    _submission("01_attention", {"causal_sdpa": NO_SCALE_SDPA, "decode_step": decode_inline}, subs, "own.ipynb")
    reports = {r.student: {q: sum(u for _, u, _ in cases) / 10_000 for q, cases in _scores(r).items()}
               for r in grade.grade("01_attention", subs, tmp_path / "out", seed=1, jobs=2, progress=False)}
    assert reports["sdpa"] == {"causal_sdpa": 0.0, "kv_cache_update": 3.0, "decode_step": 3.0}
    assert reports["cache"] == {"causal_sdpa": 4.0, "kv_cache_update": 0.0, "decode_step": 3.0}
    assert reports["own"]["decode_step"] < 3.0  # its own attention's bug is its own


def test_moe_forward_calling_a_wrong_router_is_charged_to_the_router(tmp_path):
    wrong_router = ("import torch\n\n\ndef route_topk(gate, x):\n"
                    "    weight, idx = (x @ gate.weight.T).softmax(-1).topk(gate.top_k, dim=-1)\n"
                    "    return idx, weight  # neither normalized nor scaled\n")
    via_router = ("import torch\n\n\ndef moe_forward(moe, hidden_states):\n"
                  "    x = hidden_states.flatten(0, 1)\n"
                  "    if moe.gate.scoring_func == 'softmax':\n"
                  "        idx, weight = route_topk(moe.gate, x)\n"
                  "    else:\n"
                  "        idx, weight = route_group_limited(gate=moe.gate, x=x)\n"
                  "    out = torch.zeros_like(x)\n"
                  "    for e, expert in enumerate(moe.experts):\n"
                  "        token, slot = (idx == e).nonzero(as_tuple=True)\n"
                  "        out = out.index_add(0, token, expert(x[token]) * weight[token, slot, None])\n"
                  "    if moe.shared_experts is not None:\n"
                  "        out = out + moe.shared_experts(x)\n"
                  "    return out.view(hidden_states.shape)\n")
    subs = tmp_path / "subs"
    _submission("04_moe", {"route_topk": wrong_router, "moe_forward": via_router}, subs, "router.ipynb")
    (report,) = grade.grade("04_moe", subs, tmp_path / "out", seed=2, jobs=1, progress=False)
    scores = _scores(report)
    assert all(units == 0 for _, units, _ in scores["route_topk"])
    assert all(units > 0 for _, units, _ in scores["moe_forward"]), scores["moe_forward"]


def test_check_says_the_failure_comes_from_the_earlier_function_and_is_charged_there():
    from exercises import feedback

    namespace: dict = {}
    exec(NO_SCALE_SDPA + "\n\ndef decode_step(q, k_new, v_new, cache_k, cache_v, pos):\n"
         "    cache_k[:, :, pos:pos + 1], cache_v[:, :, pos:pos + 1] = k_new, v_new\n"
         "    return causal_sdpa(q, cache_k[:, :, :pos + 1], cache_v[:, :, :pos + 1])\n", namespace)
    with pytest.raises(AssertionError, match=r"it calls your causal_sdpa, which fails its own check: fix "
                                             r"causal_sdpa first \(grading judges decode_step with a correct "
                                             r"causal_sdpa in place of yours, so this costs causal_sdpa's points"):
        feedback.check("decode_step", namespace["decode_step"])


def test_dense_moe_masked_with_where_loses_the_many_experts_cases(tmp_path):
    """Every expert on every token, the unchosen outputs dropped with torch.where (no NaN to catch): the
    many-experts cases (visible and hidden) do not fit in moe_forward's memory budget in grading."""
    subs = tmp_path / "subs"
    _submission("04_moe", {"moe_forward": _as(answers.moe_forward_dense_where, "moe_forward")}, subs, "dense.ipynb")
    (report,) = grade.grade("04_moe", subs, tmp_path / "out", seed=0, jobs=1, progress=False)
    question = QUESTIONS["moe_forward"]
    many = [(label, units, output) for (label, units, output), (_, args) in
            zip(_scores(report)["moe_forward"], question.cases(None) + question.cases(0))
            if args[0].gate.n_routed_experts == 128]
    assert {label.split()[0] for label, _, _ in many} == {"visible", "hidden"}, many
    for label, units, output in many:
        assert units == 0 and output.startswith("ran out of memory: each call may use 64 MiB more"), output
        assert "running every expert on every token (then masking or weighting" in output


def test_visible_share_is_checked_and_split_exactly(tmp_path, capsys):
    from exercises.__main__ import main
    from exercises.scoring import case_units

    assert case_units(4, 2, 3, 0.5) == [10_000, 10_000, 6666, 6666, 6668]
    assert case_units(1, 2, 3) == [2000] * 5 and sum(case_units(0.7, 3, 3, 0.3)) == 7000
    with pytest.raises(SystemExit):
        main(["grade", "02_rope", str(tmp_path), str(tmp_path / "out"), "--seed", "1", "--visible-share", "1.5"])
    assert "--visible-share: expected a number from 0 to 1, got 1.5" in capsys.readouterr().err


def test_grading_names_the_mistake_of_a_visible_case_only():
    """A visible case's wrong answer that equals a common mistake is told which, as in the notebook's check; a
    hidden case's message stays input-free."""
    from exercises.protocol import Outcome
    from exercises.questions import clone
    from exercises.scoring import build_cases, verdict
    cases = build_cases(assignments.load("02_rope"), seed=0)
    what, half_split = QUESTIONS["rope_interleaved"].mistakes[0]
    wrong = [(c, half_split(*clone(c.args))) for c in cases]
    for case, value in (wrong[0], next(w for w in wrong if w[0].hidden and not w[1].allclose(w[0].expected))):
        passed, message = verdict(case, Outcome({"value": value}))
        assert not passed and (what in message) != case.hidden, message


def test_static_check_counts_code_cells_and_says_so():
    """A learner in JupyterLab sees markdown cells too: 'code cell 2' is the second code cell."""
    from exercises import static_check
    findings = static_check.check_cells(["x = 1", "import json"], [QUESTIONS["update_bias"]], ("refimpl.moe",))
    assert findings.everything == ["code cell 2, line 1: imports json, which graded answers may not import"], \
        findings.everything


def test_a_hanging_cell_costs_its_time_once(tmp_path, monkeypatch):
    """A cell that runs past the cell limit is skipped in the sandbox it hung in and not run in the next ones
    (01_attention grades in several): otherwise each sandbox waits for it and the submission's time runs out."""
    from exercises import protocol
    started = []
    real_init = protocol.Conversation.__init__

    def recording_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        started.append(list(self.init.get("skip", [])))

    monkeypatch.setattr(grade.Conversation, "__init__", recording_init)
    path = _submission("01_attention", {}, tmp_path / "subs", "hangs.ipynb")
    notebook = nbformat.read(path, as_version=4)
    notebook.cells.insert(1, nbformat.v4.new_code_cell("while True:\n    pass"))
    nbformat.write(notebook, path)
    [report] = grade.grade("01_attention", tmp_path / "subs", tmp_path / "out", seed=0, jobs=1, progress=False,
                           limits=grade.Limits(cell_timeout=3))
    hung = 0  # the code cell's index: the first code cell is otter's
    assert len(started) >= 2 and started[0] == [] and all(s == [hung] for s in started[1:]), started
    assert report.score == 10.0 and "code cell 1 ran longer than 3 s" in " ".join(report.notes), report.notes
