"""What every verifier shares: reading a reference column and the plain text of a completion."""
from __future__ import annotations

from typing import Any, Sequence


def _column(columns: dict[str, Any], names: Sequence[str], n: int, reward: str) -> list[Any]:
    for name in names:
        if name in columns and columns[name] is not None:
            values = list(columns[name])
            if len(values) != n:
                raise ValueError(f"{reward}: column {name!r} has {len(values)} values for {n} completions")
            return values
    raise ValueError(f"{reward} needs a {' / '.join(repr(x) for x in names)} column with the reference answers; "
                     "add it to the dataset (or pass label_column=...)")


def _completion_text(c: Any) -> str:
    """Plain text of a completion; conversational completions (lists of messages) give the last content."""
    if isinstance(c, str):
        return c
    if isinstance(c, list) and c and isinstance(c[-1], dict):
        return str(c[-1].get("content", ""))
    if isinstance(c, dict):
        return str(c.get("content", ""))
    return "" if c is None else str(c)
