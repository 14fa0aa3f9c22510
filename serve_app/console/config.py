"""Settings of the operator console (validated once with the stack's settings)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ConsoleSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Serve the operator console under /console.")
    session_ttl_s: int = Field(
        8 * 3600, ge=60, le=7 * 86_400,
        description="A sign-in lasts this long; the key is re-checked on every page.")
    secret_env: str = Field(
        "LLMSTACK_CONSOLE_SECRET", description="Environment variable with the secret that "
        "seals session cookies and signs CSRF tokens; unset: generated once into "
        "<data_dir>/secrets/console.key. Every Gateway replica of a cluster needs the same.")
    secure_cookie: bool = Field(
        False, description="Mark the session cookie Secure (set it when the console is "
        "served over HTTPS, e.g. behind a TLS-terminating load balancer).")
    poll_s: float = Field(2.0, gt=0, le=60,
                          description="How often the approvals page refreshes its list.")
