"""Token prices and request cost estimates (pure)."""
from __future__ import annotations

from pydantic import BaseModel, Field


class Price(BaseModel):
    input_per_mtok: float = Field(0.0, ge=0, description="USD per million input tokens.")
    output_per_mtok: float = Field(0.0, ge=0, description="USD per million output tokens.")

    def cost(self, tokens_in: int, tokens_out: int) -> float:
        return (tokens_in * self.input_per_mtok + tokens_out * self.output_per_mtok) / 1e6


def estimate_prompt_tokens(texts: list[str]) -> int:
    """A deliberately generous estimate (about 3 characters per token plus per-message
    framing), used only to reserve; settlement uses the model's real count."""
    return sum(len(text) // 3 + 8 for text in texts) + 4
