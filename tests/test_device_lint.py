"""Static device lint: in the kernel tests and the kernel notebooks, every tensor and module is made on the
run's device, so that on a GPU no kernel receives a CPU tensor (issue 17).

On a CPU everything lives on the CPU and the interpreter runs any kernel, so a forgotten `device=` passes every
test here and fails only on a GPU, where a Triton kernel refuses a CPU tensor. This check reads the code instead
of running it (the AST of each test file, the code cells of each notebook) and applies three rules:

1. A torch tensor factory (`torch.randn`, `rand`, `randint`, `randperm`, `zeros`, `ones`, `empty`, `full`,
   `arange`, `tensor`, `as_tensor`, `linspace`, `logspace`, `eye`, `empty_strided`, `from_numpy`) is given a
   device: `device=DEVICE` / `device=device` / `device=x.device` / `device="cuda"`, or the expression holding it
   is moved with `.to(DEVICE)` / `.to(device=...)` / `.cuda()` (through arithmetic, indexing, method calls such
   as `.half()`, and `torch.stack` / `torch.cat` of a list of them). `*_like` and `x.new_*` inherit their
   argument's device and are fine.
2. An `nn.Module` built there (a class the file imports or defines that subclasses `torch.nn.Module`) gets
   `device=`, is chained with `.to(device)`, or the name it is assigned to is `.to(device)`-ed in the file.
3. Opt-out: a comment containing `cpu-only` on the statement's lines (e.g. data only plotted, or a CPU tensor a
   test passes on purpose to see it refused), with the reason beside it.

A device is a name ending in `device` (DEVICE, device), an attribute `.device`, a string starting with "cuda",
or `torch.device(...)` of those: "cpu" is not. The lint is parametrized per file so a failure names the file
and each line at fault.
"""

from __future__ import annotations

import ast
import importlib
import io
import json
import tokenize
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
KERNEL_NOTEBOOKS = sorted(ROOT.glob("lessons/1[3-7]_*.ipynb")) + [ROOT / "exercises/src/06_kernels.ipynb"]
KERNEL_TESTS = sorted(ROOT.glob("tests/test_kernels_*.py"))

FACTORIES = {"randn", "rand", "randint", "randperm", "zeros", "ones", "empty", "full", "arange", "tensor",
             "as_tensor", "linspace", "logspace", "eye", "empty_strided", "from_numpy"}
COMBINERS = {"stack", "cat", "concat", "concatenate", "hstack", "vstack"}  # torch.X([tensors]) keeps their device
OPT_OUT = "cpu-only"
IMPORTABLE = ("torch", "refimpl", "dskernels", "exercises")  # modules the lint may import to resolve a class


@dataclass(frozen=True)
class Fault:
    where: str  # "line 12" or "cell 9, line 3"
    code: str  # the call at fault
    why: str

    def __str__(self) -> str:
        return f"{self.where}: {self.code}: {self.why}"


# ------------------------------------------------------------------------------------------------- sources


def notebook_source(path: Path) -> tuple[str, list[str]]:
    """(the code cells joined as one module, for each of its lines "cell i, line j"). Magics become comments."""
    lines, where = [], []
    for i, cell in enumerate(json.loads(path.read_text())["cells"]):
        if cell["cell_type"] != "code":
            continue
        for j, line in enumerate("".join(cell["source"]).splitlines(), start=1):
            lines.append("# " + line if line.lstrip().startswith(("%", "!")) else line)
            where.append(f"cell {i}, line {j}")
    return "\n".join(lines) + "\n", where


def opted_out_lines(source: str) -> set[int]:
    """Line numbers whose comment contains the opt-out word."""
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return {tok.start[0] for tok in tokens if tok.type == tokenize.COMMENT and OPT_OUT in tok.string}


# ------------------------------------------------------------------------------------------------- the rules


def is_device(node: ast.AST) -> bool:
    """DEVICE, device, x.device, "cuda...", torch.device(<one of those>)."""
    if isinstance(node, ast.Name):
        return node.id.lower().endswith("device")
    if isinstance(node, ast.Attribute):
        return node.attr == "device"
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str) and node.value.startswith("cuda")
    if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.device" and node.args:
        return is_device(node.args[0])
    return False


def gives_device(call: ast.Call) -> bool:
    """A call with device=<device>, or `.to(<device>, ...)` / `.to(device=<device>)`."""
    return any(k.arg == "device" and is_device(k.value) for k in call.keywords) or (
        isinstance(call.func, ast.Attribute) and call.func.attr == "to" and bool(call.args)
        and is_device(call.args[0]))


