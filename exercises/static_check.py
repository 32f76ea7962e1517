"""What a submission's source says about how its answers are computed, read in the grader's process (never run).

The sandbox cannot be asked whether an answer called a library function that does the question's job: the
submission controls everything there. So the grader reads the code cells here, as IPython would run them
(magics turned into Python by IPython's own transformer; the bodies of `%%time`, `%%capture`, `%%timeit`,
`%time` and `%timeit` read as code), and finds:

- library routes to a question's job (`Question.routes`: e.g. `scaled_dot_product_attention` under any of its
  torch names, as an identifier, an attribute, an imported name or a string): 0 points on that question;
- routes around this check: computed names (`eval`, `exec`, `compile`, `__import__`, `getattr` with a name that
  is not a string literal, `importlib`, `operator.attrgetter`, `globals()`, `vars()`, double-underscore
  attributes such as `__dict__` or `__wrapped__`), frames (`sys._getframe`, `f_globals`), files and shells
  (`open`, `numpy.fromfile`, `os.read`, `os.system`, `!cmd`, other magics), pickles, C extensions,
  `sys.modules`, `sys.path`, and imports
  outside an allowed list (the exercise's `may_import` refimpl modules, torch, numpy, math, ...): 0 points on
  every question, since any of them can reach any function.

A kernel question's `@triton.jit` function is checked on its own (`kernel_source`): the contract's name and
parameters, a body that uses only its arguments, its own variables, `tl` and a few built-ins, and, where the
contract names tile sizes (`KernelContract.tiles`), tiles made of them only.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field

from exercises.contracts import KernelContract

ALLOWED_MODULES = {"torch", "triton", "numpy", "math", "einops", "functools", "itertools", "collections",
                   "dataclasses", "typing", "time", "random", "warnings", "matplotlib", "otter", "os", "sys"}
ALLOWED_EXTRA = {"exercises.feedback"}  # the source notebooks' test cells import the learner's check
DYNAMIC_NAMES = {"eval", "exec", "compile", "__import__", "globals", "locals", "vars", "open", "breakpoint",
                 "get_ipython", "__builtins__", "__loader__", "__spec__"}
ATTR_CALLS = {"getattr", "setattr", "delattr", "hasattr"}  # allowed only as f(obj, "literal", ...)
DUNDERS_OK = {"__init__", "__name__", "__doc__", "__version__"}
DYNAMIC_ATTRS = {"modules", "_getframe", "meta_path", "path_hooks", "settrace", "setprofile", "f_globals",
                 "f_locals", "f_back", "f_builtins", "f_code", "gi_frame", "cr_frame", "tb_frame", "system",
                 "popen", "fdopen", "fork", "forkpty", "posix_spawn", "posix_spawnp", "load", "loads",
                 "load_inline", "load_library", "cpp_extension", "user_ns", "user_global_ns", "run_cell",
                 "run_cell_magic", "run_line_magic", "system_piped", "getoutput", "safe_execfile", "attrgetter",
                 "methodcaller", "import_module", "reload", "exec_module", "open", "listdir", "scandir", "walk",
                 "chdir", "dup2"}
DYNAMIC_ATTRS |= {f"{f}{s}" for f in ("exec", "spawn") for s in ("l", "le", "lp", "lpe", "v", "ve", "vp", "vpe")}
DYNAMIC_ATTRS |= {"fromfile", "from_file", "loadtxt", "genfromtxt", "fromregex", "memmap", "open_memmap", "tofile",
                  "save", "savez", "savetxt"}  # files by name, /proc/self/fd/N included
MODULE_ATTRS = {"sys": {"path", "stdin", "stdout"}, "os": {"read", "write", "dup", "pipe", "openpty"}}  # under
# any alias, or imported by name: routes too (the sandbox's protocol pipes are file descriptors)
CODE_MAGICS = {"time", "timeit", "capture"}  # whose body (cell) or argument (line) is code, read as such
PLAIN_MAGICS = {"matplotlib"}  # whose argument is not code
KERNEL_BUILTINS = {"range", "float", "int", "min", "max", "len", "abs"}
# DYNAMIC_ATTRS that are harmless on a module: `tl.load` is Triton's load from a pointer (a notebook with a kernel
# and a plain question), allowed where the name is bound to triton.language and to nothing else in the notebook
MODULE_OK = {"triton.language": {"load"}}


@dataclass
class Findings:
    everything: list[str] = field(default_factory=list)  # reasons every question scores 0
    by_question: dict[str, list[str]] = field(default_factory=dict)  # question -> reasons it scores 0


def _transform(source: str) -> str:
    from IPython.core.inputtransformer2 import TransformerManager

    return TransformerManager().transform_cell(source)


def _literal(node) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _magic(call: ast.Call) -> tuple[str, str, list[str]] | None:
    """('line'|'cell', magic name, its string arguments) for get_ipython().run_{line,cell}_magic('x', ...)."""
    func = call.func
    if not (isinstance(func, ast.Attribute) and func.attr in ("run_line_magic", "run_cell_magic")
            and isinstance(func.value, ast.Call) and isinstance(func.value.func, ast.Name)
            and func.value.func.id == "get_ipython" and not func.value.args and not call.keywords):
        return None
    args = [_literal(a) for a in call.args]
    if not args or any(a is None for a in args):
        return None
    return func.attr.split("_")[1], args[0], args[1:]


class _Reader(ast.NodeVisitor):
    def __init__(self, where: str, allowed_refimpl: set[str], routes: dict[str, list[re.Pattern]],
                 findings: Findings):
        self.where, self.allowed_refimpl, self.routes, self.findings = where, allowed_refimpl, routes, findings
        self.modules: dict[str, str] = {}  # local name -> module it is bound to
        self.rebound: set[str] = set()  # names bound otherwise than by an import of a module (anywhere)
        self.deferred: list[tuple[str, str]] = []  # (name, finding) of MODULE_OK uses, void if name is rebound

    def _everything(self, node, what: str) -> None:
        self.findings.everything.append(f"{self.where}, line {getattr(node, 'lineno', '?')}: {what}")

    def _word(self, node, word: str) -> None:
        for question, patterns in self.routes.items():
            if any(p.search(word) for p in patterns):
                reasons = self.findings.by_question.setdefault(question, [])
                reasons.append(f"{self.where}, line {getattr(node, 'lineno', '?')}: uses `{word[:60]}`, a "
                               f"library route to what {question} asks you to write")

    def _module_allowed(self, module: str) -> bool:
        root = module.split(".")[0]
        if root == "refimpl":
            return module in self.allowed_refimpl
        return root in ALLOWED_MODULES or module in ALLOWED_EXTRA

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._word(node, alias.name)
            if not self._module_allowed(alias.name):
                self._everything(node, f"imports {alias.name}, which graded answers may not import")
            self.modules[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else \
                alias.name.split(".")[0]
            if alias.asname and alias.name not in MODULE_OK:
                self.rebound.add(alias.asname)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        for alias in node.names:
            self._word(node, alias.name)
            full = f"{module}.{alias.name}"
            if alias.name in DYNAMIC_ATTRS or alias.name in MODULE_ATTRS.get(module, ()):
                self._everything(node, f"imports {full}, which can reach any function unseen")
            if node.level or alias.name == "*" or not (self._module_allowed(module) or
                                                       self._module_allowed(full)):
                self._everything(node, f"imports {'.' * node.level}{full}, which graded answers may not import")
            self.modules[alias.asname or alias.name] = full
            if full not in MODULE_OK:
                self.rebound.add(alias.asname or alias.name)

    def _bind(self, node, name: str | None) -> None:
        if name:
            self.rebound.add(name)
        self.generic_visit(node)

    def visit_arg(self, node: ast.arg) -> None:
        self._bind(node, node.arg)

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        self._bind(node, node.name)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._bind(node, node.name)

    visit_AsyncFunctionDef = visit_ClassDef = visit_FunctionDef

    def visit_MatchAs(self, node) -> None:
        self._bind(node, node.name)

    visit_MatchStar = visit_MatchAs

    def visit_Global(self, node) -> None:
        self.rebound.update(node.names)

    visit_Nonlocal = visit_Global

    def visit_Name(self, node: ast.Name) -> None:
        self._word(node, node.id)
        if not isinstance(node.ctx, ast.Load):
            self.rebound.add(node.id)
        if node.id in DYNAMIC_NAMES or node.id in ATTR_CALLS or (node.id.startswith("__") and
                                                                 node.id not in DUNDERS_OK):
            self._everything(node, f"uses `{node.id}`, which can reach any function unseen")

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self._word(node, node.attr)
        dunder = node.attr.startswith("__") and node.attr not in DUNDERS_OK
        owner = self.modules.get(node.value.id) if isinstance(node.value, ast.Name) else None
        if node.attr in MODULE_OK.get(owner or "", ()):  # rebound later in the notebook: flagged at the end
            where = f"{self.where}, line {getattr(node, 'lineno', '?')}"
            self.deferred.append((node.value.id, f"{where}: uses `.{node.attr}`, which can reach any function unseen"))
        elif dunder or node.attr in DYNAMIC_ATTRS or node.attr in MODULE_ATTRS.get(owner or "", ()):
            self._everything(node, f"uses `.{node.attr}`, which can reach any function unseen")
        self.visit(node.value)

    def visit_Expr(self, node: ast.Expr) -> None:
        if _literal(node.value) is None:  # a docstring or a bare string runs nothing: not read
            self.visit(node.value)

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str):
            self._word(node, node.value)

    def visit_keyword(self, node: ast.keyword) -> None:
        if node.arg:
            self._word(node, node.arg)
        self.visit(node.value)

    def visit_Call(self, node: ast.Call) -> None:
        magic = _magic(node)
        if magic is not None:
            kind, name, args = magic
            if name in CODE_MAGICS:  # %%time, %%capture: the body (cell) or the argument (line) is code
                self.read(_transform(args[-1]), f"{self.where} ({'%%' if kind == 'cell' else '%'}{name})")
            elif name not in PLAIN_MAGICS:
                self._everything(node, f"runs the magic %{name}, which the grader cannot read")
            return
        if isinstance(node.func, ast.Name) and node.func.id in ATTR_CALLS:
            name = _literal(node.args[1]) if len(node.args) > 1 else None
            if name is None or (name.startswith("__") and name not in DUNDERS_OK) or name in DYNAMIC_ATTRS:
                self._everything(node, f"calls {node.func.id} with a computed or hidden name")
            for arg in node.args:
                self.visit(arg)
            return
        self.generic_visit(node)

    def read(self, code: str, where: str) -> None:
        outer = self.where
        self.where = where
        try:
            tree = ast.parse(code)
        except SyntaxError as error:  # the cell fails when run too; that costs what it costs, nothing more
            self.where = outer
            return
        self.visit(tree)
        self.where = outer


def check_cells(cells: list[str], questions, may_import: tuple[str, ...]) -> Findings:
    """Read every code cell (IPython's syntax); `questions` are the graded `Question`s."""
    findings = Findings()
    routes = {q.name: [re.compile(r, re.IGNORECASE) for r in q.routes] for q in questions if not q.triton}
    reader = _Reader("", set(may_import), routes, findings)
    for i, source in enumerate(cells):
        try:
            code = _transform(source)
        except Exception:  # IPython cannot read it: it cannot run it either
            continue
        if "get_ipython().system(" in code or "get_ipython().getoutput(" in code:
            findings.everything.append(f"code cell {i + 1}: runs a shell command (!...), which the grader cannot read")
        reader.read(code, f"code cell {i + 1}")
    findings.everything += [what for name, what in reader.deferred if name in reader.rebound]
    findings.everything = list(dict.fromkeys(findings.everything))
    return findings


# ---------------------------------------------------------------------------------------------------- kernels
class KernelRefused(ValueError):
    pass


def _kernel_def(cells: list[str], name: str) -> ast.FunctionDef:
    found = None
    for source in cells:
        try:
            tree = ast.parse(_transform(source))
        except Exception:
            continue
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name == name:
                found = node  # the last definition, as when the notebook runs
    if found is None:
        raise KernelRefused(f"no top-level `@triton.jit def {name}(...)` in the notebook")
    return found


def kernel_source(cells: list[str], contract: KernelContract, routes: tuple[str, ...]) -> str:
    """The source of the contract's kernel, decorators removed: one plain `def` the grader compiles and launches.

    Raises KernelRefused with the reason when the kernel is missing, its parameters differ from the contract,
    or its body uses anything but its arguments, its own variables, `tl` and a few built-ins (range, float,
    int, min, max, len, abs), or a library route (`tl.softmax`).
    """
    node = _kernel_def(cells, contract.kernel)
    args = node.args
    names = tuple(a.arg for a in args.args)
    if names != contract.params or args.vararg or args.kwarg or args.kwonlyargs or args.posonlyargs:
        raise KernelRefused(f"{contract.kernel} must take exactly ({', '.join(contract.params)}), as stated; "
                            f"it takes ({', '.join(names)})")
    if args.defaults or args.kw_defaults:
        raise KernelRefused(f"{contract.kernel}'s parameters take no default values")
    for a in args.args:
        constexpr = isinstance(a.annotation, ast.Attribute) and a.annotation.attr == "constexpr" and \
            isinstance(a.annotation.value, ast.Name) and a.annotation.value.id == "tl"
        if (a.arg in contract.constexprs) != constexpr or (a.annotation is not None and not constexpr):
            want = "`tl.constexpr`" if a.arg in contract.constexprs else "no annotation"
            raise KernelRefused(f"{contract.kernel}: parameter {a.arg} takes {want}, as stated")
    patterns = [re.compile(r, re.IGNORECASE) for r in routes]
    local = set(names) | {t.id for n in ast.walk(node) for t in ast.walk(n)
                          if isinstance(t, ast.Name) and isinstance(t.ctx, ast.Store)}
    for sub in ast.walk(ast.Module(body=node.body, type_ignores=[])):
        line = f"{contract.kernel}, line {getattr(sub, 'lineno', '?')}"
        if isinstance(sub, (ast.Import, ast.ImportFrom, ast.Lambda, ast.FunctionDef, ast.AsyncFunctionDef,
                            ast.ClassDef, ast.Global, ast.Nonlocal, ast.With, ast.Try, ast.Delete, ast.Yield,
                            ast.YieldFrom, ast.Await)):
            raise KernelRefused(f"{line}: a kernel body has no {type(sub).__name__.lower()}")
        word = sub.id if isinstance(sub, ast.Name) else sub.attr if isinstance(sub, ast.Attribute) else \
            _literal(sub)
        if word is None:
            continue
        if any(p.search(word) for p in patterns):
            raise KernelRefused(f"{line}: uses `{word[:60]}`, a library function that does this kernel's job")
        if isinstance(sub, ast.Attribute) and word.startswith("_"):
            raise KernelRefused(f"{line}: uses `.{word}`")
        if isinstance(sub, ast.Name) and word not in local | {"tl"} | KERNEL_BUILTINS:
            raise KernelRefused(f"{line}: uses `{word}`; a graded kernel uses only its arguments, its own "
                                f"variables, `tl` and {', '.join(sorted(KERNEL_BUILTINS))}")
    if contract.tiles:
        _check_tiles(node, contract)
    plain = ast.FunctionDef(node.name, node.args, node.body, [], None, None, type_params=[])
    return ast.unparse(ast.fix_missing_locations(plain)) + "\n"


GROWING = {"cat", "join", "interleave", "histogram"}  # tl functions that make a tensor longer than their inputs
# tl functions that take a shape, and its position (a tensor method: one less); a keyword `shape` or `block_shape`
SHAPED = {"zeros": 0, "full": 0, "broadcast_to": 1, "reshape": 1, "view": 1, "make_block_ptr": 4,
          "make_tensor_descriptor": 3}


def _check_tiles(node: ast.FunctionDef, contract: KernelContract) -> None:
    """Raise KernelRefused where the kernel builds a tile that is not made of the contract's tile sizes:
    `tl.arange` other than `tl.arange(0, T)`, a shape (SHAPED) other than a T, `x.shape` or a list of T and 1,
    or a `tl` function that concatenates (GROWING), T in `contract.tiles`. A kernel that holds a whole row of
    scores at once needs a tile of the row's length: it has none, so it must loop."""
    tiles = ", ".join(contract.tiles)
    rule = (f"a graded {contract.kernel} builds its tiles from tl.arange(0, T) and shapes of T, T in ({tiles}) "
            "(it walks the keys in a loop, BLOCK_N at a time)")

    def tile(arg) -> bool:
        return isinstance(arg, ast.Name) and arg.id in contract.tiles

    def shape(arg) -> bool:
        if isinstance(arg, (ast.List, ast.Tuple)):
            return all(tile(e) or (isinstance(e, ast.Constant) and e.value == 1) for e in arg.elts)
        return tile(arg) or (isinstance(arg, ast.Attribute) and arg.attr == "shape")

    for sub in ast.walk(node):
        if not (isinstance(sub, ast.Call) and isinstance(sub.func, ast.Attribute)):
            continue
        name, line = sub.func.attr, f"{contract.kernel}, line {sub.lineno}"
        of_tl = isinstance(sub.func.value, ast.Name) and sub.func.value.id == "tl"
        if of_tl and name in GROWING:
            raise KernelRefused(f"{line}: uses tl.{name}; {rule}")
        if of_tl and name == "arange":
            start = sub.args[0] if sub.args else None
            if len(sub.args) != 2 or sub.keywords or not isinstance(start, ast.Constant) or start.value != 0 \
                    or not tile(sub.args[1]):
                raise KernelRefused(f"{line}: {ast.unparse(sub)}; {rule}")
        if name not in SHAPED or (not of_tl and name not in ("broadcast_to", "reshape", "view")):
            continue
        at = SHAPED[name] - (0 if of_tl else 1)
        given = [k.value for k in sub.keywords if k.arg in ("shape", "block_shape")] + sub.args[at:at + 1]
        if name in ("reshape", "view") and not of_tl:  # x.reshape(A, B): the shape as separate arguments
            given = [ast.Tuple(sub.args)] if len(sub.args) > 1 else given
        for arg in given:
            if not shape(arg):
                raise KernelRefused(f"{line}: shape {ast.unparse(arg)}; {rule}")
