"""Atomic file writing, public: the helper every file the package writes goes through.

Scripts outside the package (the ``benchmarks/``, user code) that write results should use
:func:`write_atomic` too, so that a crash never leaves a half-written file. The rules (temporary file
in the same folder, ``fsync``, atomic rename, stale temporaries of dead writers cleaned) are listed in
``docs/guarantees.md``.
"""

from __future__ import annotations

from ._io import write_atomic

__all__ = ["write_atomic"]
