"""The cheating and breakage corpus: one small submission per case, and what it must score.

Each case is a list of code cells (written into a notebook at test time, in a temporary folder, so that no
notebook here is collected by pytest/nbval) or raw bytes, under a file name, with the total it must score.
`01_attention` points: causal_sdpa 4, kv_cache_update 3, decode_step 3, each over 5 cases (2 visible, 3 hidden).
`{subs}` and `{repo}` in a cell are replaced by the submissions folder and the checkout: a cheater is assumed to
know where they lie. The classes are the issue's (1 reference reached anyway, 2 protocol taken over, 3 kernel
without a kernel, 4 library equivalent, 5 reading what it should not, 6-7 hostile names and texts, 8 hidden
inputs in errors, 12 honest magics); the others are breakage.
"""

from __future__ import annotations

import os
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
REST = HONEST[1:]  # honest kv_cache_update and decode_step: 6 points
STUBS = ['import torch\n\ndef causal_sdpa(q, k, v):\n    raise NotImplementedError("causal_sdpa: write the body")\n',
         'def kv_cache_update(cache_k, cache_v, k_new, v_new, start_pos):\n    raise NotImplementedError()\n',
         'def decode_step(q, k_new, v_new, cache_k, cache_v, pos):\n    raise NotImplementedError()\n']
OTTER = 'import otter\ngrader = otter.Notebook("01_attention.ipynb")\n'
FULL, SDPA_POINTS = 10.0, 4.0


def _sdpa_by(body: str, prelude: str = "import torch\n") -> str:
    return f"{prelude}\ndef causal_sdpa(q, k, v):\n{body}\n"


MASKED = ("    n, t = q.shape[-2], k.shape[-2]\n"
          "    mask = torch.ones(n, t, dtype=torch.bool).tril(diagonal=t - n)\n")


@dataclass(frozen=True)
class Case:
    file: str  # the file name in the submissions folder (bytes for names that are not UTF-8)
    cells: list | None  # None: `raw` is the file's content
    score: float | None  # the total it must score; None: 6 <= score < 10 (a wrong causal_sdpa)
    reason: str = ""  # words the summary's reason must contain
    raw: bytes = b""
    klass: str = ""  # the class


CASES = [
    Case("honest.ipynb", [OTTER] + HONEST + ['grader.check("causal_sdpa")'], FULL),
    Case("honest_magics.ipynb", ["%matplotlib inline", "%%time\n" + SDPA, "%%capture\n" + CACHE,
                                 "%time x = 1\n" + DECODE], FULL, klass="12"),
    Case("empty.ipynb", STUBS, 0.0, reason="NotImplementedError"),
    Case("wrong_no_mask.ipynb", [SDPA.replace('masked_fill(~allowed, float("-inf"))', "masked_fill(allowed, 0.0)")]
         + REST, None, reason="causal_sdpa"),
    # 1: the reference, reached anyway (the sandbox's refimpl has no such function; the check sees the routes)
    Case("ref_import.ipynb", [_sdpa_by("    return sdpa(q, k, v, is_causal=True)",
                                       "import torch\nfrom refimpl.attention import scaled_dot_product_attention "
                                       "as sdpa")] + REST, 0.0, reason="imports refimpl.attention", klass="1"),
    Case("ref_wrapped.ipynb", [_sdpa_by("    return f.__wrapped__(q, k, v, is_causal=True)",
                                        "import torch\nimport refimpl.attention as ra\n"
                                        "f = ra.scaled_dot_product_attention")] + REST, 0.0, reason="__wrapped__",
         klass="1"),
    Case("ref_guard_table.ipynb", ["from exercises import guard\nguard.watching = None\n"
                                   "orig = guard._originals\n" + _sdpa_by("    return orig['x'](q, k, v)")] + REST,
         0.0, reason="exercises", klass="1"),
    # 2: a cell that answers the grader's requests itself
    Case("protocol_takeover.ipynb", ["import torch\nimport torch.nn.functional as F\nfrom exercises import wire\n"
                                     "while True:\n    req = wire.read(3, trusted=True)\n"
                                     "    args = torch.load(req['args'])\n"
                                     "    wire.write(4, {'value': F.scaled_dot_product_attention(*args[:3]), "
                                     "'forbidden': [], 'launches': 1, 'tampering': []})"] + REST,
         0.0, reason="exercises.wire", klass="2"),
    Case("protocol_raw_fds.ipynb", ["import os, torch\n"
                                    "def causal_sdpa(q, k, v):\n    return q\n"
                                    "def take_over():  # answers the requests on the protocol's pipes\n"
                                    "    os.write(4, os.read(3, 8))\n"] + REST,
         0.0, reason=".read", klass="2"),
    # 4: library equivalents, plain and obfuscated
    Case("torch_c_nn_sdpa.ipynb", [_sdpa_by(MASKED + "    return torch._C._nn.scaled_dot_product_attention("
                                            "q, k, v, attn_mask=mask)")] + REST, FULL - SDPA_POINTS - 3.0,
         reason="scaled_dot_product_attention", klass="4"),
    Case("getattr_concat.ipynb", [_sdpa_by(MASKED + "    f = getattr(torch._C._nn, 'scaled_' + "
                                           "'dot_product_attention')\n    return f(q, k, v, attn_mask=mask)")]
         + REST, 0.0, reason="getattr", klass="4"),
    Case("importlib_route.ipynb", [_sdpa_by(MASKED + "    m = importlib.import_module('torch.nn.func' + 'tional')\n"
                                            "    return m.__dict__['scaled_dot_' + 'product_attention'](q, k, v, "
                                            "attn_mask=mask)", "import torch\nimport importlib")] + REST, 0.0,
         reason="importlib", klass="4"),
    Case("eval_route.ipynb", [_sdpa_by(MASKED + "    return eval('torch.nn.functional.scaled_' + 'dot_product_"
                                       "attention')(q, k, v, attn_mask=mask)")] + REST, 0.0, reason="eval",
         klass="4"),
    Case("magic_hides_route.ipynb", ["%%capture\nfrom torch.nn.functional import scaled_dot_product_attention as "
                                     "s\n" + _sdpa_by(MASKED + "    return s(q, k, v, attn_mask=mask)")] + REST,
         FULL - SDPA_POINTS - 3.0, reason="scaled_dot_product_attention", klass="4"),
    # 5: reading the solutions or another submission (the sandbox has none of them; reading files is a route
    # around the static check, so this one only looks)
    Case("peeks_at_files.ipynb", ["import os, torch\nseen = [p for p in ['{repo}/exercises/src/"
                                  "01_attention.ipynb', '{subs}/honest.ipynb'] if os.path.exists(p)]\n",
                                  SDPA.replace("    return scores", "    if not seen:\n        return q\n"
                                               "    return scores")] + REST,
         FULL - SDPA_POINTS, klass="5"),
    # 8: an error that quotes the hidden inputs
    Case("error_quotes_inputs.ipynb", [_sdpa_by("    raise ValueError(f'my inputs: {q.sum().item()!r} {q}')")]
         + REST, FULL - SDPA_POINTS, reason="ValueError", klass="8"),
    # 6, 7: hostile texts and names
    Case("surrogate_error.ipynb", [_sdpa_by("    raise RuntimeError('caf\\udce9 ' * 400_000)")] + REST,
         FULL - SDPA_POINTS, reason="RuntimeError", klass="6"),
    Case("huge_string.ipynb", [SDPA, CACHE.replace("    end =", "    return 'x' * 4_000_000\n    end ="), DECODE],
         FULL - 3.0, reason="kv_cache_update", klass="6"),
    Case("scores.csv.ipynb", None, 0.0, raw=b"[]", reason="not a readable notebook", klass="6"),  # names only:
    Case("summary.csv.ipynb", None, 0.0, raw=b"[]", reason="not a readable", klass="6"),  # no sandbox needed
    Case(b"caf\xe9.ipynb", None, 0.0, raw=b"\xff\xfe", reason="not a readable notebook", klass="6"),
    Case("a b.ipynb", None, 0.0, raw=b"{}", reason="not a readable notebook", klass="7"),
    Case("a_b.ipynb", HONEST, FULL, klass="7"),
    Case("=1+1.ipynb", HONEST, FULL, klass="7"),
    # breakage
    Case("loop_top_level.ipynb", HONEST + ["while True:\n    pass"], FULL, reason="ran longer than"),
    Case("os_exit_in_answer.ipynb", [_sdpa_by("    import os\n    os._exit(3)")] + REST, FULL - SDPA_POINTS,
         reason="process ended"),
    Case("system_exit_top_level.ipynb", HONEST + ["raise SystemExit(0)"], FULL),
    Case("huge_print.ipynb", HONEST + ['print("x" * 50_000_000)'], FULL),
    Case("not_json.ipynb", None, 0.0, reason="not a readable notebook", raw=b"{ this is not json"),
    Case("python_file.py", None, 0.0, reason="not a readable notebook", raw=SDPA.encode()),
]

