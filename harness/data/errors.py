"""Data errors that say where the problem is and how to fix it."""

from __future__ import annotations

import os


class DataError(ValueError):
    """A problem with a data file or data set.

    The message names the source (a file path or ``hub:<repo>/<file>``), the suite key and file that
    asked for it when known, the 1-based line (or row) when one applies, the field when one applies,
    what is wrong, and the fix, e.g.::

        hub:MiniLLM/dolly/raw.jsonl (key 'data.train' of config/instruct.yaml), line 7, field 'output':
        missing. Fix: give every line an 'output' ...

    (one line). The parts are also kept as attributes (``source``, ``key``, ``config``, ``line``,
    ``field``, ``problem``, ``fix``) so callers and tests can inspect them.
    """

    def __init__(
        self,
        source: str | os.PathLike,
        problem: str,
        *,
        line: int | None = None,
        field: str | None = None,
        fix: str | None = None,
        key: str | None = None,
        config: str | os.PathLike | None = None,
    ) -> None:
        self.source = str(source)
        self.problem = problem
        self.line = line
        self.field = field
        self.fix = fix
        self.key = key
        self.config = None if config is None else str(config)
        head = self.source
        if key is not None or self.config is not None:
            head += " (" + " of ".join(p for p in (f"key {key!r}" if key else None, self.config) if p) + ")"
        where = [head]
        if line is not None:
            where.append(f"line {line}")
        if field is not None:
            where.append(f"field {field!r}")
        message = ", ".join(where) + f": {problem}"
        if fix:
            message += f". Fix: {fix}"
        super().__init__(message)
