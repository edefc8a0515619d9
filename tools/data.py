"""Where the TARA caches live and a small loader shared by the cache backends."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from align.errors import UserError

TARA_ENV = "ALIGN_TARA_DIR"

_loaded: dict[str, object] = {}
_lock = threading.Lock()


def tara_dir(root: str | os.PathLike | None = None) -> Path:
    """The folder holding the TARA data: `root` when given, else $ALIGN_TARA_DIR.

    Raises UserError (one line naming both fixes) when neither is given or the path is not a folder; nothing
    is guessed from where the package is installed.
    """
    env = os.environ.get(TARA_ENV)
    path = root if root is not None else env
    if path is not None and str(path) and Path(path).is_dir():
        return Path(path)
    where = (f"{root} is not a folder" if root is not None else
             f"${TARA_ENV}={env} is not a folder" if env else f"no root given and ${TARA_ENV} is not set")
    raise UserError(f"TARA data not found ({where}): pass root=... or set {TARA_ENV}=/path/to/tara")


def optional_tara_dir() -> Path | None:
    """tara_dir() or None: for the tools' default caches, which fall back to their HTTP backend without TARA."""
    try:
        return tara_dir()
    except UserError:
        return None


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


__all__ = ["TARA_ENV", "tara_dir", "optional_tara_dir", "load_json", "load_jsonl"]
