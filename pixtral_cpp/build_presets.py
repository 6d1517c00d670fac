"""llama.cpp build presets: CMakePresets.json → CMAKE_ARGS, toolchain checks, the reinstall command,
and which preset a build's backends and CPU features correspond to.

CMakePresets.json (top level of the repository) is the single source of truth for the build flags;
this module only reads it. It never loads llama.cpp (so `pixtral-cpp backend install` works with a
broken build): what the installed build reports is read by :mod:`pixtral_cpp.backend.build_info`.
The reinstall itself is pip building llama-cpp-python from source, which its scikit-build-core
backend configures with the ``CMAKE_ARGS`` environment variable (split with ``shlex``; the old
``FORCE_CMAKE`` switch of the setuptools era is no longer read).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pixtral_cpp.errors import BackendError

PRESETS_FILE = "CMakePresets.json"
LLAMA_PACKAGE = "llama-cpp-python"

# ggml backend registry name → the CMake switch that compiles it in (GGML_*_NAME in ggml's headers).
GPU_REGISTRY_VARIABLES = {
    "CUDA": "GGML_CUDA",
    "MTL": "GGML_METAL",
    "Vulkan": "GGML_VULKAN",
    "ROCm": "GGML_HIP",
    "MUSA": "GGML_MUSA",
    "SYCL": "GGML_SYCL",
    "OpenCL": "GGML_OPENCL",
}

# CPU features (llama_print_system_info names) the portable `cpu` preset never compiles in, so their
# presence means -march=native (or another hand-made build). DOTPROD and FP16_VA are left out: Apple's
# clang enables them by default on arm64, portable or not.
NATIVE_ONLY_CPU_FEATURES = (
    "AVX_VNNI", "AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16", "AMX_INT8",
    "MATMUL_INT8", "SVE", "SME",
)

_TRUE_VALUES = {"ON", "TRUE", "YES", "Y", "1"}


class PresetError(BackendError):
    """CMakePresets.json is missing or malformed, or names no such preset."""


class ToolchainError(BackendError):
    """A preset cannot be built here: a compiler, SDK or operating system it needs is missing."""


class InstallError(BackendError):
    """pip failed to build or install llama-cpp-python."""


# --- Presets ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheVariable:
    """One CMake cache variable of a preset, e.g. GGML_CUDA=ON."""

    name: str
    value: str
    type: str | None = None  # BOOL, STRING, ... when the preset gives one

    def cmake_arg(self) -> str:
        """The -D argument CMake takes on its command line, e.g. "-DGGML_CUDA=ON"."""
        typed = f":{self.type}" if self.type else ""
        return f"-D{self.name}{typed}={self.value}"


@dataclass(frozen=True)
class Preset:
    """A visible configure preset with its inherited cache variables resolved."""

    name: str
    display_name: str
    description: str
    cache_variables: tuple[CacheVariable, ...]

    def value(self, name: str) -> str | None:
        """The value of cache variable ``name``, or None where the preset does not set it."""
        return next((v.value for v in self.cache_variables if v.name == name), None)

    def enables(self, name: str) -> bool:
        """True if the preset sets ``name`` to a CMake true constant (ON, TRUE, 1, ...)."""
        return (self.value(name) or "").upper() in _TRUE_VALUES

    def cmake_args(self) -> tuple[str, ...]:
        """The preset as -D arguments, base presets' variables first."""
        return tuple(v.cmake_arg() for v in self.cache_variables)


def presets_path() -> Path:
    """Where CMakePresets.json is: packaged beside the modules (in the source tree a symlink to the
    top-level file), else the top of the source tree."""
    package = Path(__file__).resolve().parent
    for candidate in (package / PRESETS_FILE, package.parent / PRESETS_FILE):
        if candidate.is_file():
            return candidate
    raise PresetError(f"{PRESETS_FILE} was not found beside {package} nor in {package.parent}; "
                      "reinstall pixtral-cpp from its source tree")


