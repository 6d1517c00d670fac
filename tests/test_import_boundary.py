"""Only pixtral_cpp/backend/ talks to llama.cpp: no other module imports ``llama_cpp`` or the backend's
``_native`` bindings module, at the top or inside a function (what they need is a public name of
``pixtral_cpp.backend``). Checked statically over every .py of the library, converter, tests and
benchmarks.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("pixtral_cpp", "convert", "tests", "benchmarks")
BACKEND = ROOT / "pixtral_cpp" / "backend"
FORBIDDEN = ("llama_cpp", "pixtral_cpp.backend._native")
# convert/ is installed as pixtral_cpp.convert (pyproject.toml's package-dir).
PACKAGE_OF_FOLDER = {"convert": "pixtral_cpp.convert"}


def package_of(path: Path) -> str:
    """The dotted package a module at ``path`` (relative to the repository root) belongs to."""
    parts = list(path.with_suffix("").parts[:-1] if path.name != "__init__.py" else path.parent.parts)
    if parts and parts[0] in PACKAGE_OF_FOLDER:
        parts[0:1] = PACKAGE_OF_FOLDER[parts[0]].split(".")
    return ".".join(parts)


def imported_modules(source: str, package: str) -> Iterator[tuple[int, str]]:
    """(line, dotted name) of every import in ``source``: ``from X import Y`` gives X.Y (Y may be a
    module), relative imports are resolved against ``package``, importlib/__import__ calls on a literal count."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node.module, node.level, package)
            yield from ((node.lineno, f"{base}.{alias.name}") for alias in node.names)
        elif isinstance(node, ast.Call) and _is_dynamic_import(node.func) and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                yield node.lineno, first.value


def _absolute(module: str | None, level: int, package: str) -> str:
    if level == 0:
        return module or ""
    parent = package.split(".")[: len(package.split(".")) - (level - 1)]
    return ".".join([*parent, *([module] if module else [])])


def _is_dynamic_import(func: ast.expr) -> bool:
    if isinstance(func, ast.Name):
        return func.id in {"__import__", "import_module"}
    return isinstance(func, ast.Attribute) and func.attr == "import_module"


def is_forbidden(module: str) -> bool:
    return any(module == name or module.startswith(name + ".") for name in FORBIDDEN)


def boundary_violations(source: str, path: Path) -> list[str]:
    """'path:line imports module' for each forbidden import in ``source`` (``path`` relative to the root)."""
    first_per_line = {}
    for line, module in imported_modules(source, package_of(path)):
        if is_forbidden(module):
            first_per_line.setdefault(line, module)
    return [f"{path}:{line} imports {module}" for line, module in sorted(first_per_line.items())]


def python_files() -> list[Path]:
    return sorted(p for folder in SCANNED for p in (ROOT / folder).rglob("*.py") if ".venv" not in p.parts)


def test_nothing_outside_the_backend_imports_llama_cpp():
    files = python_files()
    outside = [p for p in files if not p.is_relative_to(BACKEND)]
    violations = [v for p in outside
                  for v in boundary_violations(p.read_text(encoding="utf-8"), p.relative_to(ROOT))]
    assert violations == [], "import what you need from pixtral_cpp.backend instead:\n" + "\n".join(violations)


def test_the_scan_sees_every_face_and_the_backend_itself():
    """The check is not vacuous: it reads all four folders, and finds the backend's own llama_cpp imports."""
    files = python_files()
    assert {p.relative_to(ROOT).parts[0] for p in files} == set(SCANNED)
    assert ROOT / "tests" / "test_import_boundary.py" in files
    native = BACKEND / "_native.py"
    assert boundary_violations(native.read_text(encoding="utf-8"), native.relative_to(ROOT))
    users = [p for p in BACKEND.glob("*.py") if p != native
             and boundary_violations(p.read_text(encoding="utf-8"), p.relative_to(ROOT))]
    assert users  # text.py, vision.py, ... get the bindings from _native


@pytest.mark.parametrize(("source", "path"), [
    ("import llama_cpp\n", "tests/test_x.py"),
    ("import llama_cpp.llama_cpp as llama\n", "pixtral_cpp/model.py"),
    ("from llama_cpp.llama_chat_format import Jinja2ChatFormatter\n", "tests/test_x.py"),
    ("from llama_cpp import Llama\n", "benchmarks/bench_x.py"),
    ("def run():\n    import llama_cpp\n", "pixtral_cpp/doctor.py"),
    ("class A:\n    def f(self):\n        from pixtral_cpp.backend._native import bindings\n", "convert/writer.py"),
    ("from pixtral_cpp.backend import _native\n", "pixtral_cpp/cli/backend.py"),
    ("import pixtral_cpp.backend._native\n", "tests/test_x.py"),
    ("from ..backend._native import bindings\n", "pixtral_cpp/cli/backend.py"),
    ("from ..backend import _native\n", "pixtral_cpp/server/app.py"),
    ("from .backend._native import is_gguf\n", "pixtral_cpp/model.py"),
    ("from ..backend._native import bindings\n", "pixtral_cpp/cli/__init__.py"),
    ("import importlib\nllama = importlib.import_module('llama_cpp')\n", "tests/test_x.py"),
    ("from importlib import import_module\nimport_module('pixtral_cpp.backend._native')\n", "tests/test_x.py"),
    ("__import__('llama_cpp.mtmd_cpp')\n", "pixtral_cpp/model.py"),
    ("try:\n    import llama_cpp\nexcept ImportError:\n    pass\n", "pixtral_cpp/doctor.py"),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from llama_cpp import Llama\n", "tests/test_x.py"),
])
def test_each_way_of_importing_llama_cpp_is_caught(source, path):
    violations = boundary_violations(source, Path(path))
    assert len(violations) == 1 and violations[0].startswith(f"{path}:") and " imports " in violations[0]


@pytest.mark.parametrize(("source", "path"), [
    ("from pixtral_cpp.backend import TextModel, bindings, llama_cpp_python\n", "tests/test_x.py"),
    ("from pixtral_cpp.backend.build_info import installed_backend\n", "pixtral_cpp/cli/backend.py"),
    ("import llama_cpp_extras\nfrom pixtral_cpp.backend import native_helpers\n", "tests/test_x.py"),
    ("from .backend import TextModel\n", "pixtral_cpp/model.py"),
    ("from . import _native\n", "pixtral_cpp/cli/__init__.py"),  # pixtral_cpp.cli._native, not the backend's
    ("text = 'import llama_cpp'  # import llama_cpp\n", "tests/test_x.py"),
])
def test_public_backend_names_and_lookalikes_pass(source, path):
    assert boundary_violations(source, Path(path)) == []


@pytest.mark.parametrize(("path", "package"), [
    ("pixtral_cpp/model.py", "pixtral_cpp"),
    ("pixtral_cpp/cli/__init__.py", "pixtral_cpp.cli"),
    ("pixtral_cpp/server/app.py", "pixtral_cpp.server"),
    ("convert/writer.py", "pixtral_cpp.convert"),
    ("convert/__init__.py", "pixtral_cpp.convert"),
    ("tests/test_x.py", "tests"),
])
def test_package_of(path, package):
    assert package_of(Path(path)) == package
