"""The layers of docs/architecture.md, checked statically: faces are leaves, the backend and the converter
import nothing of the runtime above them, the synthetic oracle does not share the converter's tensor table."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_import_boundary import ROOT, imported_modules, package_of

FACES = ("pixtral_cpp.cli", "pixtral_cpp.server")
# What the backend and the converter may import from the rest of pixtral_cpp (besides themselves).
ALLOWED_BELOW = {
    "pixtral_cpp.backend": ("pixtral_cpp.errors", "pixtral_cpp.gguf_file", "pixtral_cpp.build_presets",
                            "pixtral_cpp.quiet_stderr"),
    "pixtral_cpp.convert": ("pixtral_cpp.errors", "pixtral_cpp.gguf_keys", "pixtral_cpp.formatting",
                            "pixtral_cpp.paths", "pixtral_cpp.backend.row_quantizer", "pixtral_cpp.byte_tokens"),
}


def module_name(path: Path) -> str:
    package = package_of(path)
    return package if path.name == "__init__.py" else f"{package}.{path.stem}"


def library_modules() -> dict[str, Path]:
    files = [*(ROOT / "pixtral_cpp").rglob("*.py"), *(ROOT / "convert").glob("*.py")]
    return {module_name(p.relative_to(ROOT)): p for p in files}


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def pixtral_imports(source: str, package: str) -> list[str]:
    return [m for _, m in imported_modules(source, package) if within(m, "pixtral_cpp")]


def layer_violations_in(name: str, package: str, source: str) -> list[str]:
    """What the module ``name`` of ``package`` (its text ``source``) imports across the layers."""
    problems = []
    for imported in pixtral_imports(source, package):
        face = next((f for f in FACES if within(imported, f)), None)
        if face and not within(name, face) and not within(name, "pixtral_cpp.cli"):
            problems.append(f"{name} imports the face {imported}")
        for below, allowed in ALLOWED_BELOW.items():
            if within(name, below) and not within(imported, below) and imported != "pixtral_cpp" \
                    and not any(within(imported, a) for a in allowed):
                problems.append(f"{name} imports {imported}, above {below}")
    return problems


def test_the_layers_hold():
    modules = library_modules()
    assert len(modules) > 60 and "pixtral_cpp.convert.writer" in modules and "pixtral_cpp.server.app" in modules
    problems = [v for name, path in modules.items()
                for v in layer_violations_of_file(name, path)]
    assert problems == []


def layer_violations_of_file(name: str, path: Path) -> list[str]:
    return layer_violations_in(name, package_of(path.relative_to(ROOT)), path.read_text(encoding="utf-8"))


@pytest.mark.parametrize(("module", "source"), [
    ("pixtral_cpp.model", "from pixtral_cpp.server import create_app\n"),
    ("pixtral_cpp.batch", "def f():\n    from pixtral_cpp.cli.progress import Bar\n"),
    ("pixtral_cpp.server.app", "from pixtral_cpp.cli import main\n"),
    ("pixtral_cpp.backend.text", "from pixtral_cpp.model import PixtralModel\n"),
    ("pixtral_cpp.backend.text", "from ..options import ModelOptions\n"),
    ("pixtral_cpp.convert.writer", "from pixtral_cpp.images import prepare_image\n"),
    ("pixtral_cpp.convert.plan", "from pixtral_cpp.backend.text import TextModel\n"),
])
def test_a_crossing_import_is_caught(module, source):
    assert len(layer_violations_in(module, module.rsplit(".", 1)[0], source)) == 1


@pytest.mark.parametrize(("module", "source"), [
    ("pixtral_cpp.cli.serve", "from pixtral_cpp.server import create_app\n"),
    ("pixtral_cpp.backend.text", "from .sampling import SamplingOptions\nfrom pixtral_cpp.errors import ModelError\n"),
    ("pixtral_cpp.convert.writer", "from pixtral_cpp.backend.row_quantizer import RowQuantizer\n"),
])
def test_imports_down_the_layers_pass(module, source):
    assert layer_violations_in(module, module.rsplit(".", 1)[0], source) == []


def test_the_synthetic_oracle_shares_no_table_with_the_converter():
    names = ROOT / "pixtral_cpp" / "synthetic" / "names.py"
    source = names.read_text(encoding="utf-8")
    assert not [m for m in pixtral_imports(source, "pixtral_cpp.synthetic") if within(m, "pixtral_cpp.convert")]
    for doc in (names, ROOT / "convert" / "tensor_map.py"):
        docstring = " ".join(doc.read_text(encoding="utf-8").split('"""')[1].split())
        assert "on purpose" in docstring
