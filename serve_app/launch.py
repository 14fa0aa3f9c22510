"""Start a local Ray cluster and deploy a Serve config file (what `make run` does).

`serve run configs/local.yaml` works too; this launcher adds what a laptop needs: it
prepares the model once, starts Ray with `address="local"` (never joining or stopping
someone else's cluster), declares logical CPUs so every replica fits, waits until the
applications are RUNNING and shuts down only what it started.

    python -m serve_app.launch configs/local.yaml [--num-cpus 8] [--port 8000]
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger("serve_app.launch")

# Local development: Ray's token auth stays off unless the caller turned it on.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def load_config(path: str | Path) -> dict[str, Any]:
    with open(path) as handle:
        return yaml.safe_load(handle)


def app_config(config: dict[str, Any], name: str) -> dict[str, Any]:
    for application in config["applications"]:
        if application["name"] == name:
            return application
    raise KeyError(f"no application named {name!r} in the config")


def prepare_models(config: dict[str, Any]) -> None:
    """Convert the default model before any replica needs it (idempotent)."""
    from serve_app.model_prep import ensure_default_model
    from serve_app.settings import ModelsAppSettings

    for application in config["applications"]:
        if application["import_path"].endswith(":build_models_app"):
            settings = ModelsAppSettings.model_validate(application.get("args") or {})
            if not settings.local_llm.path:
                ensure_default_model(settings.data_dir)


def start_ray(num_cpus: int | None, dashboard: bool = True) -> None:
    import ray

    ray.init(address="local", num_cpus=num_cpus, namespace="serve",
             include_dashboard=dashboard, dashboard_host="127.0.0.1",
             log_to_driver=os.environ.get("LLMSTACK_LOG_TO_DRIVER", "1") == "1")


def shutdown_cluster() -> None:
    """Stop Serve and the local Ray cluster this process started, then anything they left.

    vLLM's engine processes are grandchildren of a replica; when Serve has to kill a replica
    hard they can outlive it (seen here: 3.7 GB orphans), so every process below this one
    is collected first and killed if still alive once Ray is down."""
    import psutil
    import ray
    from ray import serve

    descendants = psutil.Process().children(recursive=True)
    try:
        if ray.is_initialized():
            serve.shutdown()
    finally:
        ray.shutdown()
        _, alive = psutil.wait_procs(descendants, timeout=15)
        for process in alive:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass


def deploy(config: dict[str, Any], *, wait_s: float = 600.0) -> None:
    """Deploy every application of a Serve config (the same path as `serve run`)."""
    from ray.serve._private import api as serve_api
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(copy.deepcopy(config))
    client = serve_api.serve_start(
        http_options=schema.http_options.model_dump(),
        proxy_location=schema.proxy_location,
        grpc_options=gRPCOptions(**schema.grpc_options.model_dump()),
    )
    client.deploy_apps(schema, _blocking=False)
    wait_running([app.name for app in schema.applications], wait_s)


def wait_running(names: list[str], wait_s: float) -> None:
    from ray import serve

    deadline = time.monotonic() + wait_s
    while True:
        status = serve.status()
        states = {name: status.applications.get(name) for name in names}
        if all(s is not None and s.status == "RUNNING" for s in states.values()):
            return
        failed = {n: s.message for n, s in states.items()
                  if s is not None and s.status in ("DEPLOY_FAILED", "UNHEALTHY")}
        if failed:
            raise RuntimeError(f"deployment failed: {failed}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"applications not RUNNING after {wait_s}s: "
                               f"{ {n: (s.status if s else None) for n, s in states.items()} }")
        time.sleep(1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default="configs/local.yaml")
    parser.add_argument("--num-cpus", type=int, default=int(os.environ.get("LLMSTACK_NUM_CPUS", 8)),
                        help="logical CPUs Ray may hand out (more than cores is fine locally)")
    parser.add_argument("--port", type=int, default=None, help="override http_options.port")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    config = load_config(args.config)
    if args.port is not None:
        config.setdefault("http_options", {})["port"] = args.port
    prepare_models(config)
    start_ray(args.num_cpus)

    def stop(*_: Any) -> None:
        logger.info("shutting down")
        shutdown_cluster()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    try:
        deploy(config)
        http = config.get("http_options", {})
        base = f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}"
        logger.info("ready: %s/v1  (dashboard: http://127.0.0.1:8265)", base)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        stop()
    except Exception:
        logger.exception("deployment failed")
        shutdown_cluster()
        sys.exit(1)


if __name__ == "__main__":
    main()
