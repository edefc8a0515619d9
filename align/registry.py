"""Registries of pluggable pieces: one `Registry[T]` pattern (tools.registry) for tools, rewards and
advantage estimators. Plug-ins arrive through the entry-point group `align.advantages`."""
from __future__ import annotations

from align import algos
from align.tools.registry import Registry, UnknownNameError

# name -> fn(scores [B], group_size, *, valid=None) -> advantages [B], or a token-level estimator
# (`align.algos.token_level`) fn(scores [B], group_size, *, mask [B, T], valid=None) -> [B, T]
# (see align.algos.advantages)
ADVANTAGES: Registry = Registry("advantage estimator", entry_point_group="align.advantages")
for _name, _fn in algos.ADVANTAGE_ESTIMATORS.items():
    ADVANTAGES.register(_name, _fn)


def register_advantage(name: str, fn=None, *, overwrite: bool = False):
    """Register `fn(scores, group_size, *, valid=None) -> advantages [B]` under `name` (usable as a decorator);
    decorate `fn` with `align.algos.token_level` for `fn(scores, group_size, *, mask, valid=None) -> [B, T]`."""
    return ADVANTAGES.register(name, fn, overwrite=overwrite)


__all__ = ["ADVANTAGES", "Registry", "UnknownNameError", "register_advantage"]
