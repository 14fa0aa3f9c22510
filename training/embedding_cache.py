"""Sentence embeddings for training and benchmarking, cached on disk per text.

Embedding the whole router data set takes minutes on a laptop CPU; the cache makes every
later run (training, benchmark) reuse what was computed once. Keys are SHA-256 prefixes of
the text, under a folder named after the embedding model, so a different model never reads
another's vectors. New vectors are appended as small shard files (.npz, no pickle).
"""
from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

Embed = Callable[[list[str]], np.ndarray]


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class EmbeddingCache:
    def __init__(self, directory: Path, dim: int = 384) -> None:
        self.directory = directory
        self.dim = dim
        self._vectors: dict[str, np.ndarray] = {}
        self._load()

    def _load(self) -> None:
        if not self.directory.is_dir():
            return
        for shard in sorted(self.directory.glob("shard-*.npz")):
            with np.load(shard, allow_pickle=False) as data:
                for key, vector in zip(data["keys"].tolist(), data["vectors"]):
                    self._vectors[str(key)] = vector

    def __len__(self) -> int:
        return len(self._vectors)

    def missing(self, texts: Sequence[str]) -> list[str]:
        seen: set[str] = set()
        out = []
        for text in texts:
            key = text_key(text)
            if key not in self._vectors and key not in seen:
                seen.add(key)
                out.append(text)
        return out

    def fill(self, texts: Sequence[str], embed: Embed, chunk: int = 512,
             progress: Callable[[int, int], None] | None = None) -> int:
        """Embed the texts not cached yet, in chunks, saving a shard after each chunk (an
        interrupted run keeps what it finished). Returns how many were embedded."""
        todo = self.missing(texts)
        for start in range(0, len(todo), chunk):
            part = todo[start:start + chunk]
            vectors = np.asarray(embed(part), dtype=np.float32)
            self._save_shard([text_key(t) for t in part], vectors)
            if progress is not None:
                progress(min(start + chunk, len(todo)), len(todo))
        return len(todo)

    def get(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            out[i] = self._vectors[text_key(text)]
        return out

    def _save_shard(self, keys: list[str], vectors: np.ndarray) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"shard-{time.time_ns()}.npz"
        tmp = self.directory / (name + ".tmp.npz")
        np.savez(tmp, keys=np.asarray(keys, dtype="U32"), vectors=vectors)
        tmp.rename(self.directory / name)
        for key, vector in zip(keys, vectors):
            self._vectors[key] = vector


def cache_dir(data_dir: Path, model_name: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", model_name)
    return data_dir / "cache" / "router-embeddings" / safe
