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


def llama_cpp_python() -> ModuleType:
    """llama-cpp-python's own package (its ``Llama`` class, chat formatters), with the logs routed.

    pixtral-cpp itself uses only the ctypes bindings; the tests hold llama-cpp-python's high-level
    API up as a reference, and get it here so that no module outside the backend imports ``llama_cpp``.
    """
    bindings()
    import llama_cpp

    return llama_cpp


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


def is_gguf(path: Path) -> bool:
    """True if ``path`` is a file that starts with the GGUF magic (llama.cpp may abort on other files)."""
    try:
        with path.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


# --- ggml's shared libraries, for the functions llama-cpp-python does not bind ----------------------


def ggml_library(name: str) -> ctypes.CDLL:
    """A ggml library ("ggml", "ggml-base") from llama-cpp-python's lib folder: the copy libllama uses."""
    llama, _ = bindings()
    from llama_cpp._ctypes_extensions import load_shared_library

    return load_shared_library(name, llama._base_path)


@functools.cache
def ggml_base_library() -> ctypes.CDLL:
    """libggml-base, the one libllama uses (tensor types, row quantizers, device accessors)."""
    return ggml_library("ggml-base")
