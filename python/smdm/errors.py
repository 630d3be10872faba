"""The exceptions smdm raises for bad input. Both are raised by the Rust core too (same classes)."""

from __future__ import annotations

try:  # the Rust extension defines them so Rust errors map onto the same classes
    from smdm._core import SmdmFormatError, SmdmIOError
except ImportError:  # pragma: no cover - only when the extension is not built (source checkout)

    class SmdmFormatError(ValueError):
        """Malformed or inconsistent smdm data (names the file and offset)."""

    class SmdmIOError(OSError):
        """An I/O failure on an smdm file (names the file)."""


__all__ = ["SmdmFormatError", "SmdmIOError"]
