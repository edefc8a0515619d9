"""Which keyword a model's forward takes its KV cache by, across transformers 5.x.

transformers 5.24 renamed the forward argument `past_key_values` to `cache` (the outputs' attribute too; the
engine owns its cache object, updated in place, so it never reads that attribute). The old name still works
there but warns (FutureWarning) and goes away in 5.40, while older 5.x (the GPU images ship 5.17) know only
`past_key_values`. Version numbers say nothing about a custom or `trust_remote_code` model, so we read the
keyword off the forward's own signature, once per model class.
"""
from __future__ import annotations

import inspect
from typing import Any

from align.errors import ConfigError

NEW, OLD = "cache", "past_key_values"
_KEYWORD: dict[type, str] = {}


def _innermost(model: Any) -> Any:
    """The module whose forward names the arguments: PEFT and torch.compile wrappers forward **kwargs."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "get_base_model"):  # peft.PeftModel -> the transformers model
            model = model.get_base_model()
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
    return model


def cache_keyword(model: Any) -> str:
    """`cache` when the forward takes it (transformers >= 5.24), else `past_key_values`; cached per class."""
    inner = _innermost(model)
    cls = type(inner)
    keyword = _KEYWORD.get(cls)
    if keyword is None:
        params = inspect.signature(inner.forward).parameters  # follows functools.wraps to the real forward
        if NEW in params:
            keyword = NEW
        elif OLD in params:
            keyword = OLD
        else:
            raise ConfigError(f"{cls.__name__}.forward takes neither `{NEW}` nor `{OLD}`: the rollout engine needs "
                              f"a KV-cached causal LM (an AutoModelForCausalLM)")
        _KEYWORD[cls] = keyword
    return keyword

