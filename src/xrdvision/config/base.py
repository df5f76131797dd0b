"""The building blocks of the settings sections: strict scalar types, the section decorator, rules.

One home for them so that each group of settings can live in its own small module
(``config/patterns.py``, ``config/generate.py``, ``config/measured.py``) and still validate the same way.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import ConfigDict, Strict
from pydantic.dataclasses import dataclass
from pydantic_core import PydanticCustomError

# Strict scalars, as YAML gives them: "42" is not an integer, 1 is not true; an int widens to a float.
Int = Annotated[int, Strict()]
Num = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]

_section = dataclass(frozen=True, config=ConfigDict(extra="forbid"))


def _rule(ok: bool, key: str, reason: str) -> None:
    """A check between fields, or on a list's shape; ``key`` is relative to the section."""
    if not ok:
        raise PydanticCustomError("rule", "{reason}", {"key": key, "reason": reason})
