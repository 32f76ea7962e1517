"""The cheating and breakage corpus for `exercises 01_attention`: one submission per case, and what it must score.

Each case is a list of code cells (written into a notebook at test time, in a temporary folder, so that no
notebook here is collected by pytest/nbval) and the expected result: the score its honest work earns, whether it
must be flagged for review, and words its reason must contain. Points: causal_sdpa 4, kv_cache_update 3,
decode_step 3, each split evenly over 5 cases (2 visible, 3 hidden): 0.8 and 0.6 per case.

`{out}` and `{subs}` in a cell are replaced by the grader's output folder and the submissions folder: a cheater
is assumed to know where the instructor writes.
"""

from __future__ import annotations

from dataclasses import dataclass

import nbformat

SDPA = '''import torch

def causal_sdpa(q, k, v):
    q_len, kv_len, d = q.shape[-2], k.shape[-2], q.shape[-1]
    scores = q @ k.transpose(-2, -1) * d ** -0.5
    allowed = torch.ones(q_len, kv_len, dtype=torch.bool).tril(diagonal=kv_len - q_len)
    return scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1) @ v
'''
CACHE = '''def kv_cache_update(cache_k, cache_v, k_new, v_new, start_pos):
    end = start_pos + k_new.shape[2]
    cache_k[:, :, start_pos:end] = k_new
    cache_v[:, :, start_pos:end] = v_new
    return cache_k[:, :, :end], cache_v[:, :, :end]
'''
DECODE = '''def decode_step(q, k_new, v_new, cache_k, cache_v, pos):
    cache_k[:, :, pos] = k_new[:, :, 0]
    cache_v[:, :, pos] = v_new[:, :, 0]
    k, v = cache_k[:, :, :pos + 1], cache_v[:, :, :pos + 1]
    probs = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)
    return probs @ v
'''
HONEST = [SDPA, CACHE, DECODE]
STUBS = ['import torch\n\ndef causal_sdpa(q, k, v):\n    raise NotImplementedError("causal_sdpa: write the body")\n',
         'def kv_cache_update(cache_k, cache_v, k_new, v_new, start_pos):\n    raise NotImplementedError()\n',
         'def decode_step(q, k_new, v_new, cache_k, cache_v, pos):\n    raise NotImplementedError()\n']
OTTER = 'import otter\ngrader = otter.Notebook("01_attention.ipynb")\n'
FULL, SDPA_POINTS = 10.0, 4.0


@dataclass(frozen=True)
class Case:
    student: str
    cells: list | None  # None: `raw` is the file's content
    score: float | None  # None: between the other two exercises' 6 points and full marks
    flagged: bool = False
    reason: str = ""  # words the summary's reason (or flag) must contain
    raw: bytes = b""
    suffix: str = ".ipynb"

    @property
    def id(self) -> str:
        """The student id the grader gives the file: its name without `.ipynb`."""
        return self.student + ("" if self.suffix == ".ipynb" else self.suffix)


