"""The `retrieval` environment: `search(query)` over a local document collection (BM25).

Local on purpose: a run's rewards must not depend on a web service. The index is built once per
process and file version and shared by every episode.
"""

from __future__ import annotations

import collections
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from slime_rl.rollout.environments import ToolEnvironment, Trajectory, answer_matches, tool_schema

_WORD = re.compile(r"\w+")


class BM25Index:
    """Okapi BM25 over a small in-memory collection (k1=1.5, b=0.75)."""

    def __init__(self, docs: Sequence[str], k1: float = 1.5, b: float = 0.75) -> None:
        self.docs = list(docs)
        self.k1, self.b = k1, b
        self.terms = [collections.Counter(_WORD.findall(d.lower())) for d in self.docs]
        self.lengths = [sum(t.values()) for t in self.terms]
        self.avg = sum(self.lengths) / max(1, len(self.lengths))
        df: collections.Counter[str] = collections.Counter()
        for t in self.terms:
            df.update(t.keys())
        n = len(self.docs)
        self.idf = {w: math.log(1 + (n - f + 0.5) / (f + 0.5)) for w, f in df.items()}

    def search(self, query: str, k: int = 3) -> list[tuple[int, float]]:
        """(doc index, score) of the best `k` documents with a positive score, best first."""
        words = _WORD.findall(query.lower())
        scores = []
        for i, (tf, n) in enumerate(zip(self.terms, self.lengths)):
            s = 0.0
            for w in words:
                f = tf.get(w, 0)
                if f:
                    s += self.idf[w] * f * (self.k1 + 1) / (f + self.k1 * (1 - self.b + self.b * n / self.avg))
            if s > 0:
                scores.append((i, s))
        scores.sort(key=lambda x: (-x[1], x[0]))
        return scores[:k]


_INDEXES: dict[tuple[str, float], BM25Index] = {}


def _load_index(path: str) -> BM25Index:
    """The collection at `path` (JSONL rows with a `text` field, or a .txt file, one document per
    line), indexed once per process and file version."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"retrieval environment: documents={path!r} is not a file (JSONL with a 'text' field, or .txt)")
    key = (str(p.resolve()), p.stat().st_mtime)
    if key not in _INDEXES:
        docs = []
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if not line.strip():
                continue
            if p.suffix == ".txt":
                docs.append(line.strip())
                continue
            try:
                row = json.loads(line)
                docs.append(str(row["text"]) if isinstance(row, dict) else str(row))
            except (ValueError, KeyError) as e:
                raise ValueError(f"retrieval environment: {path}, line {n}: expected a JSON object with a 'text' field ({e})") from None
        if not docs:
            raise ValueError(f"retrieval environment: {path} holds no document")
        _INDEXES[key] = BM25Index(docs)
    return _INDEXES[key]


class RetrievalEnvironment(ToolEnvironment):
    """`search(query)` over a local document collection; reward 1.0 when the final answer matches
    the label (normalised text, or numbers as numbers).

    Args:
        documents: JSONL file with a `text` field per row (or a .txt file, one document a line).
        top_k: documents returned per search.
    """

    tools = [tool_schema("search", "Search the documents.", {"query": {"type": "string"}}, ["query"])]
    tool_methods = {"search": "search"}
    path_kwargs = ("documents",)

    def __init__(self, documents: str, top_k: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if top_k < 1:
            raise ValueError(f"retrieval environment: top_k={top_k} must be >= 1")
        self.index = _load_index(documents)
        self.top_k = top_k

    def search(self, query: str) -> str:
        hits = self.index.search(str(query), self.top_k)
        if not hits:
            return "No document matches."
        return "\n".join(self.index.docs[i] for i, _ in hits)

    async def final_reward(self, trajectory: Trajectory) -> float | None:
        return float(answer_matches(trajectory.final_text, trajectory.prompt.label))
