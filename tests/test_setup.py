"""Setup as a new user meets it: the notebooks' imports are installed by `make lab`, the Makefile's commands,
the tested versions, and a clear message where Triton cannot be installed."""

import ast
import importlib
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PROJECT_PACKAGES = {"refimpl", "dskernels", "exercises"}
NOTEBOOKS = sorted(ROOT.glob("lessons/*.ipynb")) + sorted(ROOT.glob("exercises/**/*.ipynb"))


def _requirements() -> dict[str, list[Requirement]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    groups = {"base": project["dependencies"], **project["optional-dependencies"]}
    return {name: [Requirement(r) for r in reqs] for name, reqs in groups.items()}


def _imported_modules(notebook: Path) -> set[str]:
    """Top-level names of the modules a notebook's code cells import (IPython magics and shell lines dropped)."""
    modules = set()
    for cell in json.loads(notebook.read_text())["cells"]:
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        code = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!")))
        modules |= _imports_of(code)
    return modules


def _imports_of(code: str) -> set[str]:
    """Top-level names of the modules `code` imports (relative imports left out)."""
    modules = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            modules |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            modules.add(node.module.split(".")[0])
    return modules


def test_the_notebooks_are_found():
    assert ROOT / "lessons" / "00_two_costs.ipynb" in NOTEBOOKS


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: str(p.relative_to(ROOT)))
def test_lessons_extra_installs_every_notebook_import(notebook):
    """`make lab` installs the base dependencies and the `lessons` extra: each module a notebook imports must
    come from one of them (or be the standard library or this project)."""
    requirements = _requirements()
    installed_by_lab = {canonicalize_name(r.name) for r in requirements["base"] + requirements["lessons"]}
    distributions = importlib.metadata.packages_distributions()
    for module in sorted(_imported_modules(notebook) - PROJECT_PACKAGES - set(sys.stdlib_module_names)):
        providers = {canonicalize_name(d) for d in distributions.get(module, [])}
        assert providers, f"{notebook.name} imports {module!r}, which no installed distribution provides"
        assert providers & installed_by_lab, (
            f"{notebook.name} imports {module!r} (from {sorted(providers)}), which is in neither the base "
            f"dependencies nor the 'lessons' extra of pyproject.toml")


def test_import_scan_sees_every_form_of_import(tmp_path):
    cell = {"cell_type": "code", "source": ["%matplotlib inline\n", "import numpy as np, os.path\n",
                                            "from matplotlib import pyplot\n", "from . import x\n",
                                            "!pip list\n", "def f():\n", "    import tqdm.auto\n"]}
    path = tmp_path / "n.ipynb"
    path.write_text(json.dumps({"cells": [cell, {"cell_type": "markdown", "source": ["import pandas"]}]}))
    assert _imported_modules(path) == {"numpy", "os", "matplotlib", "tqdm"}


def test_triton_is_a_linux_only_dependency():
    triton = [r for r in _requirements()["base"] if r.name == "triton"]
    assert len(triton) == 1 and triton[0].marker is not None
    assert triton[0].marker.evaluate({"platform_system": "Linux"})
    assert not triton[0].marker.evaluate({"platform_system": "Darwin"})
    assert not triton[0].marker.evaluate({"platform_system": "Windows"})


def test_importing_kernels_without_triton_says_so_in_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # what an absent package looks like to `import`
    monkeypatch.delitem(sys.modules, "dskernels", raising=False)
    with pytest.raises(ImportError, match=r"^dskernels needs Triton, which has wheels for Linux only") as error:
        importlib.import_module("dskernels")
    assert "\n" not in str(error.value)


def test_constraints_pin_the_packages_the_course_depends_on():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.split("#")[0].strip():
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", line
            pins[canonicalize_name(requirement.name)] = spec.version
    assert {"torch", "triton", "transformers", "kernels", "nbval", "jupyterlab", "matplotlib"} <= set(pins)
    # CI runs the newest transformers, which brings Hugging Face's `kernels` (issue 17: the course's are dskernels)
    assert Version(pins["transformers"]) >= Version("5.25"), pins["transformers"]
    assert f"TORCH_SPEC ?= torch=={pins['torch']}" in (ROOT / "Makefile").read_text()  # one tested torch
    for requirement in (r for group in _requirements().values() for r in group):  # pyproject's bounds hold them
        pin = pins.get(canonicalize_name(requirement.name))
        assert pin is None or requirement.specifier.contains(pin, prereleases=True), (requirement, pin)


@pytest.fixture(scope="module")
def make():
    path = shutil.which("make")
    if path is None:
        pytest.skip("make is not installed")
    return path


