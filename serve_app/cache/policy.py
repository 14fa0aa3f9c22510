"""What may be cached, and under which key (pure; no Ray, no I/O).

A request is looked up in two parts:

- the **query text**, the last user message: it is embedded and matched by similarity
  (and by an exact hash of its normalised form);
- the **scope key**, a hash of everything else that shapes the answer, matched exactly:
  the requested model, the namespace, every earlier message (system prompt and previous
  turns, so the full conversation takes part in the match) and every request parameter
  except the few that cannot change the answer (stream, user, ...). Unknown extra
  parameters are part of the scope: an unknown knob is assumed to change the answer.

Not cacheable by default: sampled requests (an explicit temperature > 0) unless the
settings or the key opt in, requests with tools, and n > 1. A request that sets no
temperature is cacheable (`cache.unset_temperature: cache`; 'sampled' counts it as
OpenAI's 1.0): otherwise clients on the SDK's defaults, the FAQ traffic the cache exists
for, never hit. Unset and 0 are separate scopes (parameters are part of the scope key).
Per request: `cache: {"no_cache", "no_store", "ttl", "threshold", "namespace"}` in the
body (OpenAI SDK `extra_body`) and `Cache-Control: no-cache | no-store` headers.
"""
from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serve_app.cache.config import DEFAULT_NAMESPACE, NAMESPACE_PATTERN, CacheSettings
from serve_app.errors import ApiError, param_from_location

SCOPE_VERSION = 1
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default when a request sets none
# Request fields that cannot change the answer's content.
_NOT_IN_SCOPE = frozenset({"messages", "model", "stream", "stream_options", "user", "cache",
                           "metadata", "store", "service_tier", "n"})
# Plain string code, no regex: `[\s?.!]+$` backtracked quadratically over "!!...!x".
# str.split() splits on exactly the whitespace `\s` matches; after " ".join(...) the only
# whitespace left is " ", so this strips what `[\s?.!]+$` did.
_TRAILING_PUNCTUATION = "?.! "


class RequestCacheControl(BaseModel):
    """The body's `cache` object."""

    model_config = ConfigDict(extra="forbid")

    no_cache: bool = Field(False, description="Do not answer from the cache.")
    no_store: bool = Field(False, description="Do not store this answer.")
    ttl: float | None = Field(None, gt=0, description="Lifetime of the stored answer, s.")
    threshold: float | None = Field(None, gt=0, le=1, description="Similarity needed.")
    namespace: str | None = Field(None, pattern=NAMESPACE_PATTERN)


@dataclass(frozen=True)
class CacheDecision:
    """What to do with one request; `to_dict()` travels to the SemanticCache deployment."""

    lookup: bool
    store: bool
    reason: str | None  # why lookup or store is off ("temperature", "no_cache", ...)
    query_text: str  # embed this
    prompt_hash: str
    scope_key: str
    namespace: str
    model: str  # the requested model (may be "auto")
    semantic: bool  # similarity matching allowed (else exact hash only)
    ttl_s: float | None = None  # per-request override
    threshold: float | None = None  # per-request override

    @property
    def cacheable(self) -> bool:
        return self.lookup or self.store

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> "CacheDecision":
        known = {name: value[name] for name in cls.__dataclass_fields__ if name in value}
        return cls(**known)


def plan_cache(request: Mapping[str, Any], headers: Mapping[str, str] | None,
               settings: CacheSettings, *, allow_sampled: bool = False) -> CacheDecision:
    """Decide lookup/store for one chat request (`ChatCompletionRequest.model_dump()`).

    allow_sampled: the caller's key opted in to caching temperature > 0.
    Raises ApiError(422) when the body's `cache` object is invalid.
    """
    control = parse_cache_control(request.get("cache"))
    no_cache, no_store = _header_directives(headers or {})
    namespace = control.namespace or DEFAULT_NAMESPACE
    model = str(request.get("model") or "")
    messages = list(request.get("messages") or [])
    last = messages[-1] if messages else {}
    query = query_text(message_text(last)) if last.get("role") == "user" else ""
    scope = scope_key(request, namespace)
    base = dict(query_text=query, prompt_hash=prompt_hash(query) if query else "",
                scope_key=scope, namespace=namespace, model=model,
                semantic=0 < len(query) <= settings.semantic_max_chars,
                ttl_s=min(control.ttl, settings.max_ttl_s) if control.ttl else None,
                threshold=_request_threshold(control.threshold, settings))

    blocked = _not_cacheable(request, last, settings, allow_sampled)
    if blocked is not None:
        return CacheDecision(lookup=False, store=False, reason=blocked, **base)
    lookup = not (control.no_cache or no_cache)
    store = not (control.no_store or no_store)
    reason = None if lookup and store else ("no_cache" if not lookup else "no_store")
    return CacheDecision(lookup=lookup, store=store, reason=reason, **base)


def parse_cache_control(value: Any) -> RequestCacheControl:
    if value is None:
        return RequestCacheControl()
    if not isinstance(value, Mapping):
        raise ApiError(422, "`cache` must be an object such as {\"no_cache\": true}.",
                       code="invalid_cache_control", param="cache")
    try:
        return RequestCacheControl.model_validate(dict(value))
    except ValidationError as exc:
        first = exc.errors()[0]
        param = "cache." + param_from_location(first["loc"])
        raise ApiError(422, f"Invalid {param}: {first['msg']}. Allowed keys: no_cache, "
                       "no_store, ttl (seconds > 0), threshold (0-1], namespace.",
                       code="invalid_cache_control", param=param) from exc


def _request_threshold(value: float | None, settings: CacheSettings) -> float | None:
    if value is None:
        return None
    if value < settings.min_request_threshold:
        raise ApiError(422, f"cache.threshold must be at least "
                       f"{settings.min_request_threshold}.", code="invalid_cache_control",
                       param="cache.threshold")
    return value


def _header_directives(headers: Mapping[str, str]) -> tuple[bool, bool]:
    lowered = {key.lower(): value for key, value in headers.items()}
    directives = {part.strip().lower().split("=")[0]
                  for part in lowered.get("cache-control", "").split(",") if part.strip()}
    no_cache = "no-cache" in directives or lowered.get("pragma", "").lower() == "no-cache"
    return no_cache, "no-store" in directives


def _not_cacheable(request: Mapping[str, Any], last: Mapping[str, Any],
                   settings: CacheSettings, allow_sampled: bool) -> str | None:
    if not settings.enabled:
        return "disabled"
    if request.get("tools") or request.get("functions"):
        return "tools"
    if int(request.get("n") or 1) > 1:
        return "n"
    temperature = request.get("temperature")
    if temperature is None:
        effective = 0.0 if settings.unset_temperature == "cache" else DEFAULT_TEMPERATURE
    else:
        effective = float(temperature)
    if effective > 0 and not (allow_sampled or settings.allow_temperature):
        return "temperature"
    if last.get("role") != "user":
        return "last_message_not_user"
    if not message_text(last).strip():
        return "empty_prompt"
    return None


def message_text(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, Mapping))


def query_text(text: str) -> str:
    """What is embedded and stored: the message with whitespace runs collapsed."""
    return " ".join(text.split())


def normalize_prompt(text: str) -> str:
    """For the exact-match hash: Unicode NFKC, lower case, single spaces, no end ?.!"""
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(text.split()).rstrip(_TRAILING_PUNCTUATION)


def prompt_hash(text: str) -> str:
    return hashlib.sha256(normalize_prompt(text).encode()).hexdigest()[:32]


def scope_key(request: Mapping[str, Any], namespace: str = DEFAULT_NAMESPACE) -> str:
    """Hash of the model, namespace, earlier messages and answer-shaping parameters."""
    messages = list(request.get("messages") or [])
    context = [_canonical_message(m) for m in messages[:-1]]
    params = {key: value for key, value in request.items()
              if key not in _NOT_IN_SCOPE and value is not None}
    scope = {"v": SCOPE_VERSION, "model": request.get("model"), "namespace": namespace,
             "context": context, "params": params}
    encoded = json.dumps(scope, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(encoded.encode()).hexdigest()[:32]


def _canonical_message(message: Mapping[str, Any]) -> dict[str, Any]:
    canonical = {key: value for key, value in message.items()
                 if key != "content" and value is not None}
    canonical["content"] = message_text(message)
    return canonical
