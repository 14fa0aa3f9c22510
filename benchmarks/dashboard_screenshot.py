"""Screenshots of the Ray dashboard (Serve and Cluster pages) from a real headless Chromium
(Debian's `chromium`, driven by playwright), signed in with Ray's token as the dashboard's
own cookie. The load benchmark takes them in the middle of its cluster run.

    python -m benchmarks.dashboard_screenshot http://127.0.0.1:8265 [--out DIR]
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from urllib.parse import urlparse

from benchmarks.common import RESULTS_DIR

# The cookie Ray's dashboard reads the token from (ray/_private/authentication).
TOKEN_COOKIE = "ray-authentication-token"
PAGES = {"serve": "/#/serve", "cluster": "/#/cluster"}


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def take(dashboard_url: str, token: str, out_dir: Path,
         prefix: str = "dashboard") -> list[Path]:
    """One PNG per page; [] when no Chromium is installed (`make bench-load` installs it)."""
    executable = chromium_path()
    if executable is None:
        print("no chromium: dashboard screenshots skipped", file=sys.stderr)
        return []
    from playwright.sync_api import sync_playwright

    out_dir.mkdir(parents=True, exist_ok=True)
    saved = []
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=executable, headless=True,
                                         args=["--no-sandbox"])
        try:
            context = browser.new_context(viewport={"width": 1600, "height": 1000})
            host = urlparse(dashboard_url).hostname or "127.0.0.1"
            if token:
                context.add_cookies([{"name": TOKEN_COOKIE, "value": token, "domain": host,
                                      "path": "/"}])
            page = context.new_page()
            for name, fragment in PAGES.items():
                page.goto(f"{dashboard_url}{fragment}", wait_until="networkidle",
                          timeout=60_000)
                page.wait_for_timeout(4_000)  # the tables fill from periodic API calls
                path = out_dir / f"{prefix}_{name}.png"
                page.screenshot(path=str(path), full_page=True)
                saved.append(path)
        finally:
            browser.close()
    return saved


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dashboard_url")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()
    from deployments.multinode import ray_auth_headers

    token = ray_auth_headers().get("Authorization", "").removeprefix("Bearer ")
    print(take(args.dashboard_url, token, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
