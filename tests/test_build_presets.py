"""Backend presets: CMakePresets.json → CMAKE_ARGS, toolchain refusals, the reinstall command, and
`pixtral-cpp backend info` on the installed (CPU) llama.cpp."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from click.testing import CliRunner

from pixtral_cpp.backend import cpu_features
from pixtral_cpp.build_presets import (
    NATIVE_ONLY_CPU_FEATURES,
    InstallCommand,
    InstallError,
    PresetError,
    ToolchainError,
    check_toolchain,
    get_preset,
    install_command,
    load_presets,
    match_preset,
    parse_define,
    pinned_llama_requirement,
    presets_path,
    run_install,
    toolchain_problems,
    with_overrides,
)
from pixtral_cpp.cli.backend import backend

ROOT = Path(__file__).resolve().parent.parent
PIN = "llama-cpp-python==0.3.36"
PORTABLE = ("-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON "
            "-DGGML_BMI2=ON -DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF "
            "-DGGML_AMX_BF16=OFF")
EXPECTED_CMAKE_ARGS = {
    "cpu": PORTABLE,
    "cpu-native": "-DGGML_NATIVE=ON",
    "metal": "-DGGML_METAL=ON -DGGML_METAL_EMBED_LIBRARY=ON",
    "cuda": PORTABLE + " -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=native",
    "vulkan": PORTABLE + " -DGGML_VULKAN=ON",
}
PIP = "-m pip install -v --force-reinstall --no-deps --no-cache-dir --no-binary llama-cpp-python " + PIN


def invoke(*args: str):
    return CliRunner().invoke(backend, list(args))


@pytest.fixture
def toolchain_bin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An empty folder as the whole PATH; ``add(name)`` puts a stand-in executable into it."""
    folder = tmp_path / "bin"
    folder.mkdir()
    monkeypatch.setenv("PATH", str(folder))
    for variable in ("CC", "CXX", "CUDACXX", "VULKAN_SDK"):
        monkeypatch.delenv(variable, raising=False)

    def add(*names: str) -> None:
        for name in names:
            (folder / name).write_text("#!/bin/sh\nexit 0\n")
            (folder / name).chmod(0o755)

    return add


# --- CMakePresets.json --------------------------------------------------------------------------------


def test_presets_file_is_the_top_level_one():
    assert presets_path().resolve() == ROOT / "CMakePresets.json"  # the package's copy is a symlink to it
    assert list(load_presets()) == ["cpu", "cpu-native", "metal", "cuda", "vulkan"]  # hidden base left out


@pytest.mark.parametrize("name", list(EXPECTED_CMAKE_ARGS))
def test_each_preset_maps_to_its_cmake_args(name):
    assert " ".join(get_preset(name).cmake_args()) == EXPECTED_CMAKE_ARGS[name]


