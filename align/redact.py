"""Secrets never reach disk: `redact_secrets` replaces the value of every secret-like key (token, secret,
password, api key, credential, ...) in a config before it is saved (checkpoints/step-N/align_config.json).

A resumed run takes its secrets from its own config or the environment ($ALIGN_REWARD_TOKEN), never from a
checkpoint, so nothing needs them back.
"""
from __future__ import annotations

import re
from typing import Any

REDACTED = "<redacted>"
# matched against each key's name; `max_new_tokens` & co. are counts, not secrets (a token *count* is a number)
_SECRET_KEY = re.compile(r"(^|_)(token|secret|password|passwd|api_?key|credentials?|auth)($|_)", re.IGNORECASE)


def is_secret_key(key: str) -> bool:
    return bool(_SECRET_KEY.search(str(key)))


def redact_secrets(value: Any) -> Any:
    """A copy of `value` (dicts / lists) with every non-empty string under a secret-like key replaced."""
    if isinstance(value, dict):
        return {k: REDACTED if is_secret_key(k) and isinstance(v, str) and v else redact_secrets(v)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_secrets(v) for v in value]
    return value
