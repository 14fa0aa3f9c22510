"""Helpers of the store tests that run on both backends."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def run_writers(kind: str, target: Path | str, tmp_path: Path, names: list[str], n: int,
                timeout_s: float = 120) -> None:
    """Start one writer process per name (tests/support/db_writers.py), release them at
    once, and wait; any failure fails the test with its stderr."""
    go = tmp_path / f"go-{kind}-{time.monotonic_ns()}"
    env = {**os.environ, "DB_WRITERS_GO": str(go), "PYTHONPATH": str(PROJECT_ROOT)}
    processes = [subprocess.Popen(
        [sys.executable, "-m", "tests.support.db_writers", kind, str(target), name, str(n)],
        cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name in names]
    try:
        deadline = time.monotonic() + timeout_s
        while not all(Path(f"{go}.ready-{name}").exists() for name in names):
            assert time.monotonic() < deadline, "the writers did not start"
            for process in processes:
                if process.poll() is not None:  # died before it was ready: say why
                    raise AssertionError(process.communicate()[1][-3000:])
            time.sleep(0.01)
        go.touch()
        for process in processes:
            _, err = process.communicate(timeout=timeout_s)
            assert process.returncode == 0, err[-3000:]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