def test_no_preset_that_builds_for_x86_without_native_enables_amx():
    # llama.cpp's AMX matmul segfaults on the first decode (ggml-org/llama.cpp#20824).
    for preset in load_presets().values():
        if not preset.enables("GGML_NATIVE") and preset.value("GGML_AVX2") is not None:
            assert all(preset.value(v) == "OFF" for v in ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16"))


def test_cmake_accepts_the_presets_file():
    assert shutil.which("cmake"), "cmake is needed to check the presets file (and to build llama.cpp)"
    listed = subprocess.run(["cmake", "--list-presets"], cwd=ROOT, capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    for name in ("cpu", "cpu-native", "cuda", "vulkan"):
        assert f'"{name}"' in listed.stdout
    assert '"portable-cpu"' not in listed.stdout  # hidden
    assert ('"metal"' in listed.stdout) == (sys.platform == "darwin")  # its condition: macOS only


def test_inheritance_follows_cmake_rules(tmp_path):
    path = tmp_path / "CMakePresets.json"
    path.write_text(json.dumps({"version": 3, "configurePresets": [
        {"name": "a", "hidden": True, "cacheVariables": {"X": "a", "Y": "a", "Z": "a"}},
        {"name": "b", "hidden": True, "cacheVariables": {"X": "b", "W": True}},
        {"name": "c", "inherits": ["b", "a"],  # earlier parents win, the preset's own values win over both
         "cacheVariables": {"Y": {"type": "STRING", "value": "c"}, "Z": None}},
    ]}))
    (preset,) = load_presets(path).values()
    assert preset.cmake_args() == ("-DX=b", "-DY:STRING=c", "-DW:BOOL=TRUE")
    assert preset.enables("W") and not preset.enables("X")


def test_inheritance_cycles_and_unknown_parents_are_errors(tmp_path):
    path = tmp_path / "CMakePresets.json"
    path.write_text(json.dumps({"version": 3, "configurePresets": [
        {"name": "a", "inherits": "b"}, {"name": "b", "inherits": "a"}]}))
    with pytest.raises(PresetError, match="cycle: a -> b -> a"):
        load_presets(path)
    path.write_text(json.dumps({"version": 3, "configurePresets": [{"name": "a", "inherits": "nope"}]}))
    with pytest.raises(PresetError, match="'a' inherits unknown preset 'nope'"):
        load_presets(path)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(PresetError) as caught:
        get_preset("rocm")
    assert str(caught.value) == ("unknown backend preset 'rocm'; "
                                 "known presets: cpu, cpu-native, metal, cuda, vulkan")


def test_defines_override_or_extend_a_preset():
    preset = with_overrides(get_preset("cuda"), [parse_define("CMAKE_CUDA_ARCHITECTURES=86-real;89-real"),
                                                 parse_define("-DGGML_CUDA_FA_ALL_QUANTS:BOOL=ON")])
    assert preset.cmake_args()[-3:] == ("-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=86-real;89-real",
                                        "-DGGML_CUDA_FA_ALL_QUANTS:BOOL=ON")
    with pytest.raises(PresetError, match="not NAME=VALUE"):
        parse_define("86-real")


# --- The reinstall command ----------------------------------------------------------------------------


def test_pin_comes_from_pyproject():
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert PIN in dependencies
    assert pinned_llama_requirement() == PIN


@pytest.mark.parametrize("name", ["cpu", "cuda"])
def test_print_shows_the_exact_command(name, toolchain_bin):
    toolchain_bin("cc", "c++", "nvcc")
    result = invoke("install", name, "--print")
    assert result.exit_code == 0, result.output
    expected = f"CMAKE_ARGS='{EXPECTED_CMAKE_ARGS[name]}' {shlex.quote(sys.executable)} {PIP}\n"
    assert result.stdout == expected
    assert result.stderr == ""


def test_print_works_where_the_toolchain_is_missing_and_says_what_is(toolchain_bin):
    result = invoke("install", "metal", "--print")
    assert result.exit_code == 0, result.output
    expected = f"CMAKE_ARGS='{EXPECTED_CMAKE_ARGS['metal']}' {shlex.quote(sys.executable)} {PIP}\n"
    assert result.stdout == expected
    assert "note: the metal preset builds for Apple's Metal GPUs and needs macOS" in result.stderr


def test_cmake_args_survive_the_shell_and_scikit_build_cores_split():
    # scikit-build-core reads CMAKE_ARGS with shlex.split; a value with ';' must come back whole.
    preset = with_overrides(get_preset("cuda"), [parse_define("CMAKE_CUDA_ARCHITECTURES=86-real;89-real")])
    line = install_command(preset, python="true").shell_line().split(" true ")[0]
    printed = subprocess.run(["sh", "-c", f'{line} sh -c \'printf %s "$CMAKE_ARGS"\''],
                             capture_output=True, text=True, check=True).stdout
    assert tuple(shlex.split(printed)) == preset.cmake_args()


def test_run_install_passes_cmake_args_and_reports_failure():
    script = "import os, sys; sys.exit(0 if os.environ['CMAKE_ARGS'] == '-DGGML_NATIVE=ON' else 5)"
    run_install(InstallCommand((sys.executable, "-c", script), {"CMAKE_ARGS": "-DGGML_NATIVE=ON"}))
    with pytest.raises(InstallError, match="pip exited with status 5"):
        run_install(InstallCommand((sys.executable, "-c", script), {"CMAKE_ARGS": "-DGGML_CUDA=ON"}))


# --- Toolchain refusals -------------------------------------------------------------------------------


def test_cuda_without_nvcc_is_refused_with_the_fix(toolchain_bin):
    toolchain_bin("cc", "c++")
    with pytest.raises(ToolchainError) as caught:
        check_toolchain(get_preset("cuda"), system="Linux")
    message = str(caught.value)
    assert message.startswith("cannot build the cuda preset here: the cuda preset needs nvcc")
    assert "install the CUDA toolkit" in message and "export PATH=/usr/local/cuda/bin:$PATH" in message


def test_cuda_with_nvcc_or_cudacxx_passes(toolchain_bin, monkeypatch, tmp_path):
    toolchain_bin("cc", "c++")
    nvcc = tmp_path / "cuda" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text("")
    monkeypatch.setenv("CUDACXX", str(nvcc))
    assert toolchain_problems(get_preset("cuda"), system="Linux") == ()
    monkeypatch.setenv("CUDACXX", str(tmp_path / "missing"))
    assert toolchain_problems(get_preset("cuda"), system="Linux") == (
        f"$CUDACXX points to {tmp_path / 'missing'}, which does not exist",)


@pytest.mark.parametrize("system", ["Linux", "Windows"])
def test_metal_off_macos_is_refused(system, toolchain_bin):
    toolchain_bin("cc", "c++")
    with pytest.raises(ToolchainError, match=f"needs macOS, not {system}; for NVIDIA GPUs use the cuda"):
        check_toolchain(get_preset("metal"), system=system)


def test_metal_on_macos_passes(toolchain_bin):
    toolchain_bin("cc", "c++")
    assert toolchain_problems(get_preset("metal"), system="Darwin") == ()


def test_vulkan_without_glslc_is_refused_with_the_fix(toolchain_bin, monkeypatch):
    toolchain_bin("cc", "c++")
    monkeypatch.setenv("VULKAN_SDK", "/opt/vulkan")  # headers found: only glslc is missing
    with pytest.raises(ToolchainError) as caught:
        check_toolchain(get_preset("vulkan"), system="Linux")
    assert str(caught.value) == (
        "cannot build the vulkan preset here: the vulkan preset needs glslc, the Vulkan shader compiler, and "
        "it is not on PATH: install the Vulkan SDK (https://vulkan.lunarg.com/sdk/home) or, "
        "on Debian/Ubuntu, sudo apt install libvulkan-dev glslc")


def test_missing_compiler_is_refused_for_every_preset(toolchain_bin):
    problems = toolchain_problems(get_preset("cpu"), system="Linux")
    assert problems == ("no C or C++ compiler on PATH (nor $CC/$CXX): install one, e.g. sudo apt install "
                        "build-essential (Debian/Ubuntu) or sudo dnf install gcc-c++ (Fedora)",)
    assert "xcode-select --install" in toolchain_problems(get_preset("cpu"), system="Darwin")[0]
    assert toolchain_problems(get_preset("cpu"), system="Windows") == ()  # CMake finds Visual Studio itself


def test_install_refuses_before_running_pip(toolchain_bin):
    result = invoke("install", "cuda")
    assert result.exit_code == 1
    assert isinstance(result.exception, ToolchainError)
    assert "nvcc" in str(result.exception) and "no C or C++ compiler" in str(result.exception)


# --- What the installed build can do ------------------------------------------------------------------


@pytest.mark.parametrize(("registries", "features", "expected"), [
    (("CUDA", "CPU"), {}, "cuda"),
    (("MTL", "BLAS", "CPU"), {"DOTPROD": "1"}, "metal"),
    (("Vulkan", "CPU"), {"AMX_INT8": "1"}, "vulkan"),
    (("CPU",), {"AVX2": "1", "AMX_INT8": "1"}, "cpu-native"),
    (("CPU",), {"AVX2": "1", "FMA": "1", "AVX512": "0"}, "cpu"),
    (("ROCm", "CPU"), {}, None),
])
def test_match_preset(registries, features, expected):
    assert match_preset(load_presets(), registries, features).name == expected


def test_backend_info_on_this_cpu_build():
    result = invoke()  # the group's default is `info`
    assert result.exit_code == 0, result.output
    assert result.output == invoke("info").output
    lines = {line[:18].strip(): line[18:] for line in result.output.splitlines() if line[:18].strip()}
    assert lines["system info"].startswith("CPU : ") and "AVX2 = 1" in lines["system info"]
    assert lines["GPU offload"] == "no"
    assert lines["devices"].split()[:2] == ["CPU", "CPU"]
    native = any(cpu_features().get(f) == "1" for f in NATIVE_ONLY_CPU_FEATURES)
    assert lines["preset"].startswith("cpu-native (" if native else "cpu (")
    assert lines["presets"].startswith("cpu, cpu-native, metal, cuda, vulkan")


def test_backend_info_json():
    result = invoke("info", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["llama_cpp_python"] == PIN.split("==")[1]
    assert report["gpu_offload"] is False and report["backends"] == ["CPU"]
    assert [d["type"] for d in report["devices"]] == ["CPU"] and report["devices"][0]["memory_total"] > 0
    assert report["preset"]["name"] in {"cpu", "cpu-native"}
    assert report["system_info"].startswith("CPU : ")

