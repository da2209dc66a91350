"""File helpers shared by every stage that writes: nothing is ever left half-written.

:func:`write_atomic` is the one way the package writes a file (reports, figures, ``.lr2vq`` files,
checkpoints). Its rules, also listed in docs/guarantees.md:

* The bytes go to a temporary file in the destination's folder, are flushed to disk (``fsync``), and the
  temporary file is renamed over the destination (``os.replace``, atomic on POSIX): a reader sees the old
  file or the new one, never a mix, and a crash or ``kill -9`` at any moment leaves the old file intact.
* The temporary file is named ``.<name>.<pid>-<random>.tmp``. A process killed while writing leaves it
  behind; the next write to the same destination deletes such leftovers, but only those whose pid is no
  longer a running process (a concurrent writer's file is left alone). Only names of exactly this pattern
  for this destination are touched.
* Overwriting keeps the destination's permission bits (a 0600 file stays 0600); a new file gets
  0666 minus the umask, as ``open()`` would give it.
* A destination that is a symbolic link is written *through*: the link's target is replaced and the
  link is kept, as text editors do. A link loop is refused with the ``OSError`` the system reports.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["read_json", "temp_file_pattern", "write_atomic", "write_json"]

_TEMP_SUFFIX = ".tmp"


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_file_pattern(destination: str | os.PathLike[str]) -> re.Pattern[str]:
    """Regular expression of the temporary files :func:`write_atomic` makes for ``destination``.

    Group 1 is the pid of the writing process.

    Examples
    --------
    >>> bool(temp_file_pattern("/tmp/model.lr2vq").fullmatch(".model.lr2vq.4242-ab12cd_z.tmp"))
    True
    >>> bool(temp_file_pattern("/tmp/model.lr2vq").fullmatch(".model.lr2vq.bak.4242-ab12cd_z.tmp"))
    False
    """
    name = Path(destination).name
    return re.compile(rf"\.{re.escape(name)}\.(\d+)-[A-Za-z0-9_]+{re.escape(_TEMP_SUFFIX)}")


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a pid this module writes; leave the file alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process (or a pid this system cannot have): not ours to judge
    return True


def _remove_stale_temp_files(path: Path) -> None:
    """Delete the temporary files of earlier writes to ``path`` whose writing process is gone."""
    pattern = temp_file_pattern(path)
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or _process_alive(int(match.group(1))):
            continue
        try:
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
        except OSError:
            pass  # another writer removed it first, or the folder is read-only: nothing is lost either way


def _resolve_destination(path: Path) -> Path:
    """The file to replace: ``path`` itself, or the final target when ``path`` is a symbolic link."""
    if not path.is_symlink():
        return path
    target = Path(os.path.realpath(path))
    if target.is_symlink():  # realpath stops at a loop
        raise OSError(errno.ELOOP, "too many levels of symbolic links", str(path))
    return target


def write_atomic(path: str | os.PathLike[str], payload: bytes | Iterable[bytes]) -> Path:
    """Write bytes to ``path`` through a temporary file in the same folder and an atomic rename.

    Parameters
    ----------
    path : str or os.PathLike
        Destination; missing parent folders are created. A symbolic link is written through to its target.
    payload : bytes, or an iterable of bytes chunks
        The content. Chunks are written one after the other, so a large file need not exist in memory
        as one bytes object.

    Returns
    -------
    pathlib.Path
        ``path`` as given (the link, when it is one).

    Raises
    ------
    OSError
        If the folder cannot be written (nothing is changed then) or ``path`` is a symbolic-link loop.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "out.bin"
    >>> write_atomic(target, b"abc").read_bytes()
    b'abc'
    >>> write_atomic(target, [b"de", b"f"]).read_bytes()
    b'def'
    """
    path = Path(path)
    destination = _resolve_destination(path)
    destination.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_files(destination)
    try:
        mode = stat.S_IMODE(os.stat(destination).st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_current_umask()
    fd, tmp = tempfile.mkstemp(
        dir=destination.parent, prefix=f".{destination.name}.{os.getpid()}-", suffix=_TEMP_SUFFIX
    )
    try:
        with os.fdopen(fd, "wb") as handle:
            chunks = [payload] if isinstance(payload, (bytes, bytearray, memoryview)) else payload
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)  # mkstemp makes 0600 files; keep the destination's mode (or the usual one)
        os.replace(tmp, destination)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as JSON text (indent 1) with :func:`write_atomic`; the plan and specs files use it."""
    return write_atomic(path, json.dumps(data, indent=1).encode())


def read_json(path: str | os.PathLike[str], what: str) -> Any:
    """The parsed JSON of a file written by :func:`write_json` (or by hand).

    Raises
    ------
    ReportFileError
        If the file cannot be read or is not JSON: ``"cannot read <what> '<path>': <reason>"``.
    """
    from .exceptions import ReportFileError  # here: this module also loads on its own, without the package

    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ReportFileError(f"cannot read {what} {str(path)!r}: {exc}") from None
