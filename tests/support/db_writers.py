"""A second process writing to a store, for the concurrent-writer tests:

    python -m tests.support.db_writers ledger <target> <prefix> <n>
    python -m tests.support.db_writers audit <target> <prefix> <n>

<target> is a SQLite path or a postgresql:// URL. Both processes wait for a start file
($DB_WRITERS_GO, after each wrote $DB_WRITERS_GO.ready-<prefix>) so their writes really overlap.
"""
from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path


def wait_for_go(name: str) -> None:
    """Say this writer is ready (its store is open), then wait for the start signal."""
    go = os.environ.get("DB_WRITERS_GO")
    if not go:
        return
    Path(f"{go}.ready-{name}").touch()
    deadline = time.monotonic() + 60
    while not Path(go).exists():
        if time.monotonic() > deadline:
            raise SystemExit("no go signal")
        time.sleep(0.01)


def ledger(target: str, prefix: str, n: int) -> None:
    from serve_app.quota.ledger import UsageLedger, UsageRow

    store = UsageLedger(target if "://" in target else Path(target))
    wait_for_go(prefix)

    async def run() -> None:
        for start in range(0, n, 20):  # bursts: group commits of up to 20 rows
            await asyncio.gather(*(store.append(UsageRow(
                request_id=f"{prefix}-{i}", tenant_id="t", key_id=prefix, route="/v1/x",
                status=200, tokens_in=1, tokens_out=2, cost_usd=0.001))
                for i in range(start, min(n, start + 20))))

    asyncio.run(run())
    store.close()


def audit(target: str, prefix: str, n: int) -> None:
    from serve_app.agent.audit import AuditLog

    log = AuditLog(target if "://" in target else Path(target))
    wait_for_go(prefix)
    for i in range(n):
        log.append(session_id=prefix, call_id=f"{prefix}-{i}", step=i, event="started",
                   tool="python", arguments={"i": i}, decision="auto")
        time.sleep(0.002)  # like real tool calls, spaced: SQLite's busy wait is not fair
    log.close()


if __name__ == "__main__":
    kind, where, name, count = sys.argv[1:5]
    {"ledger": ledger, "audit": audit}[kind](where, name, int(count))
