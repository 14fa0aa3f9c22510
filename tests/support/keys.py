"""Admin-API helpers for tests (real HTTP against the deployed stack)."""
from __future__ import annotations

from typing import Any

import httpx

TEST_ADMIN_KEY = "test-admin-key-0123456789abcdef"
ADMIN_ENV = {"LLMSTACK_ADMIN_KEY": TEST_ADMIN_KEY}


def admin_client(base_url: str) -> httpx.Client:
    return httpx.Client(base_url=base_url, timeout=60,
                        headers={"authorization": f"Bearer {TEST_ADMIN_KEY}"})


def create_key(base_url: str, tenant: str = "tests", **fields: Any) -> dict[str, Any]:
    with admin_client(base_url) as client:
        response = client.post("/admin/v1/keys", json={"tenant_id": tenant, **fields})
        response.raise_for_status()
        return response.json()
