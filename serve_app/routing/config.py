"""Router settings: remote providers, tier fallback chains, classifier model file, policy.

Secrets are never settings: a provider names the environment variable holding its API key
(`api_key_env`). A provider whose variable is unset is *unavailable*; its hops are skipped
(reason `no_key`) and a tier whose chain has nothing available left falls back to the local
model, so the stack runs offline with no key at all (see `RouterSettings.offline_notes`).
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve_app.quota.pricing import token_cost_usd

LOCAL_TARGET = "local"
TIERS: tuple[str, str, str] = ("small", "medium", "large")
Tier = Literal["small", "medium", "large"]
DEFAULT_MODEL_FILE = "models/router/complexity-v1.json"
# The repository root: it ships models/router/complexity-v1.json (see README, "Router").
SHIPPED_MODELS_ROOT = Path(__file__).resolve().parents[2]

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CircuitBreakerSettings(_Strict):
    failure_threshold: int = Field(
        5, ge=1, description="Consecutive failures (after retries) that open the breaker.")
    reset_s: float = Field(
        30.0, gt=0, description="Seconds the breaker stays open before one half-open probe.")


class RetrySettings(_Strict):
    max_retries: int = Field(
        1, ge=0, le=10, description="Retries per call on retryable errors (connection, "
        "timeout, 408, 429, 5xx); 4xx never retries. Total attempts = max_retries + 1.")
    backoff_base_s: float = Field(0.25, ge=0, description="First backoff; doubles per retry.")
    backoff_max_s: float = Field(4.0, ge=0, description="Cap on one backoff (before jitter).")
    retry_after_cap_s: float = Field(
        10.0, ge=0, description="A provider's Retry-After is honoured up to this many seconds; "
        "a longer wait skips to the next target instead of retrying.")

    @model_validator(mode="after")
    def _max_not_below_base(self) -> "RetrySettings":
        if self.backoff_max_s < self.backoff_base_s:
            raise ValueError("retry.backoff_max_s must be >= retry.backoff_base_s")
        return self


class ProviderSettings(_Strict):
    """One OpenAI-compatible endpoint (OpenAI, Mistral, Anthropic's compatible API, vLLM)."""

    name: str = Field(description="Target name used in tier chains and x-fallback; "
                      "lower-case letters, digits, '.', '_' and '-'.")
    base_url: str = Field(description="OpenAI-compatible base URL, e.g. "
                          "https://api.openai.com/v1 (the SDK appends /chat/completions).")
    model: str = Field(min_length=1, description="Model id sent to the provider.")
    api_key_env: str | None = Field(
        None, description="Name of the environment variable holding the API key (never the "
        "key). None: the endpoint needs no key (a self-hosted vLLM, a test server).")
    price_in_per_mtok: float = Field(0.0, ge=0, description="USD per 1M input tokens.")
    price_out_per_mtok: float = Field(0.0, ge=0, description="USD per 1M output tokens.")
    timeout_s: float = Field(30.0, gt=0, description="Per attempt: whole call, or the wait "
                             "for the first streamed chunk and between chunks.")
    connect_timeout_s: float = Field(5.0, gt=0, description="TCP/TLS connect timeout.")
    tokenizer: Literal["tiktoken", "bytes"] = Field(
        "tiktoken", description="How reservations count this provider's prompt tokens: "
        "'tiktoken' (OpenAI's BPE plus a 10% margin), or 'bytes' (UTF-8 length, a hard upper "
        "bound for any byte-level BPE) when its tokenizer is unknown.")
    retry: RetrySettings = RetrySettings()
    circuit_breaker: CircuitBreakerSettings = CircuitBreakerSettings()

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"provider name {value!r} must match {_NAME.pattern}")
        if value in (LOCAL_TARGET, *TIERS, "auto"):
            raise ValueError(f"provider name {value!r} is reserved; pick another")
        return value

    @field_validator("base_url")
    @classmethod
    def _valid_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"base_url {value!r} must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _env_name_not_key(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_NAME.match(value):
            raise ValueError("api_key_env must be the NAME of an environment variable (e.g. "
                             "OPENAI_API_KEY), never the key itself")
        return value

    def api_key(self, environ: Mapping[str, str] | None = None) -> str | None:
        if self.api_key_env is None:
            return None
        return (environ if environ is not None else os.environ).get(self.api_key_env) or None

    def available(self, environ: Mapping[str, str] | None = None) -> bool:
        return self.api_key_env is None or self.api_key(environ) is not None

    def cost_usd(self, prompt_tokens: int, completion_tokens: int) -> float:
        return token_cost_usd(prompt_tokens, completion_tokens, self.price_in_per_mtok,
                              self.price_out_per_mtok)


