"""Token prices (pure). Counting what a request sends is serve_app.llm.token_count."""
from __future__ import annotations

from pydantic import BaseModel, Field


class Price(BaseModel):
    input_per_mtok: float = Field(0.0, ge=0, description="USD per million input tokens.")
    output_per_mtok: float = Field(0.0, ge=0, description="USD per million output tokens.")

    def cost(self, tokens_in: int, tokens_out: int) -> float:
        return (tokens_in * self.input_per_mtok + tokens_out * self.output_per_mtok) / 1e6

