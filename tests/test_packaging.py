"""The wheel must carry every subpackage, with the converter under pixtral_cpp.convert."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = {".".join(("pixtral_cpp", *p.parent.relative_to(ROOT / "pixtral_cpp").parts))
               for p in (ROOT / "pixtral_cpp").rglob("__init__.py")} | {"pixtral_cpp.convert"}
    assert listed == on_disk
    assert config["package-dir"]["pixtral_cpp.convert"] == "convert"


def test_wheel_installs_converter_as_pixtral_cpp_convert(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("pixtral_cpp-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "pixtral_cpp/convert/tensor_map.py" in names
    assert "pixtral_cpp/synthetic/weights.py" in names
    assert not any(n.startswith("convert/") for n in names), "no top-level `convert` module may be installed"
    presets = zipfile.ZipFile(wheel).read("pixtral_cpp/CMakePresets.json")
    assert presets == (ROOT / "CMakePresets.json").read_bytes()