class LocalTargetSettings(_Strict):
    """The LocalLLM deployment as a routing target (`local` in chains)."""

    price_in_per_mtok: float = Field(0.0, ge=0, description="Accounting price of local "
                                     "input tokens (0: the hardware is already paid for).")
    price_out_per_mtok: float = Field(0.0, ge=0, description="Same, for output tokens.")
    max_running_requests: int | None = Field(
        None, ge=1, description="LocalLLM counts as overloaded (skip, reason `overloaded`) "
        "above this many running requests; None: never skipped for load.")
    prefer_after_refusal_s: float = Field(
        30.0, ge=0, description="A provider that answered 429 or has an open breaker moves "
        "behind the local target of its chains for its Retry-After, else this long; 0: "
        "chains keep their configured order.")

    def cost_usd(self, prompt_tokens: int, completion_tokens: int) -> float:
        return token_cost_usd(prompt_tokens, completion_tokens, self.price_in_per_mtok,
                              self.price_out_per_mtok)


class TierChains(_Strict):
    small: list[str] = Field(default_factory=lambda: [LOCAL_TARGET, "openai-mini"],
                             description="Targets tried in order for the small tier.")
    medium: list[str] = Field(default_factory=lambda: ["openai-mini", "openai-frontier",
                                                        LOCAL_TARGET])
    large: list[str] = Field(default_factory=lambda: ["openai-frontier", "openai-mini",
                                                       LOCAL_TARGET])

    @field_validator("small", "medium", "large")
    @classmethod
    def _non_empty_unique(cls, chain: list[str]) -> list[str]:
        if not chain:
            raise ValueError("a tier chain needs at least one target ('local' or a provider)")
        if len(set(chain)) != len(chain):
            raise ValueError(f"chain {chain} names a target twice")
        return chain

    def chain(self, tier: str) -> list[str]:
        return list(getattr(self, tier))


class ThresholdSettings(_Strict):
    small_below: float = Field(ge=0, le=1, description="score < small_below -> small.")
    large_from: float = Field(ge=0, le=1, description="score >= large_from -> large; "
                              "between the two -> medium.")

    @model_validator(mode="after")
    def _ordered(self) -> "ThresholdSettings":
        if self.small_below > self.large_from:
            raise ValueError("thresholds need small_below <= large_from")
        return self


class CalibrationSettings(_Strict):
    """How thresholds are derived when none are given: from the calibration rows stored in
    the model file (held-out validation prompts with per-tier correctness labels)."""

    mode: Literal["quality", "share"] = Field(
        "quality", description="quality: cheapest thresholds that keep `keep_quality` of "
        "the large tier's quality; share: fixed shares of traffic per tier.")
    keep_quality: float = Field(0.95, gt=0, le=1, description="quality mode: share of "
                                "the all-large quality to keep.")
    large_share: float = Field(0.3, ge=0, le=1, description="share mode: at most this "
                               "share of requests to large.")
    small_share: float = Field(0.2, ge=0, le=1, description="share mode: this share to "
                               "small (the lowest scores).")
    small_accuracy: float = Field(
        0.25, ge=0, le=1, description="quality mode: expected correctness of the small tier "
        "on the calibration prompts (4-option MMLU), for which there are no labels. 0.25 is "
        "chance, which is what SmolLM2-135M scores (benchmarks/router_benchmark.py).")
    assumed_output_tokens: int = Field(
        256, ge=1, description="Output tokens per request assumed when pricing.")

    @model_validator(mode="after")
    def _shares_fit(self) -> "CalibrationSettings":
        if self.large_share + self.small_share > 1:
            raise ValueError("large_share + small_share must be <= 1")
        return self


class PolicySettings(_Strict):
    auto_alias: str = Field("auto", description="Model name that asks for routing.")
    thresholds: ThresholdSettings | None = Field(
        None, description="Fixed thresholds; None: calibrate from `calibration`.")
    calibration: CalibrationSettings = CalibrationSettings()
    allow_key_overrides: bool = Field(
        True, description="API keys may carry their own thresholds (stricter or looser).")
    explicit_fallback: bool = Field(
        False, description="An explicitly named model (not an alias) may fall back along the "
        "chain of the tier it serves; False: explicit means only that model.")


