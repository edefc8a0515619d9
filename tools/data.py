"""Where the TARA caches live and a small loader shared by the cache backends."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

_loaded: dict[str, object] = {}
_lock = threading.Lock()


def tara_dir() -> Path | None:
    """$ALIGN_TARA_DIR, else <repo root>/../shared/data/tara; None when neither exists."""
    env = os.environ.get("ALIGN_TARA_DIR")
    if env:
        return Path(env) if Path(env).is_dir() else None
    default = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tara"
    return default if default.is_dir() else None


def load_json(path: str | os.PathLike) -> object:
    """Load (once per process) a JSON file."""
    key = str(Path(path).resolve())
    with _lock:
        if key not in _loaded:
            with open(key, encoding="utf-8") as fh:
                _loaded[key] = json.load(fh)
        return _loaded[key]


def load_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


__all__ = ["tara_dir", "load_json", "load_jsonl"]
