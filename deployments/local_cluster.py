"""A local Ray cluster running the stack on a free port, for tests and benchmarks.

The `models` app (vLLM + embedder) is deployed once; the `stack` app can be redeployed
with other settings. Deploys go through the same Serve config file and code path as
`make run` (configs/local.yaml -> deployments.launch.deploy). Serve keeps an unchanged
application's replicas on redeploy, so vLLM starts once per session.
"""
from __future__ import annotations

import copy
import os
import socket
import time
from pathlib import Path
from typing import Any

import httpx

from deployments.app import expand_quota_overrides
from deployments.launch import (app_config, deploy, load_config, session_dir, shutdown_cluster,
                                start_ray)
from serve_app.routing.config import ClassifierSettings
from serve_app.settings import PROJECT_ROOT

LOCAL_CONFIG = PROJECT_ROOT / "configs" / "local.yaml"
PROMETHEUS_SD_FILE = "prom_metrics_service_discovery.json"  # ray_constants' name for it


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


class LocalStack:
    __test__ = False

    def __init__(self) -> None:
        self.port = free_port()
        self.base_config = load_config(LOCAL_CONFIG)
        self.base_config["http_options"]["port"] = self.port
        self.current_config: dict[str, Any] | None = None
        self.dashboard_port = free_port()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def prometheus_sd_file(self) -> Path:
        """Ray's file-SD list of this cluster's metrics endpoints (written by the
        dashboard every few seconds once it runs)."""
        found = session_dir()
        if found is None:
            raise RuntimeError("the cluster is not started")
        return found / PROMETHEUS_SD_FILE

    def start(self) -> None:
        # Same private control plane as `make run`: token auth (RAY_AUTH_TOKEN_PATH, or
        # var/secrets/ray_auth_token) and every Ray port on 127.0.0.1.
        os.environ.setdefault("LLMSTACK_LOG_TO_DRIVER", "0")
        # The full dashboard, as under `make run`, on a free port (other clusters on this
        # machine may hold 8265): its reporter writes the Prometheus service-discovery
        # file (`prometheus_sd_file`) that dashboards/prometheus/prometheus.yml reads.
        # Ray's autoscaler and dashboard serve their own metrics on fixed ports (44217,
        # 44227) and list them in that file even when another cluster holds them, or when
        # they became this cluster's GCS port (seen here): free ones, through the
        # variables their processes read at start.
        for variable in ("AUTOSCALER_METRIC_PORT", "DASHBOARD_METRIC_PORT"):
            os.environ[variable] = str(free_port())
        start_ray(num_cpus=8, dashboard_port=self.dashboard_port)

    def deploy_stack(self, data_dir: Path, args: dict[str, Any] | None = None,
                     deployments: dict[str, dict[str, Any]] | None = None,
                     extra_env: dict[str, str] | None = None,
                     extra_stacks: dict[str, tuple[str, dict[str, Any]]] | None = None) -> None:
        """(Re)deploy the stack app with overrides; the models app stays as it is.
        `extra_stacks` adds more stack apps {name: (route_prefix, args overrides)} beside it
        (benchmarks compare two configurations side by side this way)."""
        config = copy.deepcopy(self.base_config)
        stack = app_config(config, "stack")
        # Every stack shares one router model: one trained under var/ if there is one, else
        # the repository's shipped file (test data dirs are empty).
        stack["args"] = deep_merge(stack["args"], {"router": {"classifier": {
            "model_path": str(ClassifierSettings().resolved(PROJECT_ROOT / "var"))}}})
        for name, (prefix, overrides) in (extra_stacks or {}).items():
            extra = copy.deepcopy(stack)
            extra.update(name=name, route_prefix=prefix)
            extra["args"] = deep_merge(extra["args"], {"data_dir": str(data_dir / name),
                                                       **overrides})
            config["applications"].append(extra)
        stack["args"] = deep_merge(stack["args"], {"data_dir": str(data_dir), **(args or {})})
        if extra_env:
            stack.setdefault("runtime_env", {}).setdefault("env_vars", {}).update(extra_env)
        for name, options in (deployments or {}).items():
            entries = {d["name"]: d for d in stack.setdefault("deployments", [])}
            if name in entries:
                entries[name].clear()
                entries[name].update({"name": name, **options})
            else:
                stack["deployments"].append({"name": name, **options})
        for app in config["applications"]:
            if app is stack or app.get("name") in (extra_stacks or {}):
                expand_quota_overrides(app)
        deploy(config, wait_s=900)
        self.current_config = config
        self.wait_ready()

    def wait_ready(self, timeout_s: float = 600) -> None:
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            try:
                response = httpx.get(f"{self.base_url}/readyz", timeout=60)
                if response.status_code == 200:
                    return
                last = response.text
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(1)
        raise TimeoutError(f"stack not ready: {last}")

    def shutdown(self) -> None:
        shutdown_cluster()
