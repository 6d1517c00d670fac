"""Loading of llama-cpp-python's ctypes bindings and routing of llama.cpp/ggml/mtmd log output.

The only place in pixtral-cpp that imports ``llama_cpp``; the other backend modules get the bindings
from :func:`bindings`.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from pixtral_cpp.errors import BackendError

logger = logging.getLogger("pixtral_cpp.llama")

# enum ggml_log_level in ggml.h (llama-cpp-python's own _logger.py has INFO and DEBUG swapped).
_GGML_LEVELS = {0: logging.CRITICAL, 1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
_GGML_LOG_LEVEL_CONT = 5

LogListener = Callable[[str], None]


class _LogRouter:
    """Receives every llama.cpp/ggml/mtmd log message; quiet unless verbose, always remembers errors."""

    def __init__(self) -> None:
        self.verbose = False
        self.errors: collections.deque[str] = collections.deque(maxlen=8)
        self.listeners: list[LogListener] = []
        self._level = logging.INFO
        self._pending = ""
        self._lock = threading.Lock()

    def __call__(self, level: int, text: bytes | None, _user_data: ctypes.c_void_p) -> None:
        # An exception escaping a ctypes callback is printed to stderr by ctypes: swallow everything.
        try:
            self._receive(level, (text or b"").decode("utf-8", errors="replace"))
        except Exception:  # noqa: BLE001
            pass

    def _receive(self, level: int, text: str) -> None:
        with self._lock:
            if level != _GGML_LOG_LEVEL_CONT:
                self._flush()
                self._level = _GGML_LEVELS.get(level, logging.INFO)
            for listener in list(self.listeners):
                listener(text)
            # Messages arrive in pieces (CONT, progress dots): emit one record per completed line.
            self._pending += text
            if self._pending.endswith("\n"):
                self._flush()

    def _flush(self) -> None:
        line, self._pending = self._pending.rstrip("\n"), ""
        if not line.strip():
            return
        if self._level >= logging.ERROR:
            self.errors.append(line.strip())
        if self.verbose:
            logger.log(self._level, "%s", line)

    def last_error(self, default: str = "no details were logged") -> str:
        with self._lock:
            self._flush()
            return self.errors[-1] if self.errors else default


_router = _LogRouter()
# The ctypes function object must outlive every call from C: keep it at module level.
_callback: ctypes._CFuncPtr | None = None


@functools.cache
def bindings() -> tuple[ModuleType, ModuleType]:
    """Import ``llama_cpp`` and ``llama_cpp.mtmd_cpp`` once, route their logs, init the backend."""
    global _callback
    try:
        import llama_cpp.llama_cpp as llama
        import llama_cpp.mtmd_cpp as mtmd
    except (ImportError, OSError) as exc:
        raise BackendError(
            f"llama-cpp-python could not be loaded ({exc}); install llama-cpp-python==0.3.36"
        ) from exc
    _callback = llama.llama_log_callback(_router)
    # llama_log_set also sets ggml's logger; mtmd_helper_log_set also sets mtmd's and clip's.
    llama.llama_log_set(_callback, ctypes.c_void_p(0))
    mtmd.mtmd_helper_log_set(_callback, ctypes.c_void_p(0))
    llama.llama_backend_init()
    return llama, mtmd


def schema_converter() -> Callable[..., str]:
    """llama-cpp-python's pure-Python JSON-schema-to-GBNF converter (part of the pinned dependency)."""
    bindings()  # raises BackendError, with what to install, when llama-cpp-python is missing
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    return json_schema_to_gbnf


def set_verbose(verbose: bool) -> None:
    """Forward llama.cpp's log output to the ``pixtral_cpp.llama`` logger (True) or drop it (False)."""
    bindings()
    _router.verbose = verbose


def last_native_error(default: str = "no details were logged") -> str:
    """The most recent error line llama.cpp logged, for exception messages."""
    return _router.last_error(default)


class log_listener:
    """Context manager that passes every raw log message to ``listener`` while active."""

    def __init__(self, listener: LogListener) -> None:
        self._listener = listener

    def __enter__(self) -> None:
        bindings()
        _router.listeners.append(self._listener)

    def __exit__(self, *_exc: object) -> None:
        _router.listeners.remove(self._listener)


@functools.cache
def cpu_features() -> dict[str, str]:
    """llama.cpp's CPU feature report, e.g. {"AVX2": "1", "AMX_INT8": "1", "REPACK": "1"}."""
    llama, _ = bindings()
    info = llama.llama_print_system_info().decode(errors="replace")
    pairs = (item.split("=", 1) for item in info.replace("CPU :", "|").split("|") if "=" in item)
    return {key.strip(): value.strip() for key, value in pairs}


def repacking_is_safe() -> bool:
    """False where llama.cpp would repack weights into its AMX buffer, whose matmul segfaults on the
    first decode (ggml-org/llama.cpp#20824, open; reproduced here with every quantized text model)."""
    return cpu_features().get("AMX_INT8") != "1"


def is_gguf(path: Path) -> bool:
    """True if ``path`` is a file that starts with the GGUF magic (llama.cpp may abort on other files)."""
    try:
        with path.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


# --- What the installed llama.cpp build can do (for `pixtral-cpp backend info`) ---------------------

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


def _load_ggml(name: str) -> ctypes.CDLL:
    llama, _ = bindings()
    from llama_cpp._ctypes_extensions import load_shared_library

    return load_shared_library(name, llama._base_path)


@functools.cache
def ggml_base_library() -> ctypes.CDLL:
    """libggml-base, the one libllama uses (tensor types, row quantizers, device accessors)."""
    return _load_ggml("ggml-base")


@functools.cache
def _ggml_libraries() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """(libggml, libggml-base) from llama-cpp-python's lib folder, with the device API typed.

    llama-cpp-python binds none of ggml's backend registry functions. Loading the libraries again by
    path returns the copies libllama already uses, so this sees the same registry. The registry lives
    in libggml, the device accessors in libggml-base (Windows does not resolve one through the other).
    """
    ggml, base = _load_ggml("ggml"), ggml_base_library()
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


def system_info() -> str:
    """llama.cpp's one-line build report, e.g. "CPU : SSE3 = 1 | AVX2 = 1 | ... | REPACK = 1 |"."""
    llama, _ = bindings()
    return _text(llama.llama_print_system_info()).strip()


def ggml_version() -> tuple[str, str]:
    """(version, commit) of the ggml library llama-cpp-python was built with, e.g. ("0.25.3", "abc1234")."""
    _, base = _ggml_libraries()
    return _text(base.ggml_version()), _text(base.ggml_commit())


def llama_supports_gpu_offload() -> bool:
    """True if the build has a GPU backend that can hold model layers (CUDA, Metal, Vulkan, ...)."""
    llama, _ = bindings()
    return bool(llama.llama_supports_gpu_offload())


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
