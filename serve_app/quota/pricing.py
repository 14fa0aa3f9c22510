"""Token prices (pure). Counting what a request sends is serve_app.llm.token_count."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class Price(BaseModel):
    input_per_mtok: float = Field(0.0, ge=0, description="USD per million input tokens.")
    output_per_mtok: float = Field(0.0, ge=0, description="USD per million output tokens.")

    def cost(self, tokens_in: int, tokens_out: int) -> float:
        return token_cost_usd(tokens_in, tokens_out, self.input_per_mtok, self.output_per_mtok)


def token_cost_usd(tokens_in: Any, tokens_out: Any, input_per_mtok: float,
                   output_per_mtok: float) -> Any:
    """The one token cost formula (USD; prices per million tokens). Works on numbers and
    numpy arrays alike."""
    return (tokens_in * input_per_mtok + tokens_out * output_per_mtok) / 1e6

