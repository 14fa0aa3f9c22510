"""Per-session budgets and loop detection (pure: no I/O, no clock of its own).

Every check runs BEFORE the step it guards and answers either "go" (for an LLM call: with
the largest max_tokens that keeps tokens and USD within their limits even in the worst
case) or a `Stop` carrying its reason. Usage is only ever recorded after a step, so a
limit can be reached but never passed (as long as the LLM honours max_tokens and the
configured prices are not lower than the real ones).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from serve_app.agent.config import BudgetLimits
from serve_app.quota.pricing import token_cost_usd

# Stop reasons (stable strings: clients switch on them).
TIMEOUT = "timeout"
MAX_LLM_CALLS = "max_llm_calls"
MAX_TOOL_CALLS = "max_tool_calls"
MAX_TOKENS = "max_tokens"
MAX_USD = "max_usd"
LOOP_DETECTED = "loop_detected"


@dataclass(frozen=True)
class Stop:
    reason: str
    detail: str

    def as_dict(self) -> dict[str, str]:
        return {"reason": self.reason, "detail": self.detail}


@dataclass
class Usage:
    wall_clock_s: float = 0.0
    llm_calls: int = 0
    tool_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usd: float = 0.0
    max_call_usd: float = 0.0  # the dearest LLM call so far

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tokens": self.tokens}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Usage":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass(frozen=True)
class Prices:
    usd_per_million_input: float = 0.0
    usd_per_million_output: float = 0.0

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return token_cost_usd(prompt_tokens, completion_tokens, self.usd_per_million_input,
                              self.usd_per_million_output)


@dataclass
class Budget:
    limits: BudgetLimits
    usage: Usage = field(default_factory=Usage)

    # ------------------------------------------------------------------ checks
    def remaining_s(self, running_s: float = 0.0) -> float:
        return self.limits.wall_clock_s - self.usage.wall_clock_s - running_s

    def check_time(self, running_s: float = 0.0) -> Stop | None:
        if self.remaining_s(running_s) <= 0:
            return Stop(TIMEOUT, f"wall-clock budget of {self.limits.wall_clock_s:g}s used up")
        return None

    def plan_llm_call(self, *, prompt_tokens_bound: int, wanted_max_tokens: int,
                      min_completion_tokens: int, prices: Prices,
                      running_s: float = 0.0) -> int | Stop:
        """The max_tokens this LLM call may use, or why it must not be made."""
        stop = self.check_time(running_s)
        if stop:
            return stop
        if self.usage.llm_calls >= self.limits.max_llm_calls:
            return Stop(MAX_LLM_CALLS, f"{self.limits.max_llm_calls} LLM calls used")
        token_room = self.limits.max_tokens - self.usage.tokens - prompt_tokens_bound
        allowed = min(wanted_max_tokens, token_room)
        if allowed < min_completion_tokens:
            return Stop(MAX_TOKENS, f"token budget {self.limits.max_tokens}: "
                        f"{self.usage.tokens} used, the next prompt may need up to "
                        f"{prompt_tokens_bound}")
        usd_left = self.limits.max_usd - self.usage.usd
        if prices.usd_per_million_output > 0:
            room = usd_left - prices.cost(prompt_tokens_bound, 0)
            allowed = min(allowed, int(room * 1_000_000 / prices.usd_per_million_output))
        # Worst case: the configured prices, or the dearest call seen so far when the
        # provider reports costs the prices do not know about.
        worst = max(prices.cost(prompt_tokens_bound, max(allowed, 0)), self.usage.max_call_usd)
        if allowed < min_completion_tokens or worst > usd_left:
            return Stop(MAX_USD, f"USD budget {self.limits.max_usd:g}: "
                        f"{self.usage.usd:.6f} spent, the next call could cost more")
        return allowed

    def check_tool_call(self, running_s: float = 0.0) -> Stop | None:
        stop = self.check_time(running_s)
        if stop:
            return stop
        if self.usage.tool_calls >= self.limits.max_tool_calls:
            return Stop(MAX_TOOL_CALLS, f"{self.limits.max_tool_calls} tool calls used")
        return None

    # ------------------------------------------------------------------ recording
    def record_llm_call(self, prompt_tokens: int, completion_tokens: int, usd: float) -> None:
        self.usage.llm_calls += 1
        self.usage.prompt_tokens += max(0, int(prompt_tokens))
        self.usage.completion_tokens += max(0, int(completion_tokens))
        self.usage.usd += max(0.0, float(usd))
        self.usage.max_call_usd = max(self.usage.max_call_usd, float(usd))

    def record_tool_call(self) -> None:
        self.usage.tool_calls += 1

    def record_time(self, seconds: float) -> None:
        self.usage.wall_clock_s += max(0.0, seconds)


def clamp_limits(asked: dict[str, Any] | None, default: BudgetLimits,
                 maximum: BudgetLimits) -> BudgetLimits:
    """A client's budget request -> limits (missing fields: default; each capped at max).

    Unknown fields and invalid values raise ValueError with a message for the client."""
    merged = default.model_dump()
    for name, value in (asked or {}).items():
        if name not in merged:
            raise ValueError(f"unknown budget {name!r}; known: {', '.join(merged)}")
        merged[name] = value
    limits = BudgetLimits.model_validate(merged)
    return BudgetLimits.model_validate(
        {name: min(getattr(limits, name), getattr(maximum, name)) for name in merged})


def prompt_tokens_upper_bound(messages: list[dict[str, Any]],
                              tools: list[dict[str, Any]]) -> int:
    """A safe upper bound of the prompt's tokens without a tokenizer.

    Byte-level BPE tokenizers never emit more tokens than UTF-8 bytes, so the bytes of the
    messages and tool schemas, plus per-message template tokens and the tool-call
    instruction, bound what any chat template makes of them."""
    size = len(json.dumps(tools, ensure_ascii=False).encode())
    for message in messages:
        size += 16 + len(json.dumps(message.get("content") or "", ensure_ascii=False).encode())
        for call in message.get("tool_calls") or []:
            size += len(json.dumps(call, ensure_ascii=False).encode())
    return size + 512


class LoopDetector:
    """The same tool with the same arguments asked for `limit` times stops the session.

    Counts live in the session (a dict key -> count) so they survive restarts."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    @staticmethod
    def key(tool: str, arguments: Any) -> str:
        canonical = json.dumps([tool, arguments], sort_keys=True, separators=(",", ":"),
                               ensure_ascii=False, default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:32]

    def observe(self, counts: dict[str, int], tool: str, arguments: Any) -> Stop | None:
        key = self.key(tool, arguments)
        counts[key] = counts.get(key, 0) + 1
        if counts[key] >= self.limit:
            return Stop(LOOP_DETECTED, f"{tool} was asked for {counts[key]} times with the "
                        "same arguments")
        return None