class ClassifierSettings(_Strict):
    model_path: Path = Field(
        Path(DEFAULT_MODEL_FILE), description="Model file written by "
        "`python -m training.train_router`. A relative path is looked up under data_dir "
        "first (a model trained here, e.g. `--full`), then in the repository, which ships "
        "the default model (models/router/complexity-v1.json), so serving never needs the "
        "training data.")
    reload_check_s: float = Field(
        30.0, ge=0, description="How often the classifier checks the model file for a new "
        "version (a retrain or `--full` upgrade) and reloads it; 0 disables.")

    def resolved(self, data_dir: Path | str) -> Path:
        path = self.model_path
        if path.is_absolute():
            return path
        trained_here = Path(data_dir) / path
        shipped = SHIPPED_MODELS_ROOT / path
        return trained_here if trained_here.is_file() or not shipped.is_file() else shipped


def default_providers() -> list[ProviderSettings]:
    return [
        ProviderSettings(name="openai-mini", base_url="https://api.openai.com/v1",
                         model="gpt-4o-mini", api_key_env="OPENAI_API_KEY",
                         price_in_per_mtok=0.15, price_out_per_mtok=0.60),
        ProviderSettings(name="openai-frontier", base_url="https://api.openai.com/v1",
                         model="gpt-4o", api_key_env="OPENAI_API_KEY",
                         price_in_per_mtok=2.50, price_out_per_mtok=10.00, timeout_s=60),
    ]


class RouterSettings(_Strict):
    """The `router` section of the stack settings."""

    providers: list[ProviderSettings] = Field(default_factory=default_providers)
    tiers: TierChains = TierChains()
    local: LocalTargetSettings = LocalTargetSettings()
    classifier: ClassifierSettings = ClassifierSettings()
    policy: PolicySettings = PolicySettings()

    @model_validator(mode="after")
    def _chains_name_known_targets(self) -> "RouterSettings":
        names = [p.name for p in self.providers]
        if len(set(names)) != len(names):
            raise ValueError(f"provider names must be unique: {names}")
        known = {LOCAL_TARGET, *names}
        for tier in TIERS:
            unknown = [t for t in self.tiers.chain(tier) if t not in known]
            if unknown:
                raise ValueError(f"tiers.{tier} names unknown targets {unknown}; known: "
                                 f"{sorted(known)} (add a provider or use 'local')")
        return self

    def provider(self, name: str) -> ProviderSettings:
        for provider in self.providers:
            if provider.name == name:
                return provider
        raise KeyError(name)

    def target_available(self, target: str, environ: Mapping[str, str] | None = None) -> bool:
        return target == LOCAL_TARGET or self.provider(target).available(environ)

    def resolved_chain(self, tier: str, environ: Mapping[str, str] | None = None) -> list[str]:
        """The tier's configured chain, plus `local` at the end when no configured target
        is available (offline default). Unavailable targets stay in: the fallback walker
        skips them with reason `no_key`, so x-fallback shows the hop."""
        chain = self.tiers.chain(tier)
        if not any(self.target_available(t, environ) for t in chain):
            chain.append(LOCAL_TARGET)
        return chain

    def offline_notes(self, environ: Mapping[str, str] | None = None) -> list[str]:
        """One line per tier whose first choice is unavailable (for the startup log)."""
        notes = []
        for tier in TIERS:
            chain = self.tiers.chain(tier)
            first = next((t for t in chain if self.target_available(t, environ)), None)
            if first != chain[0]:
                missing = [t for t in chain[:chain.index(first)] if t != LOCAL_TARGET] \
                    if first else [t for t in chain if t != LOCAL_TARGET]
                envs = sorted({self.provider(t).api_key_env or "" for t in missing})
                notes.append(f"router: tier {tier} answers from {first or LOCAL_TARGET} "
                             f"because {', '.join(missing)} has no API key "
                             f"(set {', '.join(envs)})")
        return notes

    def target_cost_usd(self, target: str, prompt_tokens: int, completion_tokens: int) -> float:
        pricing = self.local if target == LOCAL_TARGET else self.provider(target)
        return pricing.cost_usd(prompt_tokens, completion_tokens)

    def tier_prices(self) -> dict[str, tuple[float, float]]:
        """Nominal price (in, out per 1M tokens) of each tier: its chain's first target."""
        prices = {}
        for tier in TIERS:
            first = self.tiers.chain(tier)[0]
            pricing = self.local if first == LOCAL_TARGET else self.provider(first)
            prices[tier] = (pricing.price_in_per_mtok, pricing.price_out_per_mtok)
        return prices

    def explicit_targets(self, local_served_name: str) -> dict[str, str]:
        """Request model name -> target: provider names, provider model ids, local name."""
        names: dict[str, str] = {local_served_name: LOCAL_TARGET}
        for provider in self.providers:
            names.setdefault(provider.model, provider.name)
            names[provider.name] = provider.name
        return names