def _dry_run(make, *args) -> str:
    """What `make` would run, without running it (-n), for a venv that does not exist yet."""
    result = subprocess.run([make, "-n", "-C", str(ROOT), "VENV=/nonexistent/venv", *args], capture_output=True,
                            text=True, timeout=60, check=True)
    return result.stdout


def test_make_passes_the_torch_index_to_the_torch_install_only(make):
    commands = _dry_run(make, "lab", "TORCH_INDEX=https://download.pytorch.org/whl/cpu").splitlines()
    (torch_line,) = [c for c in commands if '"torch==' in c]
    (course_line,) = [c for c in commands if "-e " in c]
    assert "-c constraints.txt --index-url https://download.pytorch.org/whl/cpu \"torch==2.13.0\"" in torch_line
    assert "-c constraints.txt" in course_line and "--index-url" not in course_line
    assert '-e ".[lessons]"' in course_line
    default = _dry_run(make, "lab")
    assert "--index-url" not in default and "-c constraints.txt" in default
    assert "-c " not in _dry_run(make, "lab", "CONSTRAINTS=")


def test_make_train_and_help(make):
    assert re.search(r"/nonexistent/venv/bin/python -m refimpl\.train --steps 5$",
                     _dry_run(make, "train", "TRAIN_ARGS=--steps 5"), re.M)
    shown = subprocess.run([make, "-s", "-C", str(ROOT), "help"], capture_output=True, text=True, timeout=60,
                           check=True).stdout
    for word in ("make lab", "make test", "make train", "make clean-venv", "TORCH_SPEC", "TORCH_INDEX",
                 "CONSTRAINTS", "TRAIN_ARGS", "LAB_PORT", "PYTHON", "VENV"):
        assert word in shown


@pytest.mark.parametrize("layer, forbidden", [("refimpl", {"dskernels", "lessons", "exercises", "tests"}),
                                              ("dskernels", {"lessons", "exercises", "tests"})])
def test_layers_import_only_the_layers_above(layer, forbidden):
    """docs/design.md: refimpl <- kernels <- lessons, exercises; never the other way."""
    for path in sorted((ROOT / layer).rglob("*.py")):
        wrong = _imports_of(path.read_text()) & forbidden
        assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: str(p.relative_to(ROOT)))
def test_notebooks_never_import_tests(notebook):
    assert "tests" not in _imported_modules(notebook)


SIDE_BY_SIDE = """
import importlib.metadata, json
from transformers import DeepseekV3ForCausalLM  # transformers >= 5.25 imports Hugging Face's `kernels`
import dskernels
try:
    import kernels
except ImportError:
    kernels = None
print(json.dumps({
    "transformers": importlib.metadata.version("transformers"),
    "model": DeepseekV3ForCausalLM.__module__,
    "dskernels": dskernels.__file__,
    "kernels": kernels and kernels.__file__,
    "kernels_distributions": importlib.metadata.packages_distributions().get("kernels"),
}))
"""


@pytest.mark.parametrize("where", ["", "lessons"], ids=["repository root", "lessons/"])
def test_the_course_and_hugging_face_kernels_import_side_by_side(where):
    """From 5.25, transformers depends on Hugging Face's `kernels` (PyPI); the course's kernels are `dskernels`.
    From the repository root (tests, scripts) and from lessons/ (the notebooks), in a fresh interpreter:
    transformers' DeepSeek-V3 imports, `import dskernels` is this repository's and `import kernels` is Hugging
    Face's, not a folder of this repository (a `kernels/` here would shadow it, as before issue 17)."""
    result = subprocess.run([sys.executable, "-c", SIDE_BY_SIDE], cwd=ROOT / where, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["model"].startswith("transformers.models.deepseek_v3"), found
    assert Path(found["dskernels"]).resolve() == ROOT / "dskernels" / "__init__.py", found
    if found["kernels"] is None:
        assert Version(found["transformers"]) < Version("5.25"), (
            f"transformers {found['transformers']} depends on Hugging Face's kernels, which is not installed")
        pytest.skip(f"Hugging Face's kernels is not installed (transformers {found['transformers']}, before 5.25)")
    kernels_file = Path(found["kernels"]).resolve()  # installed (the venv may live inside the checkout: make)
    assert "site-packages" in kernels_file.parts and ROOT / "kernels" not in kernels_file.parents, \
        f"`import kernels` found this repository's {found}"
    assert found["kernels_distributions"] == ["kernels"], found  # the module comes from PyPI's `kernels`

