"""Start a local Ray cluster and deploy a Serve config file (what `make run` does).

`serve run configs/local.yaml` works too; this launcher adds what a laptop needs: it
prepares the model once, starts Ray with `address="local"` (never joining or stopping
someone else's cluster), declares logical CPUs so every replica fits, waits until the
applications are RUNNING and shuts down only what it started.

Ray's control plane (GCS, raylet, dashboard, job API) is private: every Ray port binds
127.0.0.1 and needs the token in <data_dir>/secrets/ray_auth_token (created once, mode 0600;
`RAY_AUTH_TOKEN_PATH` or `RAY_AUTH_TOKEN` choose another). The Serve HTTP port is the data
plane: the gateway's API keys protect it, Ray's token does not apply there.

Ctrl-C (SIGINT to the whole process group), SIGTERM or SIGHUP stop it within ~30 s; what
Ray leaves behind is then killed by pid.

    python -m deployments.launch configs/local.yaml [--num-cpus 8] [--port 8000]
                                                  [--dashboard-port 8265]
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from serve_app.secrets_store import ensure_ray_auth_token, read_or_create_ray_auth_token

logger = logging.getLogger("deployments.launch")

LOOPBACK = "127.0.0.1"
DEFAULT_DASHBOARD_PORT = 8265
# Whole shutdown budget; the last KILL_S of it are kept for killing survivors by pid.
SHUTDOWN_TIMEOUT_S = 25.0
KILL_S = 5.0

# Before `import ray` anywhere in this process: Ray reads these once, at import.
os.environ.setdefault("RAY_AUTH_MODE", "token")


class StopRequested(Exception):
    """A stop signal arrived while the launcher was still deploying."""


@dataclass
class _Cluster:
    """The local cluster start_ray started in this process."""

    session_dir: str


_cluster: _Cluster | None = None
_shutdown_lock = threading.Lock()
_stop_handler: Callable[[int, Any], None] | None = None


def load_config(path: str | Path) -> dict[str, Any]:
    with open(path) as handle:
        return yaml.safe_load(handle)


def app_config(config: dict[str, Any], name: str) -> dict[str, Any]:
    for application in config["applications"]:
        if application["name"] == name:
            return application
    raise KeyError(f"no application named {name!r} in the config")


def config_data_dir(config: dict[str, Any]) -> Path:
    """The data dir of the config's first application that names one (default ./var)."""
    from serve_app.settings import resolve_data_dir

    for application in config.get("applications", []):
        data_dir = (application.get("args") or {}).get("data_dir")
        if data_dir:
            return resolve_data_dir(data_dir)
    return resolve_data_dir("var")


def prepare_models(config: dict[str, Any]) -> None:
    """Convert the default model before any replica needs it (idempotent)."""
    from serve_app.model_prep import ensure_default_model
    from serve_app.settings import ModelsAppSettings

    for application in config["applications"]:
        if application["import_path"].endswith(":build_models_app"):
            settings = ModelsAppSettings.model_validate(application.get("args") or {})
            if not settings.local_llm.path:
                ensure_default_model(settings.data_dir)


def ray_control_plane_env(data_dir: Path) -> dict[str, str]:
    """Environment that makes a local Ray cluster private: token auth and loopback ports.

    The caller's RAY_AUTH_MODE / RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH win; the default is
    token mode with <data_dir>/secrets/ray_auth_token, created here if it is missing. Every
    process of the cluster inherits this environment (workers, the job API's drivers, the
    `ray`/`serve` CLIs run under make), so they all agree with the cluster."""
    env = {"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE") or "token",
           # On Linux Ray replaces a loopback --node-ip-address with the host's routable IP
           # and then binds GCS, raylet, object manager, workers and agents to all
           # interfaces. Its single-machine mode (the macOS/Windows default) keeps
           # 127.0.0.1, so every one of those ports binds loopback only.
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    if env["RAY_AUTH_MODE"].lower() == "token" and not os.environ.get("RAY_AUTH_TOKEN"):
        path = os.environ.get("RAY_AUTH_TOKEN_PATH")
        if path:
            read_or_create_ray_auth_token(Path(path))
        else:
            path = str(ensure_ray_auth_token(data_dir))
        env["RAY_AUTH_TOKEN_PATH"] = path
    return env


def _apply_control_plane_env(data_dir: Path) -> None:
    env = ray_control_plane_env(data_dir)
    os.environ.update(env)
    if env["RAY_AUTH_MODE"].lower() != "token":
        logger.warning("Ray token auth is off (RAY_AUTH_MODE=%s): anyone who can reach "
                       "Ray's ports can run code as this user", env["RAY_AUTH_MODE"])
    # Ray caches both settings at import; refresh them if something imported it already.
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False
    if "ray._raylet" in sys.modules:
        from ray._raylet import (AuthenticationMode, AuthenticationTokenLoader, Config,
                                 get_authentication_mode)

        want_token = env["RAY_AUTH_MODE"].lower() == "token"
        if (get_authentication_mode() == AuthenticationMode.TOKEN) != want_token:
            Config.initialize("")  # what Ray itself does after it switches RAY_AUTH_MODE
        AuthenticationTokenLoader.instance().reset_cache()  # the token file may be new


