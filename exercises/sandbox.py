"""The sandbox a submission runs in: what it can see (a runtime folder), how it is isolated, its limits.

What the submission's process sees (`build_runtime`): the Python interpreter and its packages (torch, triton,
IPython), and one runtime folder holding the grader's side of the conversation (`exercises/_child.py`, `wire.py`,
`contracts.py`, `budget.py`) and a scaffold `refimpl`: the modules the exercise may import (and the refimpl modules
they import), with every definition the graded questions' `forbidden` lists name deleted (and deleted from the
`from refimpl.x import ...` lines that named it; a method is replaced by one that raises NotImplementedError
saying that it is what the exercise asks for). No `dskernels`, no source notebooks, no tests, no seed, no other
submission: the checkout itself is not there.

Isolation, the best available (`detect`):
1. Debian's `bubblewrap` (`bwrap`), where installed and working: an empty root with the interpreter's folders and
   the runtime folder read-only, a private /tmp, new PID, network, IPC and UTS namespaces (no network; every
   process dies with the sandbox); as root, the process then runs as uid `nobody` (`setpriv`).
2. As root without bubblewrap: new mount, network and PID namespaces (`unshare`), the checkout, the submissions
   and output folders and every temp folder covered by empty tmpfs mounts, uid `nobody`.
3. As root where neither works (a container that forbids namespaces, as Docker does by default): uid `nobody`
   (`setpriv`) with the limits of 4. The submission can read what any user may read (a checkout open to all
   included) and use the network, but no file closed to others (Gradescope's `run_autograder` closes
   /autograder: exercises.gradescope).
4. Otherwise (not root, no working bubblewrap): time, memory, file-size and core limits, a private HOME and
   TMPDIR, its own process group only. The submission could then read files the grader's user can read (the
   source notebooks, other submissions, the grader's command line with the seed) and use the network; the
   verdicts still come from the grader's process (values compared there, the static check, the kernel compile).
Always: a memory (address space), file-size and core limit (`prlimit`), its own session and process group,
killed whole when done, and wall-clock limits per cell and call (exercises.protocol).
"""

from __future__ import annotations

import ast
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from exercises import wire

REPO_ROOT = Path(__file__).resolve().parent.parent
NOBODY = 65534
FILE_SIZE = 256 << 20  # bytes, the largest file the submission may write
PROCESSES = 1024  # processes and threads of uid nobody (as root)
TEMP_DIRS = ("/tmp", "/dev/shm", "/var/tmp")  # private and empty in the sandbox
MAX_REFERENCE_CALLS = 256  # calls of an earlier question's function (answered by the grader) per graded call
RUNTIME_FILES = ("_child.py", "wire.py", "contracts.py", "budget.py")  # the grader's code that runs inside
SETPRIV = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--no-new-privs",
           "--inh-caps=-all", "--bounding-set=-all"]


# ---------------------------------------------------------------------------------------------------- runtime
def _refimpl_imports(tree: ast.Module) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("refimpl"):
            found.add(node.module)
            found.update(f"refimpl.{a.name}" for a in node.names if node.module == "refimpl")
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("refimpl."))
    return found


def closure(modules: tuple[str, ...]) -> dict[str, ast.Module]:
    """The refimpl modules listed and every refimpl module they import, parsed."""
    trees, todo = {}, list(modules)
    while todo:
        name = todo.pop()
        path = REPO_ROOT / (name.replace(".", "/") + ".py")
        if name in trees or not path.is_file():
            continue
        trees[name] = ast.parse(path.read_text())
        todo.extend(_refimpl_imports(trees[name]))
    return trees


def _missing(dotted: str, name: str) -> ast.FunctionDef:
    """A method `name` that raises NotImplementedError saying that `dotted` is what the exercise asks for."""
    message = (f"{dotted} is not available when grading: it is what the exercise asks you to write (an answer "
               "that calls it earns no points)")
    return ast.parse(f"def {name}(self, *args, **kwargs):\n    raise NotImplementedError({message!r})").body[0]


