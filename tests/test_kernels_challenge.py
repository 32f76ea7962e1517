"""The learner's challenge (`python -m dskernels.challenge`): end to end on CPU for every kernel lesson, a zero
and a wrong kernel refused by the one checker, and the interpreter's traffic counted exactly."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dskernels import challenge, rowwise

ROOT = Path(__file__).resolve().parents[1]

# a learner's file for each challenge: the course's top rung, called as the signature says
CORRECT = {
    "softmax": "from dskernels import rowwise\ndef kernel(x):\n    return rowwise.softmax(x)\n",
    "matmul": "from dskernels import matmul\ndef kernel(a, b):\n    return matmul.matmul(a, b, step='v2')\n",
    "flash_attention": ("from dskernels import flash_attention as fa\ndef kernel(q, k, v):\n"
                        "    return fa.flash_attention(q, k, v, causal=True)\n"),
    "mla_decode": ("from dskernels import mla_decode as md\ndef kernel(q, p, c, k, lens, scale):\n"
                   "    return md.mla_decode(q, p, c, k, lens, scale)\n"),
    "moe": "from dskernels import moe\ndef kernel(*args):\n    return moe.moe_experts(*args, step='v3')\n",
}


def _command(tmp_path, name, source, *extra):
    path = tmp_path / f"{name}_kernel.py"
    path.write_text(source)
    return subprocess.run([sys.executable, "-m", "dskernels.challenge", name, "--kernel", str(path), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("name", sorted(challenge.CHALLENGES))
def test_every_challenge_runs_end_to_end_on_cpu(name, tmp_path):
    assert set(CORRECT) == set(challenge.CHALLENGES)
    done = _command(tmp_path, name, CORRECT[name])
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    rungs = challenge.CHALLENGES[name]().rungs()
    for impl in [*rungs, "your kernel", "least bytes the op must move"]:
        assert impl in done.stdout, (impl, done.stdout)
    assert "REFUSED" not in done.stdout and done.stdout.count("  check ") >= 1


def test_a_zero_kernel_and_a_wrong_one_are_refused(tmp_path):
    zero = "import torch\ndef kernel(x):\n    return torch.zeros_like(x)\n"
    wrong = ("from dskernels import rowwise\ndef kernel(x):\n"
             "    return rowwise.softmax(x * 1.01)  # a scale off by 1%\n")
    for source in (zero, wrong):
        done = _command(tmp_path, "softmax", source)
        assert done.returncode == 1 and "REFUSED" in done.stdout and "WRONG" in done.stdout, done.stdout


def test_run_challenge_from_a_notebook_cell():
    result = challenge.run_challenge("softmax", lambda x: rowwise.softmax(x, step="v1"))
    assert result["ok"] and [r["impl"] for r in result["rows"]] == ["softmax v1", "softmax v2", "your kernel"]
    assert result["rows"][0]["bytes_loaded"] == result["rows"][2]["bytes_loaded"]  # v1 is the learner's
    assert not challenge.run_challenge("softmax", lambda x: x.softmax(dim=0))["ok"]  # the wrong dimension
    with pytest.raises(ValueError, match="challenge: expected one of"):
        challenge.run_challenge("softmx", rowwise.softmax)


def test_count_traffic_counts_programs_and_bytes(device):
    # softmax v1 over 4 x 100 float32: one launch, one program per row, each element loaded once and stored
    # once (the masked-off tail of the 128-wide block is not counted)
    x = torch.randn(4, 100, device=device)
    with challenge.count_traffic() as traffic:
        rowwise.softmax(x, step="v1")
    assert (traffic.launches, traffic.programs) == (1, 4)
    assert traffic.bytes_loaded == traffic.bytes_stored == 4 * 100 * 4


def test_a_learners_mistakes_get_one_line_not_a_traceback(tmp_path):
    cases = {  # file source -> what the one line must say
        "def kernel(x)\n    return x\n": "line 1: SyntaxError",
        "import not_a_module_anywhere\ndef kernel(x):\n    return x\n": "raised ModuleNotFoundError",
        "def other(x):\n    return x\n": "expected a function named 'kernel'",
        "def kernel(x, dim):\n    return x.softmax(dim)\n": "cannot be called with the challenge's 1 argument",
        "def kernel(x):\n    raise RuntimeError('boom')\n": "raised RuntimeError: boom (softmax_kernel.py line 2)",
    }
    for source, expected in cases.items():
        done = _command(tmp_path, "softmax", source)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert expected in done.stderr and done.stderr.startswith("challenge: error:"), (expected, done.stderr)
    done = subprocess.run([sys.executable, "-m", "dskernels.challenge", "softmax", "--kernel",
                           str(tmp_path / "missing.py")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and "expected a Python file" in done.stderr and "Traceback" not in done.stderr
    done = _command(tmp_path, "softmax", CORRECT["softmax"], "--size", "full")  # hours in the interpreter
    assert done.returncode == 2 and "need a GPU" in done.stderr, done.stderr


def test_outputs_that_are_not_the_reference_are_refused():
    softmax = "softmax"
    for kernel, expected in [
        (lambda x: None, "returned NoneType, expected a tensor"),
        (lambda x: x.double().softmax(-1), "dtype torch.float64, expected torch.float32"),
        (lambda x: torch.full_like(x.fill_(0.0), 1 / x.shape[1]), "overwrote its input"),  # softmax(0) matches
    ]:
        result = challenge.run_challenge(softmax, kernel)
        assert not result["ok"] and expected in result["checks"][-1], result["checks"]


def test_a_kernel_without_triton_is_not_counted_as_free(capsys):
    assert challenge.run_challenge("softmax", lambda x: x.softmax(-1))["ok"]
    assert "launched no Triton kernel" in capsys.readouterr().out


def test_count_traffic_counts_atomics_and_tensor_descriptors(device):
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(x_ptr, y_ptr, lock_ptr, n, BLOCK: tl.constexpr):
        tl.atomic_cas(lock_ptr, 0, 1)  # one int32 read and written
        source = tl.make_tensor_descriptor(x_ptr, shape=[n], strides=[1], block_shape=[BLOCK])
        tl.store(y_ptr + tl.arange(0, BLOCK), source.load([0]), mask=tl.arange(0, BLOCK) < n)

    x, y = torch.randn(16, device=device), torch.zeros(16, device=device)
    lock = torch.zeros(1, dtype=torch.int32, device=device)
    with challenge.count_traffic() as traffic:
        kernel[(1,)](x, y, lock, 10, BLOCK=16)
    assert torch.equal(y[:10], x[:10]) and int(lock) == 1
    assert (traffic.bytes_loaded, traffic.bytes_stored) == (4 + 10 * 4, 4 + 10 * 4)


def test_load_kernel_names_what_is_missing(tmp_path):
    with pytest.raises(challenge.ChallengeError, match="--kernel: expected a Python file"):
        challenge.load_kernel(tmp_path / "missing.py")
    (tmp_path / "k.py").write_text("def other(x):\n    return x\n")
    with pytest.raises(challenge.ChallengeError, match="k.py: expected a function named 'kernel'"):
        challenge.load_kernel(tmp_path / "k.py")
    (tmp_path / "k.ipynb").write_text("{}")
    with pytest.raises(challenge.ChallengeError, match="ending in .py, got k.ipynb"):
        challenge.load_kernel(tmp_path / "k.ipynb")
    (tmp_path / "helper_beside.py").write_text("def softmax(x):\n    return x.softmax(-1)\n")
    (tmp_path / "uses.py").write_text("from helper_beside import softmax\ndef kernel(x):\n    return softmax(x)\n")
    kernel = challenge.load_kernel(tmp_path / "uses.py")
    assert kernel(torch.zeros(1, 2)).tolist() == [[0.5, 0.5]]  # cpu-only: no kernel