CASES = [
    Case("honest", [OTTER] + HONEST + ['grader.check("causal_sdpa")'], FULL),
    Case("honest_magics", ["%matplotlib inline\n!echo hello"] + HONEST + ["%%time\nx = 1"], FULL),
    Case("empty", STUBS, 0.0, reason="NotImplementedError"),
    Case("wrong_no_mask", [SDPA.replace("masked_fill(~allowed, float(\"-inf\"))", "masked_fill(allowed, 0.0)")]
         + HONEST[1:], None, reason="causal_sdpa"),  # score checked as 6 <= score < 10
    Case("loop_top_level", HONEST + ["while True:\n    pass"], FULL, reason="ran longer than"),
    Case("loop_hidden_input", [SDPA.replace("    q_len, kv_len", "    while q.shape[-1] != 8:\n        pass\n"
                                            "    q_len, kv_len")] + HONEST[1:],
         FULL - SDPA_POINTS + 2 * 0.8, reason="took longer than"),
    Case("sys_exit_top_level", HONEST + ["import sys\nsys.exit(0)"], FULL, reason="SystemExit"),
    Case("os_exit_top_level", HONEST + ["import os\nos._exit(0)"], FULL, reason="ended the process"),
    Case("system_exit_in_answer", [SDPA.replace("    q_len, kv_len", "    raise SystemExit(0)\n    q_len, kv_len")]
         + HONEST[1:], FULL - SDPA_POINTS, reason="SystemExit"),
    Case("keyboard_interrupt_in_answer", [HONEST[0], CACHE.replace("    end =", "    raise KeyboardInterrupt\n"
                                                                   "    end ="), HONEST[2]],
         FULL - 3.0, reason="KeyboardInterrupt"),
    Case("os_exit_in_answer", [SDPA.replace("    q_len, kv_len", "    import os\n    os._exit(3)\n    q_len, kv_len")]
         + HONEST[1:], FULL - SDPA_POINTS, reason="process ended"),
    Case("huge_print", HONEST + ['import sys\nprint("x" * 200_000_000)\nsys.stderr.write("y" * 200_000_000)'],
         FULL),
    Case("memory_bomb_top_level", HONEST + ["hog = bytearray(8 << 30)"], FULL, reason="MemoryError"),
    Case("memory_bomb_in_answer",
         [SDPA.replace("    q_len, kv_len", "    hog = torch.ones(1 << 34)\n    q_len, kv_len")] + HONEST[1:],
         FULL - SDPA_POINTS, reason="raised"),
    Case("patch_check_function", STUBS + [
        "import exercises.feedback, otter\nexercises.feedback.check = lambda *a, **k: None\n"
        "otter.Notebook.check = lambda *a, **k: None"], 0.0, flagged=True, reason="exercises.feedback.check"),
    Case("patch_allclose", STUBS + [
        "import numpy, numpy.testing\ntorch.allclose = lambda *a, **k: True\ntorch.equal = lambda *a, **k: True\n"
        "numpy.testing.assert_allclose = lambda *a, **k: None"], 0.0, flagged=True, reason="torch.allclose"),
    Case("patch_allclose_honest", HONEST + ["torch.allclose = lambda *a, **k: True"], FULL, flagged=True),
    Case("ipython_transformers", STUBS + [
        "ip = get_ipython()\nip.input_transformers_post.append(lambda lines: ['pass\\n'])\n"
        "ip.ast_transformers.append(object())"], 0.0, flagged=True, reason="transformers"),
    Case("rewrite_hidden_tests", STUBS + [
        "import exercises.questions as q\ntry:\n    open(q.__file__, 'a').write('\\n# tampered\\n')\n"
        "except OSError:\n    pass\nq.QUESTIONS.clear()\nimport exercises.compare\n"
        "exercises.compare.mismatch = lambda *a, **k: None"], 0.0, flagged=True, reason="mismatch"),
    Case("writes_results", STUBS + [
        "import json, os\nfor path in ['{out}/writes_results/results.json', '{out}/summary.csv', 'results.json']:\n"
        "    try:\n        os.makedirs(os.path.dirname(path) or '.', exist_ok=True)\n"
        "        open(path, 'w').write(json.dumps({{'tests': [], 'score': 100}}))\n    except OSError:\n        pass",
        "import atexit\n@atexit.register\ndef rewrite():\n    try:\n"
        "        open('{out}/writes_results/results.json', 'w').write('{{\"score\": 100}}')\n    except OSError:\n"
        "        pass"], 0.0, flagged=True, reason="exit handler"),
    Case("detached_process", STUBS + [
        "import subprocess\nsubprocess.Popen(['sh', '-c', 'sleep 3; while true; do "
        "for f in {out}/*/results.json {subs}/*.ipynb; do echo tampered > $f; done; sleep 0.2; done'], "
        "start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)"],
         0.0, flagged=True, reason="left a process"),
    Case("writes_other_student", STUBS + [
        "import os\nfor target in ['{out}/honest/results.json', '{subs}/honest.ipynb']:\n    try:\n"
        "        open(target, 'w').write('tampered')\n    except OSError:\n        pass"], 0.0),
    Case("calls_refimpl", ["import torch\nfrom refimpl.attention import scaled_dot_product_attention as sdpa\n\n"
                           "def causal_sdpa(q, k, v):\n    return sdpa(q, k, v, is_causal=True)\n",
                           "from refimpl.attention import KVCache\n\n"
                           "def kv_cache_update(cache_k, cache_v, k_new, v_new, start_pos):\n"
                           "    cache = KVCache(*cache_k.shape[:2], cache_k.shape[2], cache_k.shape[3])\n"
                           "    cache.k, cache.v = cache_k, cache_v\n"
                           "    return cache.update(k_new, v_new, start_pos)\n", HONEST[2]],
         FULL - SDPA_POINTS - 3.0, reason="refimpl.attention.scaled_dot_product_attention"),
    Case("calls_torch_sdpa_and_hides_it", [
        "import torch\nimport torch.nn.functional as F\n\ndef causal_sdpa(q, k, v):\n    try:\n"
        "        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[-2] == k.shape[-2])\n"
        "    except BaseException:\n        pass\n" + SDPA.split("\n", 2)[2].replace("def causal_sdpa(q, k, v):\n", "")]
         + HONEST[1:], FULL - SDPA_POINTS, reason="scaled_dot_product_attention"),
    Case("not_json", None, 0.0, reason="not a readable notebook", raw=b"{ this is not json"),
    Case("empty_file", None, 0.0, reason="not a readable notebook", raw=b""),
    Case("python_file", None, 0.0, reason="not a readable notebook", raw=SDPA.encode(), suffix=".py"),
]


def write(folder, out_dir) -> None:
    """Write every case into `folder` (file name = student id)."""
    for case in CASES:
        path = folder / f"{case.student}{case.suffix}"
        if case.cells is None:
            path.write_bytes(case.raw)
            continue
        cells = [c.format(out=out_dir, subs=folder) if "{out}" in c or "{subs}" in c else c for c in case.cells]
        notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
        nbformat.write(notebook, path)
