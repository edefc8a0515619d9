"""Step metrics read from the rewards' per-sample info dicts."""
from __future__ import annotations

from typing import Any

from align.tools._tiers import TIERS


def _tiers_in(info: Any, out: list[str]) -> None:
    if not isinstance(info, dict):
        return
    tier = info.get("isolation")
    if isinstance(tier, str) and tier:
        out.append(tier)
    for sub in (info.get("component_info") or {}).values():  # a mixture nests its components' info
        _tiers_in(sub, out)


def sandbox_tier_counts(infos: list[dict]) -> dict[str, float]:
    """`reward/sandbox_<tier>`: how many sandboxed runs of this step's samples ran at each tier (a code reward
    records its tier as info["isolation"]; mixtures nest it under "component_info"). Empty when no reward of
    the step ran code, so runs without code rewards log nothing new. Any tier other than the one the run
    pinned would be a bug: the counts make that visible in metrics.jsonl."""
    seen: list[str] = []
    for info in infos or []:
        _tiers_in(info, seen)
    if not seen:
        return {}
    names = list(TIERS) + sorted(set(seen) - set(TIERS))  # an unexpected value ("none") is counted, not hidden
    return {f"reward/sandbox_{t}": float(seen.count(t)) for t in names}