class Lint:
    """The faults of one file's source (see the module docstring for the rules)."""

    def __init__(self, source: str, where: list[str] | None = None):
        self.tree = ast.parse(source)
        self.where = where
        self.opted_out = opted_out_lines(source)
        self.parent = {child: node for node in ast.walk(self.tree) for child in ast.iter_child_nodes(node)}
        self.names = self._imported_names()
        self.local_modules: set[str] = set()
        for node in ast.walk(self.tree):  # classes defined here that subclass nn.Module
            if isinstance(node, ast.ClassDef) and any(self._is_module_class(b) for b in node.bases):
                self.local_modules.add(node.name)
        self.moved = {ast.unparse(node.func.value) for node in ast.walk(self.tree)  # X in `X.to(device)`
                      if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                      and (gives_device(node) or node.func.attr == "cuda")}

    def faults(self) -> list[Fault]:
        out = []
        for node in ast.walk(self.tree):
            if not isinstance(node, ast.Call) or self._opted_out(node):
                continue
            if self._is_factory(node) and not self._reaches_device(node, through_combiners=True):
                out.append((node, "a tensor made without device= and not moved with .to(device)"))
            elif self._is_module_class(node.func) and not self._module_moved(node):
                out.append((node, "an nn.Module built without device= and never .to(device)-ed"))
        out.sort(key=lambda fault: (fault[0].lineno, fault[0].col_offset))
        return [self._fault(node, why) for node, why in out]

    # tensors

    @staticmethod
    def _is_factory(call: ast.Call) -> bool:
        f = call.func
        return (isinstance(f, ast.Attribute) and f.attr in FACTORIES and isinstance(f.value, ast.Name)
                and f.value.id == "torch")

    def _reaches_device(self, node: ast.AST, through_combiners: bool) -> bool:
        """Whether `node` is made on a device, or the expression around it moves it to one."""
        if isinstance(node, ast.Call) and gives_device(node):
            return True
        while node in self.parent:
            up = self.parent[node]
            if isinstance(up, ast.Attribute) and up.value is node:  # x.attr or x.method(...)
                call = self.parent.get(up)
                if isinstance(call, ast.Call) and call.func is up:
                    if gives_device(call) or up.attr == "cuda":
                        return True
                    up = call
            elif isinstance(up, ast.Call) and node in up.args and through_combiners:
                if not (isinstance(up.func, ast.Attribute) and up.func.attr in COMBINERS
                        and ast.unparse(up.func.value) == "torch"):
                    return False
                if gives_device(up):
                    return True
            elif isinstance(up, (ast.ListComp, ast.GeneratorExp)) and through_combiners:
                if up.elt is not node:
                    return False
            elif not isinstance(up, (ast.BinOp, ast.UnaryOp, ast.Subscript, ast.List, ast.Tuple, ast.Starred)):
                return False
            elif isinstance(up, ast.Subscript) and up.value is not node:
                return False  # node is the index, not the indexed tensor
            node = up
        return False

    # modules

    def _imported_names(self) -> dict[str, object]:
        """Names the file imports from torch / refimpl / dskernels / exercises, resolved to the objects."""
        names: dict[str, object] = {}
        for node in ast.walk(self.tree):
            try:
                if isinstance(node, ast.Import):
                    for alias in node.names:
                        if alias.name.split(".")[0] in IMPORTABLE:
                            module = importlib.import_module(alias.name)
                            names[alias.asname or alias.name.split(".")[0]] = (
                                module if alias.asname else importlib.import_module(alias.name.split(".")[0]))
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (
                        node.module.split(".")[0] in IMPORTABLE):
                    module = importlib.import_module(node.module)
                    for alias in node.names:
                        value = getattr(module, alias.name, None)
                        if value is None:
                            value = importlib.import_module(f"{node.module}.{alias.name}")
                        names[alias.asname or alias.name] = value
            except ImportError:  # e.g. dskernels without Triton: its names stay unresolved
                continue
        return names

    def _resolve(self, node: ast.AST):
        if isinstance(node, ast.Name):
            return self.names.get(node.id)
        if isinstance(node, ast.Attribute):
            base = self._resolve(node.value)
            return getattr(base, node.attr, None) if base is not None else None
        return None

    def _is_module_class(self, node: ast.AST) -> bool:
        if isinstance(node, ast.Name) and node.id in self.local_modules:
            return True
        value = self._resolve(node)
        return isinstance(value, type) and issubclass(value, torch.nn.Module)

    def _module_moved(self, call: ast.Call) -> bool:
        """device=, a chained .to(device), or the assigned name is .to(device)-ed somewhere in the file."""
        if self._reaches_device(call, through_combiners=False):
            return True
        node = call
        while isinstance(self.parent.get(node), ast.Attribute):  # climb `.eval()`, `.float()`, ...
            node = self.parent[self.parent[node]]
        assign = self.parent.get(node)
        return isinstance(assign, ast.Assign) and any(ast.unparse(t) in self.moved for t in assign.targets)

    # reporting

    def _statement_lines(self, node: ast.AST) -> range:
        while not isinstance(node, ast.stmt):
            node = self.parent[node]
        body = getattr(node, "body", None)  # a compound statement: its header only
        last = body[0].lineno - 1 if isinstance(body, list) and body else node.end_lineno
        return range(node.lineno, max(last, node.lineno) + 1)

    def _opted_out(self, node: ast.AST) -> bool:
        return any(line in self.opted_out for line in self._statement_lines(node))

    def _fault(self, node: ast.AST, why: str) -> Fault:
        where = self.where[node.lineno - 1] if self.where else f"line {node.lineno}"
        code = ast.unparse(node)
        return Fault(where, code if len(code) <= 70 else code[:67] + "...", why)