def start_ray(num_cpus: int | None, dashboard: bool = True, *,
              dashboard_port: int = DEFAULT_DASHBOARD_PORT,
              data_dir: Path | None = None) -> None:
    """Start a new local Ray cluster in this process, private to this machine and user."""
    global _cluster
    from serve_app.settings import resolve_data_dir

    _apply_control_plane_env(data_dir or resolve_data_dir("var"))
    import ray

    context = ray.init(address="local", num_cpus=num_cpus, namespace="serve",
                       _node_ip_address=LOOPBACK, include_dashboard=dashboard,
                       dashboard_host=LOOPBACK, dashboard_port=dashboard_port,
                       log_to_driver=os.environ.get("LLMSTACK_LOG_TO_DRIVER", "1") == "1")
    _cluster = _Cluster(session_dir=context.address_info["session_dir"])


def session_dir() -> Path | None:
    """The session directory of the cluster start_ray started here (Ray's logs, and the
    Prometheus service-discovery file the dashboard writes there); None if none runs."""
    return Path(_cluster.session_dir) if _cluster is not None else None


class _ProcessTracker:
    """Processes of the local cluster, found by pid, never by name.

    Ray's workers and vLLM's engine processes are our descendants only while the raylet
    and the replica that started them live; once those die they are re-parented and can
    outlive everything (seen here: 3.7 GB vLLM orphans). So the tree is collected before
    each step that kills part of it, plus every process of this user whose command line or
    environment names this cluster's session dir."""

    def __init__(self, session_dir: str | None) -> None:
        import psutil

        self._me = psutil.Process()
        self._session_dir = session_dir
        self._procs: dict[tuple[int, float], psutil.Process] = {}

    def collect(self) -> None:
        import psutil

        found = []
        try:
            found.extend(self._me.children(recursive=True))
        except psutil.Error:
            pass
        if self._session_dir:
            found.extend(self._session_processes())
        for process in found:
            try:
                self._procs.setdefault((process.pid, process.create_time()), process)
            except psutil.Error:
                pass

    def _session_processes(self) -> list[Any]:
        import psutil

        uid = os.getuid()
        marker = self._session_dir or ""
        matches = []
        for process in psutil.process_iter(["cmdline", "uids"]):
            try:
                if process.pid == self._me.pid or process.info["uids"].real != uid:
                    continue
                if marker in " ".join(process.info["cmdline"] or ()) or any(
                        marker in value for value in process.environ().values()):
                    matches.append(process)
            except (psutil.Error, OSError):
                continue
        return matches

    def alive(self) -> list[Any]:
        import psutil

        alive = []
        for process in self._procs.values():
            try:
                # is_running() also compares the start time, so a reused pid is not ours.
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    alive.append(process)
            except psutil.Error:
                pass
        return alive

    def kill_all(self, deadline: float) -> list[Any]:
        """SIGTERM what is left, SIGKILL it after a short grace; returns what survived."""
        import psutil

        self.collect()
        alive = self.alive()
        if not alive:
            return []
        logger.info("stopping %d leftover process(es) of the local cluster", len(alive))
        for process in alive:
            try:
                process.terminate()
            except psutil.Error:
                pass
        grace = max(0.5, min(2.0, deadline - time.monotonic()))
        _, alive = psutil.wait_procs(alive, timeout=grace)
        for process in alive:
            try:
                process.kill()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(alive, timeout=1.0)
        return [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def _stop_gracefully(tracker: _ProcessTracker) -> None:
    """Serve first (replicas stop their vLLM engines), then Ray. Runs in its own thread:
    either call can block on a GCS that is already gone."""
    import ray
    from ray import serve

    try:
        if ray.is_initialized():
            serve.shutdown()
    except Exception as exc:  # noqa: BLE001 - a dead controller must not stop the rest
        logger.warning("serve.shutdown failed: %s", exc)
    tracker.collect()  # workers are still our descendants while the raylet lives
    try:
        ray.shutdown()
    except Exception as exc:  # noqa: BLE001
        logger.warning("ray.shutdown failed: %s", exc)


def shutdown_cluster(timeout_s: float = SHUTDOWN_TIMEOUT_S) -> bool:
    """Stop Serve and the local Ray cluster this process started, then anything they left.

    Idempotent and bounded: a second call (another signal, an exception handler, atexit)
    returns at once, and the whole stop takes at most `timeout_s`. Returns False when Ray
    did not stop by itself in time or a process survived SIGKILL; the caller should then
    leave with os._exit, since Ray's own atexit hook would block on the same thing."""
    global _cluster
    with _shutdown_lock:
        if "ray" not in sys.modules:
            return True
        import ray

        cluster, _cluster = _cluster, None
        if cluster is None and not ray.is_initialized():
            return True  # nothing started, or stopped already
        deadline = time.monotonic() + timeout_s
        tracker = _ProcessTracker(cluster.session_dir if cluster else None)
        tracker.collect()
        worker = threading.Thread(target=_stop_gracefully, args=(tracker,),
                                  name="llmstack-shutdown", daemon=True)
        worker.start()
        worker.join(max(0.0, deadline - KILL_S - time.monotonic()))
        graceful = not worker.is_alive()
        if not graceful:
            logger.warning("Ray did not stop within %.0f s; killing its processes",
                           timeout_s - KILL_S)
        survivors = tracker.kill_all(deadline)
        if survivors:
            logger.error("processes survived SIGKILL: %s", [p.pid for p in survivors])
        return graceful and not survivors


def install_stop_handlers(stop: threading.Event) -> None:
    """SIGINT, SIGTERM and SIGHUP only set `stop`; the main thread does the shutdown.

    A terminal's Ctrl-C reaches the whole process group, and users press it again: a
    signal must neither raise inside Ray calls (KeyboardInterrupt in the middle of ray.init
    left a half-built core worker that segfaulted on shutdown) nor re-enter or interrupt the
    shutdown, which has its own deadline. One handler, made once; calling this again only
    puts it back where someone replaced it (ray.init sets its own SIGTERM handler)."""
    global _stop_handler
    if _stop_handler is None:
        def handler(signum: int, _frame: Any) -> None:
            name = signal.Signals(signum).name
            if stop.is_set():
                logger.info("%s again: already stopping (at most %.0f s)", name,
                            SHUTDOWN_TIMEOUT_S)
                return
            logger.info("%s: shutting down", name)
            stop.set()

        _stop_handler = handler
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is not _stop_handler:
            signal.signal(signum, _stop_handler)


def deploy(config: dict[str, Any], *, wait_s: float = 600.0,
           stop: threading.Event | None = None) -> None:
    """Deploy every application of a Serve config (the same path as `serve run`)."""
    from ray.serve._private import api as serve_api
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(copy.deepcopy(config))
    if stop is not None and stop.is_set():
        raise StopRequested()
    client = serve_api.serve_start(
        http_options=schema.http_options.model_dump(),
        proxy_location=schema.proxy_location,
        grpc_options=gRPCOptions(**schema.grpc_options.model_dump()),
    )
    client.deploy_apps(schema, _blocking=False)
    wait_running([app.name for app in schema.applications], wait_s, stop=stop)


def wait_running(names: list[str], wait_s: float, *,
                 stop: threading.Event | None = None) -> None:
    from ray import serve

    deadline = time.monotonic() + wait_s
    while True:
        if stop is not None and stop.is_set():
            raise StopRequested()
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
        if stop is not None:
            stop.wait(1.0)
        else:
            time.sleep(1.0)


def _exit(code: int, clean: bool) -> None:
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    if not clean:
        # Ray's atexit hook would wait on the same stuck GCS/raylet connection.
        os._exit(code)
    sys.exit(code)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default="configs/local.yaml")
    parser.add_argument("--num-cpus", type=int, default=int(os.environ.get("LLMSTACK_NUM_CPUS", 8)),
                        help="logical CPUs Ray may hand out (more than cores is fine locally)")
    parser.add_argument("--port", type=int, default=None, help="override http_options.port")
    parser.add_argument("--dashboard-port", type=int, default=DEFAULT_DASHBOARD_PORT,
                        help="Ray dashboard and job API port (on 127.0.0.1)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    config = load_config(args.config)
    if args.port is not None:
        config.setdefault("http_options", {})["port"] = args.port
    data_dir = config_data_dir(config)
    prepare_models(config)

    stop = threading.Event()
    code = 0
    install_stop_handlers(stop)
    try:
        start_ray(args.num_cpus, dashboard_port=args.dashboard_port, data_dir=data_dir)
        install_stop_handlers(stop)  # ray.init replaced the SIGTERM handler
        deploy(config, stop=stop)
        http = config.get("http_options", {})
        base = f"http://{http.get('host', LOOPBACK)}:{http.get('port', 8000)}"
        logger.info("ready: %s/v1  (dashboard: http://%s:%d, Ray token: %s)", base, LOOPBACK,
                    args.dashboard_port, os.environ.get("RAY_AUTH_TOKEN_PATH", "from env"))
        while not stop.wait(3600):
            pass
    except StopRequested:
        pass
    except SystemExit:
        pass  # SIGTERM during ray.init: Ray's own handler exits; clean up all the same
    except Exception:
        logger.exception("deployment failed")
        code = 1
    finally:
        install_stop_handlers(stop)
        stop.set()
        started = time.monotonic()
        clean = shutdown_cluster()
        logger.info("stopped in %.1f s", time.monotonic() - started)
    _exit(code, clean)


if __name__ == "__main__":
    main()