def _strip(tree: ast.Module, module: str, removed: set[str]) -> ast.Module:
    """Delete the definitions `removed` names ("refimpl.moe.update_bias", "refimpl.moe.Router.forward") from the
    module (a method: replaced by one that raises NotImplementedError saying so), and the names they had from
    `from refimpl.x import ...` lines."""
    def keep(node, owner: str) -> bool:
        named = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        return not (named and f"{owner}.{node.name}" in removed)

    tree.body = [n for n in tree.body if keep(n, module)]
    for node in tree.body:
        if isinstance(node, ast.ClassDef):  # a method becomes one that says why it is missing: without it,
            # torch's message for a module without `forward` would not
            owner = f"{module}.{node.name}"
            node.body = [n if keep(n, owner) else _missing(f"{owner}.{n.name}", n.name) for n in node.body]
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("refimpl"):
            node.names = [a for a in node.names if f"{node.module}.{a.name}" not in removed]
    tree.body = [n for n in tree.body if not (isinstance(n, ast.ImportFrom) and not n.names)]
    return tree


def build_runtime(folder: Path, may_import: tuple[str, ...], removed: set[str]) -> Path:
    """Write the sandbox's runtime folder (see the module docstring) into `folder`; return it."""
    package = folder / "exercises"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for name in RUNTIME_FILES:
        shutil.copyfile(Path(__file__).parent / name, package / name)
    trees = closure(may_import)
    if trees:
        (folder / "refimpl").mkdir()
        (folder / "refimpl/__init__.py").write_text('"""refimpl, the scaffold a graded submission sees."""\n')
    for name, tree in trees.items():
        code = ast.unparse(ast.fix_missing_locations(_strip(tree, name, removed)))
        (folder / (name.replace(".", "/") + ".py")).write_text(code + "\n")
    if "refimpl.config" in trees:
        shutil.copytree(REPO_ROOT / "refimpl/known_configs", folder / "refimpl/known_configs")
    for path in [folder, *folder.rglob("*")]:  # readable by uid nobody, writable by no one
        path.chmod(0o555 if path.is_dir() else 0o444)
    return folder


# ---------------------------------------------------------------------------------------------------- isolation
def _python_paths() -> list[Path]:
    """What the sandboxed Python must read: the interpreter, the venv, import paths outside the checkout, and
    installed packages wherever they are (a venv inside the checkout, as `make` makes it, seen through another
    interpreter's .pth: the uid-nobody test)."""
    paths = {Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve()}
    for entry in sys.path:
        path = Path(entry).resolve() if entry else None
        source = (path is not None and path.is_relative_to(REPO_ROOT)
                  and not path.is_relative_to(Path(sys.prefix).resolve()) and "site-packages" not in path.parts)
        if path and path.is_dir() and not source:
            paths.add(path)
    paths = {p for p in paths if str(p) not in ("/",) + TEMP_DIRS and not REPO_ROOT.is_relative_to(p)}
    return sorted(p for p in paths if not any(p != q and p.is_relative_to(q) for q in paths))


def _hidden_ancestor(path: Path) -> Path | None:
    """The outermost directory above `path` that other users cannot enter (e.g. /root), if any."""
    for parent in reversed(path.parents):
        if parent != Path("/") and not os.stat(parent).st_mode & 0o001:
            return parent
    return None


@dataclass(frozen=True)
class Isolation:
    kind: str  # "bubblewrap", "namespaces", "user" or "limits"
    description: str  # one line for the instructor and each results.json

    def command(self, runtime: Path, hide: tuple[Path, ...]) -> list[str]:
        """The command prefix that starts a process in this sandbox, seeing `runtime` and not `hide`."""
        if self.kind == "bubblewrap":
            return _bwrap(runtime)
        if self.kind == "user":
            return list(SETPRIV)
        if self.kind == "namespaces":
            return ["unshare", "--mount", "--net", "--pid", "--fork", "--kill-child", "--mount-proc",
                    "--propagation", "private", "/bin/sh", "-c", _namespace_script(runtime, hide), "sh"]
        return []


def _bwrap(runtime: Path) -> list[str]:
    command = ["bwrap", "--die-with-parent", "--new-session", "--unshare-pid", "--unshare-net", "--unshare-ipc",
               "--unshare-uts", "--unshare-cgroup-try"]
    command += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--size", str(512 << 20), "--tmpfs",
                "/tmp", "--perms", "0777", "--dir", "/tmp/home", "--perms", "0777", "--dir", "/tmp/work"]
    for top in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/etc"):
        if os.path.islink(top):
            command += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            command += ["--ro-bind", top, top]
    made: set[Path] = set()
    for path in _python_paths() + [runtime]:  # after the tmpfs on /tmp: a checkout under /tmp stays visible
        for parent in reversed(path.parents):  # folders bwrap makes itself would be closed to nobody (0700)
            if str(parent) not in ("/", "/tmp") and parent not in made:
                command += ["--perms", "0755", "--dir", str(parent)]
                made.add(parent)
        command += ["--ro-bind", str(path), str(path)]
    command += ["--chdir", "/tmp/work", "--"]
    return command + (SETPRIV if os.geteuid() == 0 else [])


def _namespace_script(runtime: Path, hide: tuple[Path, ...]) -> str:
    """Shell run as root in new namespaces: empty tmpfs over the temp folders, the checkout, `hide` and folders
    other users cannot enter; the interpreter's folders and the runtime bound back (aside first, as they may lie
    under a covered folder); then uid nobody."""
    covered = [Path(d) for d in TEMP_DIRS] + [REPO_ROOT] + [Path(h).resolve() for h in hide]
    covered = [d for d in covered if d.is_dir()]
    keep = _python_paths() + [runtime.resolve()]
    covered += sorted({a for p in keep if (a := _hidden_ancestor(p)) is not None})
    lines = ["set -e", "mkdir -p /mnt", "mount -t tmpfs -o mode=700 tmpfs /mnt"]  # root-only holding place
    lines += [f"mkdir -p /mnt/keep/{i} && mount --bind '{p}' /mnt/keep/{i}" for i, p in enumerate(keep)]
    covered = [d for d in dict.fromkeys(covered) if not any(d != c and d.is_relative_to(c) for c in covered)]
    for d in covered:  # a folder inside a covered one is gone already
        size = "512m" if str(d) == "/tmp" else "16m"
        lines.append(f"mount -t tmpfs -o size={size},mode={'1777' if str(d) in TEMP_DIRS else '755'} tmpfs '{d}'")
    lines += [f"mkdir -p '{p}' && mount --bind -o ro /mnt/keep/{i} '{p}' 2>/dev/null || "
              f"mount --bind /mnt/keep/{i} '{p}'" for i, p in enumerate(keep)]
    lines += [f"mkdir -p /tmp/home /tmp/work && chown {NOBODY}:{NOBODY} /tmp/home /tmp/work", "cd /tmp/work",
              "exec " + " ".join(SETPRIV) + ' "$@"']
    return "\n".join(lines)