# 3: exercise 06, a kernel exercise without a kernel
SOFTMAX_KERNEL = '''import torch
import triton
import triton.language as tl

@triton.jit
def softmax_kernel(x_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
{body}

def softmax_rows(x):
    out = torch.empty_like(x)
    softmax_kernel[(x.shape[0],)](x, out, x.shape[1], BLOCK=triton.next_power_of_2(x.shape[1]))
    return out
'''
HONEST_SOFTMAX_BODY = '''    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=float("-inf"))
    e = tl.exp(x - tl.max(x, axis=0))
    tl.store(out_ptr + row * n_cols + cols, e / tl.sum(e, axis=0), mask=mask)'''
KERNEL_CASES = {  # file -> (cells, softmax_rows points it must score: 4 honest, else 0)
    "kernel_honest.ipynb": ([SOFTMAX_KERNEL.format(body=HONEST_SOFTMAX_BODY)], 4.0),
    "kernel_empty_plus_torch.ipynb": ([SOFTMAX_KERNEL.format(body="    pass").replace(
        "    return out\n", "    return torch.log_softmax(x, dim=-1).exp()\n")], 0.0),
    "kernel_tl_softmax.ipynb": ([SOFTMAX_KERNEL.format(body=HONEST_SOFTMAX_BODY.replace(
        "e / tl.sum(e, axis=0)", "tl.softmax(x)"))], 0.0),
    "kernel_calls_python.ipynb": (["import torch\ndef helper(x):\n    return torch.softmax(x, -1)\n" +
                                   SOFTMAX_KERNEL.format(body=HONEST_SOFTMAX_BODY.replace(
                                       "e / tl.sum(e, axis=0)", "helper(e)"))], 0.0),
}


def _notebook(cells: list[str]) -> str:
    return nbformat.writes(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells]))


def write(folder, repo) -> None:
    """Write every 01_attention case into `folder`."""
    for case in CASES:
        name = case.file.encode() if isinstance(case.file, str) else case.file
        path = os.fsencode(folder) + b"/" + name
        if case.cells is None:
            data = case.raw
        else:
            data = _notebook([c.replace("{subs}", str(folder)).replace("{repo}", str(repo)) for c in case.cells])
            data = data.encode()
        with open(path, "wb") as f:
            f.write(data)


def write_kernels(folder) -> None:
    for name, (cells, _) in KERNEL_CASES.items():
        (folder / name).write_text(_notebook(cells))
