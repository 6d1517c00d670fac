"""Run a command and report its wall time and peak RSS (the child's own, via wait4)."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Measurement:
    seconds: float
    peak_rss_bytes: int
    returncode: int

    @property
    def peak_rss_gb(self) -> float:
        return self.peak_rss_bytes / 1e9


def measure(cmd: list[str], env: dict[str, str] | None = None, log_path: str | None = None) -> Measurement:
    """Wall time and maximum resident set size of `cmd` (its own process; Linux reports KiB)."""
    log = open(log_path, "w") if log_path else subprocess.DEVNULL
    try:
        started = time.monotonic()
        proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.monotonic() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if log_path:
            log.close()
    return Measurement(seconds, usage.ru_maxrss * 1024, proc.returncode)


def drop_page_cache_hint(path: str) -> None:
    """Ask the kernel to evict a file from the page cache, so runs start equally cold (best effort)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    except OSError:
        pass
