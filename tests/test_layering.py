"""The layering, read from the source: app/ never imports gradio, components/ never imports torch, and no app package
imports, at module level, a package above it."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
APP_FILES = sorted((ROOT / "app").rglob("*.py"))
COMPONENT_FILES = sorted((ROOT / "components").rglob("*.py"))

# Lowest first: a module may import its own layer and the ones before it at module level, never one after it.
# A function may import upwards (a lazy import is how a lower layer calls a plug-in without a loop); an import under
# `if TYPE_CHECKING:` is module level, a dependency all the same.
LAYERS = [
    # app.runs.store: the run folder's layout and status, the contract between the worker that writes a run and
    # everything that reads it, so it sits below both
    ("app.spec", "app.workspace", "app.security", "app.models", "app.presets", "app.runs.store"),
    ("app.data",),
    ("app.methods",),
    ("app.objectives",),  # an objective's extra memory terms feed the estimate
    ("app.memory",),
    ("app.training",),
    ("app.runs",),
    ("app.chat", "app.handoff"),  # handoff: what the tabs pass each other, built from everything below
]
KNOWN_UPWARD: dict[str, str] = {}  # file -> why, each a strict xfail: an exception must be argued here


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, module_level: bool) -> list[tuple[int, str]]:
    """(line, dotted name) of each import in the file; `from a import b` gives "a.b", which names a submodule or an
    attribute of a: the layer lookup below matches either by prefix."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if module_level and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if isinstance(child, ast.Import):
                found.extend((child.lineno, alias.name) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: from . import x, from ..data import y
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - child.level + 1] + ([base] if base else []))
                found.extend((child.lineno, f"{base}.{alias.name}") for alias in child.names)
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return found


def top(name: str) -> str:
    return name.partition(".")[0]


def place(name: str) -> tuple[int, str] | None:
    """(index in LAYERS, module or package) of the app module `name` belongs to; None outside app/."""
    for index, members in enumerate(LAYERS):
        for member in members:
            if name == member or name.startswith(member + "."):
                return index, member
    return None


@pytest.mark.parametrize("path", APP_FILES, ids=rel)
def test_app_never_imports_gradio(path):
    """The logic stays usable from the CLI, the worker and tests without a UI: not even a function imports gradio."""
    found = [f"line {line}: {name}" for line, name in imported(path, module_level=False) if top(name) == "gradio"]
    assert not found, f"{rel(path)} imports gradio: {found}"


@pytest.mark.parametrize("path", COMPONENT_FILES, ids=rel)
def test_components_never_import_torch(path):
    """The page is built without torch: the UI starts fast and a tab's handler never holds a model itself."""
    found = [f"line {line}: {name}" for line, name in imported(path, module_level=False) if top(name) == "torch"]
    assert not found, f"{rel(path)} imports torch: {found}"


def layered(path: Path):
    known = KNOWN_UPWARD.get(rel(path))
    return pytest.param(path, marks=pytest.mark.xfail(strict=True, reason=known)) if known else path


@pytest.mark.parametrize("path", [layered(p) for p in APP_FILES if p != ROOT / "app" / "__init__.py"], ids=rel)
def test_app_imports_only_its_own_layer_and_those_below(path):
    own = place(module_name(path))
    assert own is not None, f"{module_name(path)} is in no layer: add it to LAYERS in {rel(Path(__file__))}"
    upward = sorted({f"line {line}: {above[1]}" for line, name in imported(path, module_level=True)
                     if (above := place(name)) and above[0] > own[0]})
    assert not upward, f"{rel(path)} ({own[1]}) imports upwards at module level: {upward}"


# Run in a fresh interpreter: records the project's import lines that led to the first import of a heavy package.
FIRST_HEAVY_IMPORT = """
import sys, traceback
chain = []

class Spy:
    def find_spec(self, name, path=None, target=None):
        if name in ("torch", "transformers", "peft") and not chain:
            chain.append(f"{name}, imported through:")
            chain.extend(f"  {f.filename}:{f.lineno} {f.line}" for f in traceback.extract_stack()
                         if f.filename.startswith(sys.argv[1]) and "/.venv/" not in f.filename)
        return None

sys.meta_path.insert(0, Spy())
import components.ui
print("\\n".join(chain))
"""


# Not marked slow despite its ~5 s (a fresh interpreter importing gradio): a restructuring breaks this first.
def test_building_the_page_does_not_import_torch():
    """Also not indirectly: importing every tab must not pull torch in through app/ (a module-level import there)."""
    done = subprocess.run([sys.executable, "-c", FIRST_HEAVY_IMPORT, str(ROOT)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "", f"importing components.ui loaded torch (or a package built on it):\n{done.stdout}"
