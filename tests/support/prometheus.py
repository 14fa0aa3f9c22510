"""A real, throwaway Prometheus server for the tests (Debian's `prometheus` package).

`PrometheusServer(sd_file, root)` runs /usr/bin/prometheus on 127.0.0.1 with a free port,
its TSDB under `root`, and the scrape config of dashboards/prometheus/prometheus.yml with
two test changes: the service-discovery file is the test cluster's own (not
/tmp/ray/session_latest, which another cluster on this machine may own) and everything is
scraped every second. `query(promql)` evaluates an instant query over its HTTP API;
`stop()` ends the process it started (by its pid). `make test` installs the package; a
missing binary fails the tests (never skips).
"""
from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from serve_app.settings import PROJECT_ROOT

BINARY_ENV = "LLMSTACK_PROMETHEUS_BIN"  # optional: another prometheus binary
DEFAULT_BINARY = "/usr/bin/prometheus"
SHIPPED_CONFIG = PROJECT_ROOT / "dashboards" / "prometheus" / "prometheus.yml"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape_config(sd_file: Path, interval: str = "1s") -> dict[str, Any]:
    """The shipped scrape config, pointed at `sd_file`, scraping every `interval`."""
    config = yaml.safe_load(SHIPPED_CONFIG.read_text())
    config["global"].update(scrape_interval=interval, evaluation_interval=interval)
    jobs = [job for job in config["scrape_configs"] if job.get("file_sd_configs")]
    if not jobs:
        raise RuntimeError(f"{SHIPPED_CONFIG} has no file_sd_configs job")
    for job in jobs:
        for sd in job["file_sd_configs"]:
            sd["files"] = [str(sd_file)]
            sd["refresh_interval"] = interval
    return config


class PrometheusServer:
    def __init__(self, sd_file: Path, root: Path, *, interval: str = "1s") -> None:
        self.binary = os.environ.get(BINARY_ENV) or DEFAULT_BINARY
        if not os.access(self.binary, os.X_OK):
            raise RuntimeError(f"{self.binary} not found: install Debian's prometheus "
                               "package (`make prometheus`, part of `make test`)")
        self.root = root
        self.port = _free_port()
        self.config_file = root / "prometheus.yml"
        self.log_file = root / "prometheus.log"
        self.config_file.write_text(yaml.safe_dump(scrape_config(sd_file, interval)))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60) -> "PrometheusServer":
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(
                [self.binary, f"--config.file={self.config_file}",
                 f"--storage.tsdb.path={self.root / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}",
                 "--storage.tsdb.retention.time=1d", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited ({self.process.returncode}): "
                                   + self.log_file.read_text()[-2000:])
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError("prometheus did not become ready")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)

    def __enter__(self) -> "PrometheusServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ HTTP API
    def _get(self, path: str, **params: Any) -> Any:
        response = httpx.get(f"{self.url}{path}", params=params, timeout=30)
        body = response.json()
        if body.get("status") != "success":
            raise RuntimeError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query: its vector's series ({"metric": labels, "value": [t, v]})."""
        data = self._get("/api/v1/query", query=promql)
        if data["resultType"] != "vector":
            raise RuntimeError(f"{promql}: a {data['resultType']}, not a vector")
        return data["result"]

    def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets (scrapeUrl, health, lastError)."""
        return self._get("/api/v1/targets", state="active")["activeTargets"]

    def series_names(self, prefix: str) -> set[str]:
        """Metric names scraped so far that start with `prefix`."""
        return {name for name in self._get("/api/v1/label/__name__/values")
                if name.startswith(prefix)}
