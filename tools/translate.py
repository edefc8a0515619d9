"""translate(text) -> English: a cache backend (TARA's translate_history.json, keyed by sample id and by
text) and an HTTP backend speaking the LibreTranslate API (POST {q, source, target, api_key})."""
from __future__ import annotations

from pathlib import Path

from align.tools.base import Tool, ToolError
from align.tools.data import load_json, optional_tara_dir
from align.tools.http_client import HTTPConfig, request_json


def _index(raw: dict) -> tuple[dict, dict]:
    """(by id, by source text) from {"id": {"question": src, "answer": translation}} or {"id": translation}."""
    by_id, by_text = {}, {}
    for k, v in raw.items():
        if isinstance(v, dict):
            by_id[k] = v.get("answer", "")
            if v.get("question"):
                by_text[v["question"].strip()] = v.get("answer", "")
        else:
            by_id[k] = str(v)
    return by_id, by_text


_indexes: dict[int, tuple[dict, dict]] = {}


class Translate(Tool):
    name = "translate"
    description = "Translate text into English."

    def __init__(self, cache: dict | str | Path | None = "tara", http: HTTPConfig | None = None,
                 target: str = "en"):
        self.cache = cache
        self.target = target
        self.http = http or HTTPConfig(url_env="ALIGN_TRANSLATE_URL", key_env="ALIGN_TRANSLATE_API_KEY")

    def _indexes(self) -> tuple[dict, dict]:
        if isinstance(self.cache, dict):
            raw = self.cache
        elif self.cache == "tara":
            root = optional_tara_dir()
            f = root / "translate_history.json" if root else None
            raw = load_json(f) if f and f.exists() else {}
        else:
            raw = load_json(self.cache) if self.cache else {}
        key = id(raw)
        if key not in _indexes:
            _indexes[key] = _index(raw)
        return _indexes[key]

    def run(self, input: str, context: dict) -> str:
        if not input.strip():
            raise ToolError("nothing to translate")
        by_id, by_text = self._indexes()
        sid = context.get("id")
        if sid is not None and str(sid) in by_id:
            return by_id[str(sid)]
        if input.strip() in by_text:
            return by_text[input.strip()]
        if not self.http.resolved_url():
            raise ToolError("translation not cached and no backend configured; set ALIGN_TRANSLATE_URL")
        data = request_json(self.http, "POST", json={"q": input, "source": "auto", "target": self.target,
                                                     "format": "text", "api_key": self.http.resolved_key()})
        text = data.get("translatedText") if isinstance(data, dict) else None
        if not isinstance(text, str):
            raise ToolError("translation backend returned no 'translatedText'")
        return text


__all__ = ["Translate"]
