"""Atomic file writes and JSON reads that name the file when something is wrong.

Every result the harness publishes (run records, leaderboards, plots) goes through the writers here, so
a reader never sees a half-written file: the content is produced completely in memory first, written to
a temporary file in the destination's own directory, flushed and fsync'ed, and only then moved over the
destination with :func:`os.replace` (atomic on POSIX and Windows when source and target share a file
system, which the same-directory temporary guarantees). If anything fails before the replace, the
temporary is removed and the previous file, if any, is left exactly as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = [
    "JSONReadError",
    "read_json",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_text_atomic",
]

_TMP_SUFFIX = ".tmp"


class JSONReadError(ValueError):
    """A file that could not be decoded as JSON; the message and ``path`` name the file."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable where the platform allows it (best effort)."""
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and return the path.

    Parent directories are created. The temporary file (``.<name>.<random>.tmp`` in the same directory)
    is removed if the write fails, so a failure leaves no partial file and the old content intact. An
    existing target keeps its permission bits; a new file gets ``0o644``.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = target.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = 0o644
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=_TMP_SUFFIX, dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(target.parent)
    return target


def write_text_atomic(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`write_bytes_atomic`) and return the path."""
    return write_bytes_atomic(path, text.encode(encoding))


def write_json_atomic(
    path: str | os.PathLike,
    obj: Any,
    *,
    indent: int | None = 2,
    sort_keys: bool = False,
) -> Path:
    """Serialise ``obj`` as JSON and write it to ``path`` atomically; return the path.

    Serialisation happens completely before the file system is touched, so an object that cannot be
    serialised raises (``TypeError``/``ValueError`` from :func:`json.dumps`) and leaves any existing
    file untouched. Non-finite floats are written as ``NaN``/``Infinity`` (Python's JSON dialect, which
    :func:`read_json` reads back); the output ends with a newline and keeps non-ASCII characters.
    """
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=False) + "\n"
    return write_text_atomic(path, text)


def read_json(path: str | os.PathLike) -> Any:
    """Read and decode the JSON file at ``path``.

    Raises :class:`JSONReadError` (a ``ValueError``) naming the file and the position of the problem
    when the content is not valid UTF-8 JSON (for example a file truncated by a crash), and the usual
    ``OSError`` subclasses (which also name the file) when it cannot be opened.
    """
    p = Path(path)
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JSONReadError(p, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if not text.strip():
        raise JSONReadError(p, "empty file (no JSON content)")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise JSONReadError(p, f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc
