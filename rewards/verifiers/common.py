"""What every verifier shares: reading a reference column and the plain text of a completion."""
from __future__ import annotations

from typing import Any, Sequence

from align.rewards.base import completion_text as _completion_text  # noqa: F401  (the verifiers' name)


def _column(columns: dict[str, Any], names: Sequence[str], n: int, reward: str) -> list[Any]:
    for name in names:
        if name in columns and columns[name] is not None:
            values = list(columns[name])
            if len(values) != n:
                raise ValueError(f"{reward}: column {name!r} has {len(values)} values for {n} completions")
            return values
    raise ValueError(f"{reward} needs a {' / '.join(repr(x) for x in names)} column with the reference answers; "
                     "add it to the dataset (or pass label_column=...)")
