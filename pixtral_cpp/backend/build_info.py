"""What the installed llama.cpp build can do, as its own libraries report it (`pixtral-cpp backend info`,
`pixtral-cpp doctor`): versions, compiled-in CPU features and backends, the devices they see.

Which CMakePresets.json preset the build matches is decided by :mod:`pixtral_cpp.build_presets`,
which never loads llama.cpp.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from pixtral_cpp.backend._native import bindings, ggml_base_library, ggml_library
from pixtral_cpp.build_presets import LLAMA_PACKAGE, Preset, PresetMatch, load_presets, match_preset

# enum ggml_backend_dev_type in ggml-backend.h, in order.
_GGML_DEVICE_TYPES = ("CPU", "GPU", "IGPU", "ACCEL", "META")


@dataclass(frozen=True)
class NativeDevice:
    """One device the ggml backend registry sees, e.g. ("CUDA0", "NVIDIA H100", "GPU", 80e9, 79e9)."""

    name: str
    description: str
    type: str  # CPU, GPU, IGPU (integrated GPU), ACCEL (BLAS, AMX), META
    memory_total: int  # bytes; 0 where the backend does not say
    memory_free: int


@dataclass(frozen=True)
class InstalledBackend:
    """The llama.cpp inside the installed llama-cpp-python, as its own libraries report it."""

    llama_cpp_python: str  # package version
    ggml_version: str
    ggml_commit: str
    system_info: str  # llama_print_system_info(): compiled-in CPU features and backend options
    gpu_offload: bool
    registries: tuple[str, ...]  # compiled-in backends, e.g. ("CUDA", "CPU")
    devices: tuple[NativeDevice, ...]  # in llama.cpp's order
    preset: PresetMatch

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return {
            "llama_cpp_python": self.llama_cpp_python, "ggml_version": self.ggml_version,
            "ggml_commit": self.ggml_commit, "system_info": self.system_info,
            "gpu_offload": self.gpu_offload, "backends": list(self.registries),
            "devices": [asdict(device) for device in self.devices],
            "preset": {"name": self.preset.name, "reason": self.preset.reason},
        }


def installed_backend(presets: Mapping[str, Preset] | None = None) -> InstalledBackend:
    """Build info, GPU offload, devices and matching preset of the installed llama-cpp-python."""
    presets = load_presets() if presets is None else presets
    version, commit = ggml_version()
    registries = backend_registries()
    return InstalledBackend(
        llama_cpp_python=importlib.metadata.version(LLAMA_PACKAGE), ggml_version=version, ggml_commit=commit,
        system_info=system_info(), gpu_offload=llama_supports_gpu_offload(),
        registries=registries, devices=backend_devices(),
        preset=match_preset(presets, registries, cpu_features()),
    )


def system_info() -> str:
    """llama.cpp's one-line build report, e.g. "CPU : SSE3 = 1 | AVX2 = 1 | ... | REPACK = 1 |"."""
    llama, _ = bindings()
    return _text(llama.llama_print_system_info()).strip()


@functools.cache
def cpu_features() -> dict[str, str]:
    """llama.cpp's CPU feature report, e.g. {"AVX2": "1", "AMX_INT8": "1", "REPACK": "1"}."""
    pairs = (item.split("=", 1) for item in system_info().replace("CPU :", "|").split("|") if "=" in item)
    return {key.strip(): value.strip() for key, value in pairs}


def repacking_is_safe() -> bool:
    """False where llama.cpp would repack weights into its AMX buffer, whose matmul segfaults on the
    first decode (ggml-org/llama.cpp#20824, open; reproduced here with every quantized text model)."""
    return cpu_features().get("AMX_INT8") != "1"


def llama_supports_gpu_offload() -> bool:
    """True if the build has a GPU backend that can hold model layers (CUDA, Metal, Vulkan, ...)."""
    llama, _ = bindings()
    return bool(llama.llama_supports_gpu_offload())


def ggml_version() -> tuple[str, str]:
    """(version, commit) of the ggml library llama-cpp-python was built with, e.g. ("0.25.3", "abc1234")."""
    _, base = _ggml_libraries()
    return _text(base.ggml_version()), _text(base.ggml_commit())


def backend_registries() -> tuple[str, ...]:
    """Names of the backends compiled in, e.g. ("CUDA", "CPU"); present even where they find no device."""
    ggml, base = _ggml_libraries()
    return tuple(_text(base.ggml_backend_reg_name(ggml.ggml_backend_reg_get(i)))
                 for i in range(ggml.ggml_backend_reg_count()))


def backend_devices() -> tuple[NativeDevice, ...]:
    """Every device the compiled-in backends found on this machine, in llama.cpp's order."""
    ggml, base = _ggml_libraries()
    devices = []
    for i in range(ggml.ggml_backend_dev_count()):
        device = ggml.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        base.ggml_backend_dev_memory(device, ctypes.byref(free), ctypes.byref(total))
        kind = base.ggml_backend_dev_type(device)
        devices.append(NativeDevice(
            name=_text(base.ggml_backend_dev_name(device)),
            description=_text(base.ggml_backend_dev_description(device)).strip(),
            type=_GGML_DEVICE_TYPES[kind] if 0 <= kind < len(_GGML_DEVICE_TYPES) else f"type {kind}",
            memory_total=total.value,
            memory_free=free.value,
        ))
    return tuple(devices)


@functools.cache
def _ggml_libraries() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """(libggml, libggml-base) from llama-cpp-python's lib folder, with the device API typed.

    llama-cpp-python binds none of ggml's backend registry functions. Loading the libraries again by
    path returns the copies libllama already uses, so this sees the same registry. The registry lives
    in libggml, the device accessors in libggml-base (Windows does not resolve one through the other).
    """
    ggml, base = ggml_library("ggml"), ggml_base_library()
    for lib, name, restype, argtypes in (
        (ggml, "ggml_backend_reg_count", ctypes.c_size_t, []),
        (ggml, "ggml_backend_reg_get", ctypes.c_void_p, [ctypes.c_size_t]),
        (ggml, "ggml_backend_dev_count", ctypes.c_size_t, []),
        (ggml, "ggml_backend_dev_get", ctypes.c_void_p, [ctypes.c_size_t]),
        (base, "ggml_backend_reg_name", ctypes.c_char_p, [ctypes.c_void_p]),
        (base, "ggml_backend_dev_name", ctypes.c_char_p, [ctypes.c_void_p]),
        (base, "ggml_backend_dev_description", ctypes.c_char_p, [ctypes.c_void_p]),
        (base, "ggml_backend_dev_type", ctypes.c_int, [ctypes.c_void_p]),
        (base, "ggml_backend_dev_memory", None,
         [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)]),
        (base, "ggml_version", ctypes.c_char_p, []),
        (base, "ggml_commit", ctypes.c_char_p, []),
    ):
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, argtypes
    return ggml, base


def _text(raw: bytes | None) -> str:
    return (raw or b"").decode("utf-8", errors="replace")