def load_presets(path: Path | None = None) -> dict[str, Preset]:
    """The visible configure presets of CMakePresets.json by name, in file order."""
    path = path or presets_path()
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        raw = {entry["name"]: entry for entry in document["configurePresets"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PresetError(f"{path} is not a readable CMake presets file: {exc}") from exc
    return {name: _resolve(name, raw, path) for name, entry in raw.items() if not entry.get("hidden")}


def get_preset(name: str, presets: Mapping[str, Preset] | None = None) -> Preset:
    """The preset called ``name``; an unknown name is an error that lists the known ones."""
    presets = load_presets() if presets is None else presets
    if name not in presets:
        raise PresetError(f"unknown backend preset {name!r}; known presets: {', '.join(presets)}")
    return presets[name]


def _resolve(name: str, raw: Mapping[str, Mapping[str, Any]], path: Path) -> Preset:
    entry = raw[name]
    variables = _cache_variables(name, raw, path, seen=())
    return Preset(name=name, display_name=str(entry.get("displayName", name)),
                  description=str(entry.get("description", "")),
                  cache_variables=tuple(v for v in variables.values() if v is not None))


def _cache_variables(name: str, raw: Mapping[str, Mapping[str, Any]], path: Path,
                     seen: tuple[str, ...]) -> dict[str, CacheVariable | None]:
    """CMake's inheritance rule: the preset's own values win, then its parents in the order listed."""
    if name in seen:
        raise PresetError(f"{path}: presets inherit in a cycle: {' -> '.join((*seen, name))}")
    if name not in raw:
        raise PresetError(f"{path}: preset {seen[-1]!r} inherits unknown preset {name!r}")
    parents = raw[name].get("inherits", [])
    merged: dict[str, CacheVariable | None] = {}
    for parent in reversed([parents] if isinstance(parents, str) else parents):
        merged.update(_cache_variables(parent, raw, path, (*seen, name)))
    for key, spec in raw[name].get("cacheVariables", {}).items():
        merged[key] = _cache_variable(key, spec)
    return merged


def _cache_variable(name: str, spec: Any) -> CacheVariable | None:
    """A presets-file value: a string, a boolean, {"type", "value"}, or null (unset what a parent set)."""
    if spec is None:
        return None
    if isinstance(spec, Mapping):
        return CacheVariable(name, _cmake_string(spec.get("value", "")), spec.get("type"))
    if isinstance(spec, bool):
        return CacheVariable(name, _cmake_string(spec), "BOOL")  # what CMake makes of a JSON boolean
    return CacheVariable(name, str(spec))


def _cmake_string(value: Any) -> str:
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    return str(value)


def parse_define(text: str) -> CacheVariable:
    """A user's NAME=VALUE (or NAME:TYPE=VALUE) override, as cmake -D takes it."""
    match = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(?::([A-Z]+))?=(.*)", text.removeprefix("-D"), re.S)
    if not match:
        raise PresetError(f"{text!r} is not NAME=VALUE (e.g. CMAKE_CUDA_ARCHITECTURES=86-real)")
    name, type_, value = match.groups()
    return CacheVariable(name, value, type_)


def with_overrides(preset: Preset, overrides: Iterable[CacheVariable]) -> Preset:
    """``preset`` with some cache variables replaced or added, keeping the others' order."""
    variables = {v.name: v for v in preset.cache_variables}
    variables.update((v.name, v) for v in overrides)
    return Preset(preset.name, preset.display_name, preset.description, tuple(variables.values()))


# --- Toolchain checks: refuse up front what would fail ten minutes into a build ----------------------


def toolchain_problems(preset: Preset, system: str | None = None,
                       environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """What this machine lacks to build ``preset``, each with the fix; empty when nothing is missing.

    ``system`` is platform.system()'s name for the OS ("Linux", "Darwin", "Windows").
    """
    system = system or platform.system()
    environ = os.environ if environ is None else environ
    problems = [*_compiler_problems(system, environ)]
    if preset.enables("GGML_METAL"):
        problems += _metal_problems(preset, system)
    if preset.enables("GGML_CUDA"):
        problems += _cuda_problems(preset, environ)
    if preset.enables("GGML_VULKAN"):
        problems += _vulkan_problems(preset, system, environ)
    return tuple(problems)


def check_toolchain(preset: Preset, system: str | None = None,
                    environ: Mapping[str, str] | None = None) -> None:
    """Raise ToolchainError naming every missing piece if ``preset`` cannot be built here."""
    problems = toolchain_problems(preset, system, environ)
    if problems:
        raise ToolchainError(f"cannot build the {preset.name} preset here: " + "; ".join(problems))


def _which(name: str, environ: Mapping[str, str]) -> str | None:
    return shutil.which(name, path=environ.get("PATH", os.defpath))


def _compiler_problems(system: str, environ: Mapping[str, str]) -> list[str]:
    # CMake finds Visual Studio on its own (vswhere): cl.exe is on PATH only in a developer prompt.
    if system == "Windows":
        return []
    missing = [role for role, variable, names in (("C", "CC", ("cc", "gcc", "clang")),
                                                  ("C++", "CXX", ("c++", "g++", "clang++")))
               if not (environ.get(variable) or any(_which(n, environ) for n in names))]
    if not missing:
        return []
    fix = "xcode-select --install" if system == "Darwin" else \
        "sudo apt install build-essential (Debian/Ubuntu) or sudo dnf install gcc-c++ (Fedora)"
    return [f"no {' or '.join(missing)} compiler on PATH (nor $CC/$CXX): install one, e.g. {fix}"]


def _metal_problems(preset: Preset, system: str) -> list[str]:
    if system == "Darwin":
        return []
    return [f"the {preset.name} preset builds for Apple's Metal GPUs and needs macOS, not {system}; "
            "for NVIDIA GPUs use the cuda preset, for AMD or Intel GPUs the vulkan preset"]


def _cuda_problems(preset: Preset, environ: Mapping[str, str]) -> list[str]:
    # CMake takes the CUDA compiler from $CUDACXX, else nvcc on PATH.
    cudacxx = environ.get("CUDACXX")
    if cudacxx:
        return [] if Path(cudacxx).is_file() else [f"$CUDACXX points to {cudacxx}, which does not exist"]
    if _which("nvcc", environ):
        return []
    return [f"the {preset.name} preset needs nvcc, the CUDA toolkit's compiler, and it is not on PATH: "
            "install the CUDA toolkit (https://developer.nvidia.com/cuda-downloads, or "
            "sudo apt install nvidia-cuda-toolkit); if it is installed, put its bin folder on PATH, "
            "e.g. export PATH=/usr/local/cuda/bin:$PATH"]


def _vulkan_problems(preset: Preset, system: str, environ: Mapping[str, str]) -> list[str]:
    sdk = "the Vulkan SDK (https://vulkan.lunarg.com/sdk/home)"
    apt = "sudo apt install libvulkan-dev glslc"
    problems = []
    if not _which("glslc", environ):
        problems.append(f"the {preset.name} preset needs glslc, the Vulkan shader compiler, and it is not on "
                        f"PATH: install {sdk} or, on Debian/Ubuntu, {apt}")
    # Outside the SDK, Linux distributions ship the headers and loader in one -dev package.
    if system == "Linux" and not environ.get("VULKAN_SDK") and not _vulkan_headers_installed():
        problems.append(f"the Vulkan headers (vulkan/vulkan.h) are missing: {apt} (Debian/Ubuntu), "
                        f"sudo dnf install vulkan-headers vulkan-loader-devel (Fedora), or {sdk}")
    if system != "Linux" and not environ.get("VULKAN_SDK"):
        problems.append(f"$VULKAN_SDK is not set: install {sdk} and run its setup script")
    return problems


def _vulkan_headers_installed() -> bool:
    return any((Path(prefix) / "include/vulkan/vulkan.h").is_file() for prefix in ("/usr", "/usr/local"))


# --- The reinstall command ----------------------------------------------------------------------------


def pinned_llama_requirement() -> str:
    """"llama-cpp-python==X.Y.Z", the pin of pixtral-cpp's installed metadata (from pyproject.toml)."""
    try:
        requirements = importlib.metadata.requires("pixtral-cpp") or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise BackendError("pixtral-cpp is not installed, so its llama-cpp-python pin is unknown: "
                           "pip install -e . in the source tree") from exc
    for requirement in requirements:
        match = re.fullmatch(r"llama[-_.]cpp[-_.]python\s*==\s*([\w.+!-]+)\s*", requirement.split(";")[0],
                             re.IGNORECASE)
        if match:
            return f"{LLAMA_PACKAGE}=={match.group(1)}"
    raise BackendError(f"pixtral-cpp's metadata pins no exact {LLAMA_PACKAGE} version: {requirements}")


@dataclass(frozen=True)
class InstallCommand:
    """The pip command that rebuilds llama-cpp-python for a preset, and the environment it adds."""

    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)

    def shell_line(self) -> str:
        """The command as one POSIX shell line, every part quoted where it needs to be."""
        assignments = [f"{name}={shlex.quote(value)}" for name, value in self.env.items()]
        return " ".join([*assignments, shlex.join(self.argv)])


def install_command(preset: Preset, python: str = sys.executable) -> InstallCommand:
    """pip rebuilding the pinned llama-cpp-python from source with ``preset``'s cache variables."""
    argv = (
        python, "-m", "pip", "install",
        "-v",  # scikit-build-core streams CMake's and the compiler's progress only when verbose
        "--force-reinstall",  # the same version is installed already: rebuild it anyway
        # Without it --force-reinstall also reinstalls every dependency at its newest version
        # (numpy included), which has nothing to do with the backend and can break other packages.
        "--no-deps",
        "--no-cache-dir",  # a cached wheel would be the old build
        "--no-binary", LLAMA_PACKAGE,  # never a prebuilt wheel: those ignore CMAKE_ARGS
        pinned_llama_requirement(),
    )
    # scikit-build-core splits CMAKE_ARGS with shlex, so shlex.join round-trips values with ';' or spaces.
    return InstallCommand(argv=argv, env={"CMAKE_ARGS": shlex.join(preset.cmake_args())})


def run_install(command: InstallCommand) -> None:
    """Run ``command`` with pip's output going straight to this process's terminal."""
    try:
        completed = subprocess.run(command.argv, env={**os.environ, **command.env}, check=False)
    except OSError as exc:
        raise InstallError(f"could not start {command.argv[0]}: {exc}") from exc
    if completed.returncode != 0:
        raise InstallError(f"pip exited with status {completed.returncode}; the build log above says why. "
                           "pip only replaces the installed llama-cpp-python after a successful build, so "
                           "the previous one is still in place")


# --- Which preset a build came from ------------------------------------------------------------------


@dataclass(frozen=True)
class PresetMatch:
    """The preset the installed build corresponds to (None where no preset does), and why."""

    name: str | None
    reason: str


def match_preset(presets: Mapping[str, Preset], registries: Iterable[str],
                 cpu_features: Mapping[str, str]) -> PresetMatch:
    """The preset a build with these backends and CPU features would have come from."""
    gpu = [name for name in registries if name in GPU_REGISTRY_VARIABLES]
    if gpu:
        variable = GPU_REGISTRY_VARIABLES[gpu[0]]
        found = next((p.name for p in presets.values() if p.enables(variable)), None)
        if found is None:
            return PresetMatch(None, f"built with {variable} ({gpu[0]} backend), which no preset covers")
        return PresetMatch(found, f"built with {variable} ({gpu[0]} backend)")
    gpu_variables = GPU_REGISTRY_VARIABLES.values()
    cpu_only = [p for p in presets.values() if not any(p.enables(v) for v in gpu_variables)]
    native = [f for f in NATIVE_ONLY_CPU_FEATURES if cpu_features.get(f) == "1"]
    if native:
        found = next((p.name for p in cpu_only if p.enables("GGML_NATIVE")), None)
        reason = "CPU only, with features the portable build leaves out: " + ", ".join(native)
        return PresetMatch(found, reason)
    # The portable preset is the one that turns GGML_NATIVE off explicitly.
    found = next((p.name for p in cpu_only if p.value("GGML_NATIVE") and not p.enables("GGML_NATIVE")), None)
    return PresetMatch(found, "CPU only, portable instruction sets")
