"""Shared benchmark helpers: results as JSON, medians, a stack on a free port."""
from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def write_result(name: str, payload: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    payload = {"benchmark": name, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "machine": {"python": platform.python_version(), "cpu_count": _cpus()}, **payload}
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return float(ordered[index])


BENCH_ADMIN_KEY = "bench-admin-key-" + "0" * 16


def start_stack(stack_args: dict[str, Any] | None = None,
                extra_stacks: dict[str, tuple[str, dict[str, Any]]] | None = None,
                deployments: dict[str, dict[str, Any]] | None = None,
                data_dir: Path | None = None, tenant: str = "bench") -> tuple[Any, str]:
    """A local cluster with the stack deployed on a free port, plus an API key for it.
    The admin key reaches the replicas through the inherited environment."""
    import os
    import tempfile

    import httpx

    from deployments.local_cluster import LocalStack

    os.environ["LLMSTACK_ADMIN_KEY"] = BENCH_ADMIN_KEY
    stack = LocalStack()
    stack.start()
    data_dir = data_dir or Path(tempfile.mkdtemp(prefix="bench-"))
    stack.deploy_stack(data_dir, stack_args or {}, deployments=deployments,
                       extra_stacks=extra_stacks)
    stack.data_dir = data_dir
    response = httpx.post(f"{stack.base_url}/admin/v1/keys", json={"tenant_id": tenant},
                          headers={"authorization": f"Bearer {BENCH_ADMIN_KEY}"}, timeout=60)
    response.raise_for_status()
    return stack, response.json()["key"]
