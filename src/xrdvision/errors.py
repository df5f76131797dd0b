"""One error type for everything a user can get wrong.

The CLI catches :class:`XrdVisionError` and prints its message as one line (no traceback), so every
message must name the file or key at fault and the reason, e.g. ``data/x.cif: no atoms in structure``.
"""

from __future__ import annotations

from pathlib import Path


class XrdVisionError(Exception):
    """A user-facing error: bad input, bad settings, missing files. Printed as one line by the CLI."""


class ConfigError(XrdVisionError):
    """An invalid ``params.yaml``: unknown key, wrong type or impossible value."""


class InputError(XrdVisionError):
    """A bad input file (CIF, pattern, image). ``str()`` is ``"<path>: <reason>"``."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = " ".join(str(reason).split())  # keep it to one line
        super().__init__(f"{self.path}: {self.reason}")


def one_line(exc: BaseException) -> str:
    """An unexpected exception as one line: ``"<Type>: <first line of its message>"``.

    The one home of how a failure that is not an :class:`XrdVisionError` is reported (a simulate
    manifest's ``reason``, a registry lookup that failed): the type says what broke, the first line why.
    """
    text = str(exc).strip()
    first = text.splitlines()[0].strip() if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
