"""The package's layering rules, checked on the source: light imports, no upward imports, `__all__` everywhere."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import icl_lab

SRC = Path(icl_lab.__file__).parent
MODULES = sorted(m.name for m in pkgutil.walk_packages(icl_lab.__path__, "icl_lab."))
FACE = {"icl_lab.plots", "icl_lab.cli", "icl_lab.report"}  # the top layer: figures, the command, HTML reports


def _in_face(module: str) -> bool:
    """Whether `module` is in the top layer (a face module or a submodule of one, e.g. icl_lab.plots.studies)."""
    return any(module == f or module.startswith(f + ".") for f in FACE)


# Below the studies (which declare their figures and report sections): the numeric and analysis modules.
LOWER = sorted(m for m in MODULES if not _in_face(m) and not m.startswith("icl_lab.studies"))
# Function-level imports are allowed only to defer an optional dependency (or a platform-only one).
OPTIONAL = {"ray", "submitit", "transformer_lens", "selenium", "wandb", "fcntl"}


def _path(module: str) -> Path:
    rel = module.removeprefix("icl_lab").lstrip(".").replace(".", "/")
    pkg = SRC / rel / "__init__.py"
    return pkg if pkg.exists() else SRC / f"{rel}.py"


def _imports(module: str) -> list[tuple[str, str, bool]]:
    """(imported module, enclosing function or '', under `if TYPE_CHECKING`) for every import in `module`."""
    tree = ast.parse(_path(module).read_text())
    out: list[tuple[str, str, bool]] = []

    def visit(node: ast.AST, func: str, typing_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            f, t = func, typing_only
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                f = func or child.name
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                t = True
            if isinstance(child, ast.Import):
                out.extend((a.name, f, t) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                names = [f"{base}.{a.name}" if base == "icl_lab" else base for a in child.names]
                out.extend((n, f, t) for n in names)
            visit(child, f, t)

    visit(tree, "", False)
    return out


@pytest.mark.parametrize("module", ["icl_lab", "icl_lab.trajectory", "icl_lab.stages", "icl_lab.convergence",
                                    "icl_lab.llc_flags", "icl_lab.config"])
def test_light_modules_load_neither_torch_nor_matplotlib(module):
    """Importing a numpy-only module must not load torch, matplotlib, the estimator, the store or the plots."""
    heavy = ["torch", "matplotlib", "safetensors", "icl_lab.llc", "icl_lab.store", "icl_lab.plots"]
    code = f"import sys, {module}; print(','.join(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"importing {module} loaded {out}"


@pytest.mark.parametrize("module", LOWER)
def test_no_numeric_or_analysis_module_imports_plots_cli_or_report(module):
    for name, func, _ in _imports(module):
        assert not _in_face(name), f"{module} imports {name} (in {func or 'the module'})"


def test_config_imports_nothing_of_icl_lab():
    assert [n for n, _, _ in _imports("icl_lab.config") if n.startswith("icl_lab")] == []


@pytest.mark.parametrize("module", MODULES)
def test_function_level_imports_only_defer_optional_dependencies(module):
    for name, func, typing_only in _imports(module):
        if not func or typing_only or name.split(".")[0] in OPTIONAL or func == "__getattr__":
            continue
        pytest.fail(f"{module}.{func} imports {name} inside a function; import it at the top of the module")


@pytest.mark.parametrize("module", MODULES)
def test_every_module_declares_all(module):
    mod = importlib.import_module(module)
    assert isinstance(getattr(mod, "__all__", None), list | tuple), f"{module} has no __all__"
    missing = [n for n in mod.__all__ if not hasattr(mod, n)]
    assert not missing, f"{module}.__all__ names {missing}, which it does not define"


def test_public_api_resolves_lazily():
    code = ("import sys, icl_lab; assert 'torch' not in sys.modules; "
            "from icl_lab import estimate_llc, essential_dynamics, Run; "
            "assert estimate_llc.__module__ == 'icl_lab.llc' and 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert len(set(icl_lab.__all__)) == len(icl_lab.__all__)
    for name in icl_lab.__all__:
        assert getattr(icl_lab, name) is not None, name
        assert name in dir(icl_lab)
    assert not set(icl_lab.__all__) & {m.split(".")[1] for m in MODULES}  # no name shadows a submodule
