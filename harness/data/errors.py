"""Data errors that say where the problem is and how to fix it."""

from __future__ import annotations

import os


class DataError(ValueError):
    """A problem with a data file or data set.

    The message names the source (a file path or ``hub:<id>[<split>]``), the 1-based line (or row)
    when one applies, the field when one applies, what is wrong, and the fix, e.g.::

        /data/dolly.jsonl, line 7, field 'output': missing. Fix: give every line an 'output' ...

    The parts are also kept as attributes (``source``, ``line``, ``field``, ``problem``, ``fix``)
    so callers and tests can inspect them.
    """

    def __init__(
        self,
        source: str | os.PathLike,
        problem: str,
        *,
        line: int | None = None,
        field: str | None = None,
        fix: str | None = None,
    ) -> None:
        self.source = str(source)
        self.problem = problem
        self.line = line
        self.field = field
        self.fix = fix
        where = [self.source]
        if line is not None:
            where.append(f"line {line}")
        if field is not None:
            where.append(f"field {field!r}")
        message = ", ".join(where) + f": {problem}"
        if fix:
            message += f". Fix: {fix}"
        super().__init__(message)