def lint_file(path: Path) -> list[Fault]:
    if path.suffix == ".ipynb":
        return Lint(*notebook_source(path)).faults()
    return Lint(path.read_text()).faults()


# ------------------------------------------------------------------------------------------------- the checks


def _report(path: Path, faults: list[Fault]) -> str:
    return f"{path.relative_to(ROOT)}: {len(faults)} place(s) off the device:\n" + "\n".join(map(str, faults))


@pytest.mark.parametrize("path", KERNEL_NOTEBOOKS, ids=lambda p: p.name)
def test_kernel_notebook_makes_everything_on_its_device(path):
    faults = lint_file(path)
    assert not faults, _report(path, faults)


@pytest.mark.parametrize("path", KERNEL_TESTS, ids=lambda p: p.name)
def test_kernel_test_makes_everything_on_its_device(path):
    faults = lint_file(path)
    assert not faults, _report(path, faults)


def test_the_lint_sees_every_kernel_file():
    assert len(KERNEL_NOTEBOOKS) == 6 and all(p.exists() for p in KERNEL_NOTEBOOKS), KERNEL_NOTEBOOKS
    assert len(KERNEL_TESTS) >= 6, KERNEL_TESTS


HEADER = "import torch\nfrom dskernels import rowwise\nfrom refimpl.moe import DeepSeekMoE\nDEVICE = 'cpu'\n"

# what lessons 13, 14, 16 and 17 held before issue 17 (each broke on a GPU), and tests of the same kind:
# (source, how many faults)
FAULTY = {
    "lesson 13: CPU rows timed": ("few = torch.randn(8, 512)\nrowwise.softmax(few, step='v1')", 1),
    "lesson 14: CPU inputs": ("a, b, bias = torch.randn(100, 70), torch.randn(70, 90), torch.randn(90)", 3),
    "lesson 16: CPU lengths": ("lens = torch.tensor([1, 200], dtype=torch.int32)", 1),
    "lesson 17: fp16 made on the CPU": ("xw = torch.randn(37, 64).half()", 1),
    "lesson 17: a layer left on the CPU": ("layer = DeepSeekMoE(config).eval()", 1),
    "a test: .to(dtype) is not a device": ("x = (3 * torch.randn(4, 5)).to(torch.float16)", 1),
    "a test: an explicit CPU": ("x = torch.zeros(3, device='cpu')", 1),
    "a kernel result moved, not its input": ("y = rowwise.softmax(torch.randn(3, 4)).to(DEVICE)", 1),
    "an index made on the CPU": ("x = torch.randn(5, device=DEVICE)[torch.arange(3)]", 1),
    "a local module class": ("class Net(torch.nn.Module):\n    pass\nnet = Net()", 1),
    "moved under another name": ("layer = DeepSeekMoE(config)\nother.to(DEVICE)", 1),
}
FINE = {
    "device keyword": "x = torch.randn(8, 512, device=DEVICE)",
    "fixture name": "def test_x(device):\n    x = torch.zeros(3, dtype=torch.int32, device=device)",
    "another tensor's device": "y = torch.empty(3, device=x.device)",
    "chained through arithmetic and casts": "w = (torch.randn(6, 48, 64) * 0.1).half().to(DEVICE)",
    "stacked, then moved": "idx = torch.stack([torch.randperm(5)[:2] for _ in range(4)]).to(DEVICE)",
    "torch.device": "x = torch.ones(2, device=torch.device('cuda'))",
    "like": "y = torch.zeros_like(x)",
    "opted out": "grid = torch.logspace(-1, 4, 200).tolist()  # cpu-only: plotted, never a kernel input",
    "module chained": "layer = DeepSeekMoE(config).to(DEVICE).eval()",
    "module moved later": "layer = DeepSeekMoE(config).eval()\nlayer.to(DEVICE)",
    "a config is not a module": "from refimpl.config import ModelConfig\nconfig = ModelConfig(vocab_size=8)",
}


@pytest.mark.parametrize("name", FAULTY)
def test_the_lint_finds_a_tensor_or_module_off_the_device(name):
    source, count = FAULTY[name]
    faults = Lint(HEADER + source).faults()
    assert len(faults) == count, (name, faults)


@pytest.mark.parametrize("name", FINE)
def test_the_lint_accepts_what_is_on_the_device(name):
    assert Lint(HEADER + FINE[name]).faults() == [], name


def test_the_lint_names_the_notebook_cell_and_line(tmp_path):
    cells = [{"cell_type": "markdown", "source": ["# title"]},
             {"cell_type": "code", "source": ["%matplotlib inline\n", HEADER]},
             {"cell_type": "code", "source": ["x = torch.randn(3, device=DEVICE)\n", "y = torch.randn(3)"]}]
    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps({"cells": cells}))
    assert [str(f) for f in lint_file(path)] == [
        "cell 2, line 2: torch.randn(3): a tensor made without device= and not moved with .to(device)"]
