"""Human-readable sizes, shared by the converter and the command line (no imports: cheap at start-up)."""

from __future__ import annotations


def format_bytes(n: float) -> str:
    """A byte count in decimal units, e.g. 1.3 GB."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
