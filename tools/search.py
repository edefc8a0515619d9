"""Search tools: `google_serper` (Serper HTTP API) and `wiki_search` (local BM25 over a user-given corpus with
bm25s, or an HTTP retrieval server answering {"topk": [{"text": ...}]} like Themis's ColBERT endpoint)."""
from __future__ import annotations

import threading
from pathlib import Path

from align.tools.base import Tool, ToolError
from align.tools.data import load_jsonl
from align.tools.http_client import HTTPConfig, request_json


# ------------------------------------------------------------------------------------------------ serper
def serper_snippets(results: dict, k: int = 10) -> str:
    """Join the answer box, knowledge graph and top-k organic snippets of a Serper response (Themis's format)."""
    box = results.get("answerBox") or {}
    if box.get("answer"):
        return str(box["answer"])
    if box.get("snippet"):
        return str(box["snippet"]).replace("\n", " ")
    if box.get("snippetHighlighted"):
        hl = box["snippetHighlighted"]
        return " ".join(hl) if isinstance(hl, list) else str(hl)
    out: list[str] = []
    kg = results.get("knowledgeGraph") or {}
    if kg:
        title = kg.get("title")
        if kg.get("type"):
            out.append(f"{title}: {kg['type']}.")
        if kg.get("description"):
            out.append(kg["description"])
        for attr, value in (kg.get("attributes") or {}).items():
            out.append(f"{title} {attr}: {value}.")
    for item in (results.get("organic") or [])[:k]:
        if "snippet" in item:
            out.append(item["snippet"])
        for attr, value in (item.get("attributes") or {}).items():
            out.append(f"{attr}: {value}.")
    return " ".join(out) if out else "No good Google Search Result was found"


class GoogleSerper(Tool):
    name = "google_serper"
    description = "Web search; returns the top snippets joined."

    def __init__(self, http: HTTPConfig | None = None, k: int = 10, gl: str = "us", hl: str = "en"):
        self.http = http or HTTPConfig(url="https://google.serper.dev/search", url_env="ALIGN_SERPER_URL",
                                       key_env="SERPER_API_KEY")
        self.k, self.gl, self.hl = k, gl, hl

    def run(self, input: str, context: dict) -> str:
        if not input.strip():
            raise ToolError("empty search query")
        key = self.http.resolved_key()
        if not key:
            raise ToolError("no Serper API key; set SERPER_API_KEY")
        data = request_json(self.http, "POST", headers={"X-API-KEY": key, "Content-Type": "application/json"},
                            json={"q": input.strip(), "num": self.k, "gl": self.gl, "hl": self.hl})
        if not isinstance(data, dict):
            raise ToolError("Serper returned an unexpected payload")
        return serper_snippets(data, self.k)


# ------------------------------------------------------------------------------------------------ local BM25
class LocalSearch:
    """BM25 (bm25s) over passages; `search(query, k)` -> [(passage, score)], best first."""

    def __init__(self, passages: list[str]):
        import bm25s

        if not passages:
            raise ValueError("LocalSearch needs at least one passage")
        self.passages = list(passages)
        self._bm25s = bm25s
        self.index = bm25s.BM25()
        self.index.index(bm25s.tokenize(self.passages, stopwords="en", show_progress=False), show_progress=False)

    @classmethod
    def from_jsonl(cls, path: str | Path, text_key: str = "text", title_key: str | None = "title") -> "LocalSearch":
        """Passages from a JSON Lines file; with a title they read 'Title | text' (Themis's wiki format)."""
        rows = load_jsonl(path)
        return cls([f"{r[title_key]} | {r[text_key]}" if title_key and r.get(title_key) else str(r[text_key])
                    for r in rows])

    def search(self, query: str, k: int = 1) -> list[tuple[str, float]]:
        tokens = self._bm25s.tokenize([query], stopwords="en", show_progress=False)
        if not tokens.ids or not tokens.ids[0]:
            return []
        k = min(k, len(self.passages))
        docs, scores = self.index.retrieve(tokens, k=k, show_progress=False, n_threads=1)
        return [(self.passages[int(i)], float(s)) for i, s in zip(docs[0], scores[0]) if s > 0]


_indexes: dict[str, LocalSearch] = {}
_index_lock = threading.Lock()


class WikiSearch(Tool):
    """corpus: a list of passages or a JSONL path (title/text); or http: a retrieval server
    (GET url?query=..&k=.. -> {"topk": [{"text": ...}]}, URL from $ALIGN_WIKI_SEARCH_URL)."""

    name = "wiki_search"
    description = "Top Wikipedia passage for a query."

    def __init__(self, corpus: list[str] | str | Path | None = None, http: HTTPConfig | None = None, k: int = 1):
        self.corpus, self.k = corpus, k
        self.http = http or HTTPConfig(url_env="ALIGN_WIKI_SEARCH_URL")

    def _index(self) -> LocalSearch | None:
        if self.corpus is None:
            return None
        key = str(self.corpus) if not isinstance(self.corpus, list) else f"list:{id(self.corpus)}"
        with _index_lock:
            if key not in _indexes:
                _indexes[key] = (LocalSearch(self.corpus) if isinstance(self.corpus, list)
                                 else LocalSearch.from_jsonl(self.corpus))
            return _indexes[key]

    def run(self, input: str, context: dict) -> str:
        if not input.strip():
            raise ToolError("empty search query")
        index = self._index()
        if index is not None:
            hits = index.search(input, self.k)
            if not hits:
                raise ToolError(f"no passage matches {input.strip()[:60]!r}")
            return "\n".join(p for p, _ in hits)
        if not self.http.resolved_url():
            raise ToolError("wiki_search has no corpus and no server; pass corpus=... or set ALIGN_WIKI_SEARCH_URL")
        data = request_json(self.http, "GET", params={"query": input.strip(), "k": self.k})
        try:
            topk = data["topk"][: self.k]
            return "\n".join(str(d["text"]) if isinstance(d, dict) else str(d) for d in topk)
        except (KeyError, TypeError):
            raise ToolError("retrieval server returned no 'topk'") from None


__all__ = ["GoogleSerper", "LocalSearch", "WikiSearch", "serper_snippets"]