def _probe(isolation: Isolation) -> str | None:
    """None when a process starts in this isolation; else the reason."""
    with tempfile.TemporaryDirectory(prefix="grade-probe-") as tmp:
        runtime = Path(tmp, "runtime")
        runtime.mkdir()
        os.chmod(tmp, 0o755)
        runtime.chmod(0o755)
        try:
            done = subprocess.run(isolation.command(runtime, ()) + [sys.executable, "-c", "pass"],
                                  capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as error:
            return str(error)
    return None if done.returncode == 0 else (done.stderr.strip().splitlines() or ["failed"])[-1][:200]


def detect() -> Isolation:
    """The best isolation this machine allows (see the module docstring), probed once."""
    root = sys.platform == "linux" and os.geteuid() == 0
    reasons = []
    if sys.platform == "linux" and shutil.which("bwrap"):
        bwrap = Isolation("bubblewrap", "isolation: bubblewrap (empty root with the interpreter read-only, "
                          "private /tmp, no network, own PID namespace" + (", uid nobody" if root else "") +
                          "; time, memory and file limits)")
        problem = _probe(bwrap)
        if problem is None:
            return bwrap
        reasons.append(f"bubblewrap failed: {problem}")
    else:
        reasons.append("no bubblewrap (apt-get install bubblewrap)")
    if root and shutil.which("unshare") and shutil.which("setpriv"):
        spaces = Isolation("namespaces", f"isolation: namespaces ({reasons[0]}): mount, network and PID "
                           "namespaces, the checkout and temp folders hidden, uid nobody; time, memory and "
                           "file limits")
        problem = _probe(spaces)
        if problem is None:
            return spaces
        reasons.append(f"unshare failed: {problem}")
    if root and shutil.which("setpriv"):
        user = Isolation("user", f"isolation: uid nobody ({'; '.join(reasons)}): the submission reads what any "
                         "user may read and can use the network; time, memory and file limits")
        problem = _probe(user)
        if problem is None:
            return user
        reasons.append(f"setpriv failed: {problem}")
    return Isolation("limits", f"isolation: limits only ({'; '.join(reasons)}; "
                     f"{'root' if root else 'not root'}): time, memory and file limits, own process group and "
                     "temp folder; the submission can read what this user can read and use the network")


# ---------------------------------------------------------------------------------------------------- process
def _prlimit(memory_mb: int) -> list[str]:
    nproc = [f"--nproc={PROCESSES}"] if os.geteuid() == 0 else []  # per uid: only for uid nobody
    return ["prlimit", f"--as={memory_mb << 20}", f"--fsize={FILE_SIZE}", "--core=0", *nproc, "--"]


def _set_limits(memory_mb: int) -> None:
    """Where `prlimit` is missing (macOS): the same limits from Python; one the system refuses is skipped."""
    for kind, value in ((resource.RLIMIT_AS, memory_mb << 20), (resource.RLIMIT_FSIZE, FILE_SIZE),
                        (resource.RLIMIT_CORE, 0)):
        try:
            resource.setrlimit(kind, (value, value))
        except (ValueError, OSError):
            pass


class Sandbox:
    """One sandboxed process: started with its first message, asked to call functions, killed whole."""

    def __init__(self, isolation: Isolation, runtime: Path, hide: tuple[Path, ...], memory_mb: int, init: dict,
                 startup_timeout: float):
        self.tmp = tempfile.mkdtemp(prefix="grade-")
        os.chmod(self.tmp, 0o755)
        isolated = isolation.kind not in ("limits", "user")  # else HOME and TMPDIR are self.tmp
        if isolation.kind == "user":
            os.chown(self.tmp, NOBODY, NOBODY)
        home = "/tmp/home" if isolated else self.tmp
        env = {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": "/tmp/work" if isolated else self.tmp,
               "PYTHONPATH": str(runtime), "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0",
               "PYTHONNOUSERSITE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TRITON_INTERPRET": "1",
               "MPLCONFIGDIR": f"{home}/.mpl", "TRITON_CACHE_DIR": f"{home}/.triton",
               "IPYTHONDIR": f"{home}/.ipython", "MPLBACKEND": "agg", "LANG": "C.UTF-8"}
        command = isolation.command(runtime, hide) + [sys.executable, "-m", "exercises._child"]
        preexec = None
        if shutil.which("prlimit"):  # a command, not preexec_fn, which is unsafe with the grader's threads
            command = _prlimit(memory_mb) + command
        else:
            preexec = lambda: _set_limits(memory_mb)  # noqa: E731
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, env=env, cwd=self.tmp, start_new_session=True,
                                        preexec_fn=preexec)
        self.stderr_tail: deque[bytes] = deque(maxlen=16)
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        self.out, self.into = self.process.stdout.fileno(), self.process.stdin.fileno()
        os.set_blocking(self.into, False)  # a process that stops reading cannot block the grader
        try:
            wire.write(self.into, init, deadline=time.monotonic() + startup_timeout)
        except (OSError, wire.Timeout):
            self.kill()
            raise

    def _drain_stderr(self) -> None:
        """Keep the last bytes of the submission's stderr (it may print hundreds of MB)."""
        for chunk in iter(lambda: self.process.stderr.read(1 << 16), b""):
            self.stderr_tail.append(chunk)

    def last_error_line(self) -> str:
        lines = b"".join(self.stderr_tail).decode(errors="replace").strip().splitlines()
        return lines[-1][:200] if lines else ""

    def read(self, timeout: float):
        return wire.read(self.out, deadline=time.monotonic() + timeout)

    def call(self, name: str, args: tuple, mutated: tuple[int, ...], timeout: float, memory_mb: int | None = None,
             reference=None):
        """Send one call and return the reply; while the call runs, each request of a stand-in for an earlier
        question (exercises._child) is answered with `reference(request)` (at most MAX_REFERENCE_CALLS)."""
        deadline = time.monotonic() + timeout
        wire.write(self.into, {"name": name, "args": wire.dumps(args), "mutated": mutated, "memory_mb": memory_mb},
                   deadline=deadline)
        for _ in range(MAX_REFERENCE_CALLS + 1):
            reply = wire.read(self.out, deadline=deadline)
            if not (isinstance(reply, dict) and reply.get("event") == "reference"):
                return reply
            answer = reference(reply) if reference is not None else {"error": "is not available here"}
            wire.write(self.into, answer, deadline=deadline)
        raise wire.BadMessage(f"over {MAX_REFERENCE_CALLS} calls to an earlier question's function in one call")

    def kill(self) -> None:
        """Kill the process group (and with it the PID namespace, where there is one)."""
        try:
            os.killpg(self.process.pid, 9)
        except ProcessLookupError:
            pass
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)
