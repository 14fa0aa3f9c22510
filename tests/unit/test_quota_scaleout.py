"""Admission that scales out, without Ray: batching of concurrent calls, the shard a key
belongs to, and exact limits with several gateways' clients over several Quota shards
(the real Quota shells, called through a fake handle that copies arguments as Ray does)."""
from __future__ import annotations

import asyncio
import pickle
import uuid
from collections import Counter
from typing import Any

import pytest

from serve_app.errors import ApiError
from serve_app.quota.batching import Batcher
from serve_app.quota.sharding import shard_of, shard_of_token

# ---------------------------------------------------------------------------- batching


def test_a_lone_call_goes_out_at_once_and_concurrent_calls_share_a_batch() -> None:
    sent: list[list[int]] = []

    async def send(items: list[int]) -> list[Any]:
        sent.append(list(items))
        await asyncio.sleep(0.01)
        return [item * 2 for item in items]

    async def main() -> None:
        batcher = Batcher(send)
        assert await batcher.submit(1) == 2
        assert sent == [[1]]
        results = await asyncio.gather(*(batcher.submit(i) for i in range(100)))
        assert results == [i * 2 for i in range(100)]

    asyncio.run(main())
    # The first of the 100 goes alone; the other 99 queue behind it and go as one batch.
    assert [len(batch) for batch in sent] == [1, 1, 99]


def test_each_item_gets_its_own_outcome_and_a_failed_batch_fails_all_of_it() -> None:
    async def send(items: list[int]) -> list[Any]:
        if 13 in items:
            raise ConnectionError("replica died")
        return [ApiError(429, "no") if item % 2 else item for item in items]

    async def main() -> None:
        batcher = Batcher(send, max_batch=4)
        outcomes = await asyncio.gather(*(batcher.submit(i) for i in range(4)),
                                        return_exceptions=True)
        assert outcomes[0] == 0 and outcomes[2] == 2
        assert isinstance(outcomes[1], ApiError) and isinstance(outcomes[3], ApiError)
        failed = await asyncio.gather(batcher.submit(12), batcher.submit(13),
                                      return_exceptions=True)
        assert all(isinstance(outcome, ConnectionError) for outcome in failed[1:])
        assert await batcher.submit(2) == 2  # the batcher keeps working afterwards

    asyncio.run(main())


def test_a_caller_that_goes_away_does_not_cancel_the_others() -> None:
    async def send(items: list[int]) -> list[Any]:
        await asyncio.sleep(0.05)
        return items

    async def main() -> None:
        batcher = Batcher(send)
        first = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0)
        second, third = (asyncio.ensure_future(batcher.submit(i)) for i in (2, 3))
        await asyncio.sleep(0.01)
        second.cancel()
        assert await first == 1 and await third == 3
        assert batcher._in_flight == 0 and not batcher._queue

    asyncio.run(main())


def test_batches_are_bounded() -> None:
    sizes: list[int] = []

    async def send(items: list[int]) -> list[Any]:
        sizes.append(len(items))
        await asyncio.sleep(0)
        return items

    async def main() -> None:
        batcher = Batcher(send, max_batch=10)
        await asyncio.gather(*(batcher.submit(i) for i in range(95)))

    asyncio.run(main())
    assert max(sizes) == 10 and sum(sizes) == 95


# ---------------------------------------------------------------------------- sharding


def test_a_key_has_one_stable_owner_and_keys_spread_over_shards() -> None:
    from serve_app.accounts.keys import new_key_id

    ids = [new_key_id() for _ in range(4000)]
    owners = Counter(shard_of(key_id, 4) for key_id in ids)
    assert set(owners) == {0, 1, 2, 3} and min(owners.values()) > 800
    # crc32, not Python's per-process salted hash: the same in every process.
    assert shard_of("AAAAAAAAAAAA", 4) == 2 and shard_of("anything", 1) == 0
    token = f"sk-{ids[0]}_" + "x" * 43
    assert shard_of_token(token, 4) == shard_of(ids[0], 4)
    assert 0 <= shard_of_token("not-a-key", 4) < 4 and shard_of_token(None, 4) in range(4)


# ---------------------------------------------------------------------------- exactness


class _Response:
    """A DeploymentResponse stand-in: arguments cross a copy (as through Ray's object
    store), the call runs as a task on the loop, and it can be cancelled."""

    def __init__(self, method: Any, args: tuple[Any, ...]) -> None:
        copied = pickle.loads(pickle.dumps(args))
        self.task = asyncio.ensure_future(method(*copied))

    def __await__(self):
        return self.task.__await__()

    def cancel(self) -> None:
        self.task.cancel()


class _Handle:
    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.shell, name)
        handle = self

        class _Remote:
            @staticmethod
            def remote(*args: Any) -> _Response:
                handle.calls[name] += 1
                return _Response(method, args)
        return _Remote


@pytest.fixture
def shards(tmp_path, monkeypatch, db_url):
    """Two real Quota shells sharing one database: SQLite files in one data dir, or one
    PostgreSQL database (the `backend` parameter)."""
    import deployments.quota as quota_module
    from serve_app.settings import StackAppSettings

    class NoMetrics:
        def rate_limited(self, *args: Any) -> None: ...
        def settled(self, *args: Any) -> None: ...
        def alert(self, *args: Any) -> None: ...

    monkeypatch.setattr(quota_module, "QuotaMetrics", NoMetrics)
    monkeypatch.setenv("LLMSTACK_ADMIN_KEY", "sk-admin-" + "7" * 24)
    if db_url is not None:
        monkeypatch.setenv("LLMSTACK_TEST_SHARDS_DB", db_url)
    settings = StackAppSettings(data_dir=tmp_path, quota={"shards": 2},
                                database={"url_env": "LLMSTACK_TEST_SHARDS_DB"})
    return [_Handle(quota_module.Quota.func_or_class(settings, shard)) for shard in (0, 1)]


def _clients(handles: list[_Handle], count: int) -> list[Any]:
    from deployments.handles import QuotaClient

    return [QuotaClient(handles, settle_retry_s=0) for _ in range(count)]


async def _burst(clients: list[Any], keys: list[str], per_key: int, *, tokens: int = 10,
                 cost: float = 0.0) -> dict[str, int]:
    """`per_key` concurrent admissions per key, spread over every client (gateway), each
    settled at its reserved size; returns admissions per key."""
    accepted: Counter[str] = Counter()

    async def one(index: int, key: str) -> None:
        client = clients[index % len(clients)]
        request_id = uuid.uuid4().hex
        try:
            admission = await client.admit(api_key=key, model="m", model_known=True,
                                           tokens=tokens, cost_usd=cost,
                                           request_id=request_id)
        except ApiError as error:
            assert error.status == 429, error.message
            return
        accepted[key] += 1
        principal = admission["principal"]
        await client.settle({"request_id": request_id, "tenant_id": principal["tenant_id"],
                             "key_id": principal["key_id"], "route": "/v1/chat/completions",
                             "status": 200, "model": "m", "tokens_in": tokens // 2,
                             "tokens_out": tokens - tokens // 2, "cost_usd": cost})

    await asyncio.gather(*(one(i, key) for key in keys for i in range(per_key)))
    return dict(accepted)


def _create(client: Any, count: int, **limits: Any) -> list[tuple[str, str]]:
    async def create() -> list[tuple[str, str]]:
        made = [await client.create_key("acme", dict(limits)) for _ in range(count)]
        return [(item["key_id"], item["key"]) for item in made]
    return asyncio.run(create())


def test_limits_are_exact_with_two_gateways_over_two_shards(shards) -> None:
    clients = _clients(shards, 2)
    rpm_keys = _create(clients[0], 6, rpm=7)
    tpm_keys = _create(clients[0], 4, tpm=95)  # 9 requests of 10 tokens fit
    budget_keys = _create(clients[0], 4, budget_usd=0.05)  # 5 requests of $0.01 fit
    owners = {shard_of(key_id, 2) for key_id, _ in rpm_keys + tpm_keys + budget_keys}
    assert owners == {0, 1}  # the keys really are spread over both shards

    async def main() -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
        clients_now = _clients(shards, 2)  # fresh batchers on this loop
        rpm = await _burst(clients_now, [key for _, key in rpm_keys], 20)
        tpm = await _burst(clients_now, [key for _, key in tpm_keys], 20)
        budget = await _burst(clients_now, [key for _, key in budget_keys], 20, cost=0.01)
        return rpm, tpm, budget

    rpm, tpm, budget = asyncio.run(main())
    assert sorted(rpm.values()) == [7] * 6
    assert sorted(tpm.values()) == [9] * 4
    assert sorted(budget.values()) == [5] * 4
    # Concurrent admissions travelled in batches: far fewer calls than requests.
    calls = sum(handle.calls["admit_many"] for handle in shards)
    assert calls < (6 * 20 + 4 * 20 + 4 * 20) / 4


def test_a_key_is_only_ever_held_by_its_owner_shard(shards) -> None:
    clients = _clients(shards, 1)
    keys = _create(clients[0], 8, rpm=100)

    async def main() -> None:
        client = _clients(shards, 1)[0]
        await _burst([client], [key for _, key in keys], 3)

    asyncio.run(main())
    for key_id, _ in keys:
        owner = shard_of(key_id, 2)
        assert key_id in shards[owner].shell.service.limiters
        assert key_id not in shards[1 - owner].shell.service.limiters


def test_a_disabled_key_is_refused_on_the_next_request_through_every_gateway(shards) -> None:
    clients = _clients(shards, 3)
    (key_id, key), = _create(clients[0], 1)

    async def main() -> None:
        fresh = _clients(shards, 3)
        for client in fresh:
            await client.admit(api_key=key, model="m", model_known=True, tokens=1,
                               cost_usd=0.0, request_id=uuid.uuid4().hex)
        await fresh[1].call("update_key", key_id, {"disabled": True}, key=key_id)
        for client in fresh:
            with pytest.raises(ApiError) as refused:
                await client.admit(api_key=key, model="m", model_known=True, tokens=1,
                                   cost_usd=0.0, request_id=uuid.uuid4().hex)
            assert refused.value.code == "key_disabled"
        rotated = await fresh[2].call("rotate_key", key_id, 0.0, key=key_id)
        await fresh[0].call("update_key", key_id, {"disabled": False}, key=key_id)
        for client in fresh:
            with pytest.raises(ApiError) as old:
                await client.caller(key, True)
            assert old.value.status == 401
            assert (await client.caller(rotated["key"], True))["key_id"] == key_id

    asyncio.run(main())


def test_lists_and_reports_see_keys_of_every_shard(shards) -> None:
    clients = _clients(shards, 1)
    made = _create(clients[0], 6)

    async def main() -> None:
        for handle in shards:
            listed = await handle.shell.list_keys("acme")
            assert {item["key_id"] for item in listed} == {key_id for key_id, _ in made}

    asyncio.run(main())


# ---------------------------------------------------------------------------- restarts


def test_a_restarted_shard_rebuilds_its_windows_from_the_ledger(tmp_path) -> None:
    from serve_app.accounts.store import AccountStore
    from serve_app.quota.ledger import UsageLedger, UsageRow
    from serve_app.quota.service import QuotaPolicy, QuotaService

    now = [1_800_000_000.0]

    def service() -> QuotaService:
        return QuotaService(AccountStore(tmp_path / "a.db", b"p"), UsageLedger(tmp_path / "u.db"),
                            QuotaPolicy(), "admin", clock=lambda: now[0])

    def admit(quota: QuotaService, key: str, rid: str) -> dict[str, Any]:
        return quota.admit(api_key=key, model="m", model_known=True, tokens=10,
                           cost_usd=0.0, request_id=rid)

    def settle(quota: QuotaService, key_id: str, rid: str) -> None:
        asyncio.run(quota.settle(UsageRow(request_id=rid, tenant_id="t", key_id=key_id,
                                          route="/v1/chat/completions", status=200,
                                          tokens_in=5, tokens_out=5)))

    first = service()
    created = first.create_key("t", rpm=5, tpm=1000)
    key, key_id = created["key"], created["key_id"]
    for index in range(3):
        admit(first, key, f"done-{index}")
        settle(first, key_id, f"done-{index}")
    admit(first, key, "in-flight")  # the shard dies before this one settles
    now[0] += 1

    second = service()  # the restarted shard: same stores, empty memory
    settle(second, key_id, "in-flight")  # the gateway's settle retry lands here
    admit(second, key, "after-restart")
    with pytest.raises(ApiError) as refused:
        admit(second, key, "one-too-many")
    assert refused.value.code == "rate_limit_rpm"  # 3 + 1 + 1 = the limit of 5
    now[0] += 61
    admit(second, key, "next-minute")  # the rebuilt events age out like any others


def test_a_settlement_retried_while_the_first_still_commits_books_once(tmp_path) -> None:
    """The gateway retries a settle whose reply it lost; both may arrive at once."""
    from serve_app.accounts.store import AccountStore
    from serve_app.quota.ledger import UsageLedger, UsageRow
    from serve_app.quota.service import QuotaPolicy, QuotaService

    quota = QuotaService(AccountStore(tmp_path / "a.db", b"p"), UsageLedger(tmp_path / "u.db"),
                         QuotaPolicy(), "admin")
    created = quota.create_key("t", budget_usd=1.0)
    quota.admit(api_key=created["key"], model="m", model_known=True, tokens=10, cost_usd=0.5,
                request_id="r1")

    async def twice() -> None:
        rows = [UsageRow(request_id="r1", tenant_id="t", key_id=created["key_id"],
                         route="/v1/chat/completions", status=200, cost_usd=0.25)
                for _ in range(2)]
        await asyncio.gather(*(quota.settle(row) for row in rows))
        await quota.settle(rows[0])  # and once more, after the commit

    asyncio.run(twice())
    status = quota.budget_status(created["key_id"])
    assert status["spent_usd"] == pytest.approx(0.25) and status["reserved_usd"] == 0


def test_admissions_in_flight_when_a_shard_dies_are_restored_from_the_journal(
        tmp_path, db_target) -> None:
    """Killed mid-load: its unsettled admissions still count after the restart (RPM, TPM
    and budget), on SQLite and on PostgreSQL."""
    from serve_app.accounts.store import AccountStore
    from serve_app.quota.journal import ReservationJournal
    from serve_app.quota.ledger import UsageLedger, UsageRow
    from serve_app.quota.service import QuotaPolicy, QuotaService

    now = [1_800_000_000.0]

    def service() -> QuotaService:
        return QuotaService(AccountStore(db_target("a.db"), b"p"),
                            UsageLedger(db_target("u.db")), QuotaPolicy(), "admin",
                            clock=lambda: now[0],
                            journal=ReservationJournal(db_target("r.db")))

    async def admit(quota: QuotaService, key: str, rid: str, cost: float = 0.0) -> None:
        quota.admit(api_key=key, model="m", model_known=True, tokens=100, cost_usd=cost,
                    request_id=rid)
        await quota.persist_admissions()

    async def settle(quota: QuotaService, key_id: str, rid: str) -> None:
        await quota.settle(UsageRow(request_id=rid, tenant_id="t", key_id=key_id,
                                    route="/v1/chat/completions", status=200,
                                    tokens_in=50, tokens_out=50, cost_usd=0.1))
        await quota.persist_releases()

    async def before_the_crash(quota: QuotaService, rpm: dict, budget: dict) -> None:
        for index in range(4):
            await admit(quota, rpm["key"], f"r{index}")
        await settle(quota, rpm["key_id"], "r0")
        await admit(quota, budget["key"], "b0", cost=0.3)
        await admit(quota, budget["key"], "b1", cost=0.3)

    first = service()
    rpm = first.create_key("t", rpm=5, tpm=10_000)
    budget = first.create_key("t", budget_usd=1.0)
    asyncio.run(before_the_crash(first, rpm, budget))
    now[0] += 2

    second = service()  # same stores, nothing in memory but what it restored
    assert second.restored == 5  # r1, r2, r3, b0, b1: r0 settled before the crash
    status = second.budget_status(budget["key_id"])
    assert status["reserved_usd"] == pytest.approx(0.6)

    async def after_the_restart() -> None:
        await admit(second, rpm["key"], "r4")  # r0 (ledger) + r1..r3 (journal) + r4 = 5
        with pytest.raises(ApiError) as refused:
            await admit(second, rpm["key"], "r5")
        assert refused.value.code == "rate_limit_rpm"
        with pytest.raises(ApiError) as over:
            await admit(second, budget["key"], "b2", cost=0.5)  # 0.6 held + 0.5 > 1.0
        assert over.value.code == "budget_exceeded"
        await settle(second, rpm["key_id"], "r1")  # settles its restored reservation
        await settle(second, budget["key_id"], "b0")

    asyncio.run(after_the_restart())
    assert second.budget_status(budget["key_id"])["reserved_usd"] == pytest.approx(0.3)
    now[0] += 901  # past the reservation TTL: what never settled is not restored again
    assert service().restored == 0


def test_a_slow_database_never_stalls_requests_of_keys_already_in_memory(shards) -> None:
    """A key's first sight reads the database in a thread: while that read hangs (a
    PostgreSQL restart), keys already in memory are admitted and settled at once."""
    import threading
    import time as clock

    clients = _clients(shards, 1)
    made = _create(clients[0], 12, rpm=100, budget_usd=5.0)
    cold_id, cold = made[0]
    # A warm key on the same shard: its admits share the client's batches with the cold one.
    warm_id, warm = next(k for k in made[1:] if shard_of(k[0], 2) == shard_of(cold_id, 2))
    owner = shards[shard_of(cold_id, 2)].shell
    released = threading.Event()
    ledger = owner.service.ledger
    original = ledger.recent_usage

    def hanging(key_id: str, since: float):
        if key_id == cold_id:
            released.wait(10)
        return original(key_id, since)

    async def main() -> None:
        client = _clients(shards, 1)[0]
        await _burst([client], [warm], 1)  # the warm key is in memory now
        ledger.recent_usage = hanging
        try:
            cold_admit = asyncio.ensure_future(_burst([client], [cold], 1))
            await asyncio.sleep(0.1)
            started = clock.perf_counter()
            for _ in range(3):  # admissions only: settling waits for the database anyway
                await client.admit(api_key=warm, model="m", model_known=True, tokens=10,
                                   cost_usd=0.0, request_id=uuid.uuid4().hex)
            waited = clock.perf_counter() - started
            assert not cold_admit.done()  # still reading the database
            assert waited < 5  # far below the hang: the loop was free
        finally:
            released.set()
            ledger.recent_usage = original
        assert await cold_admit == {cold: 1}

    asyncio.run(main())


def test_admissions_go_on_while_the_journal_is_down_and_are_recorded_after(tmp_path) -> None:
    from serve_app.accounts.store import AccountStore
    from serve_app.quota.journal import ReservationJournal
    from serve_app.quota.ledger import UsageLedger
    from serve_app.quota.service import QuotaPolicy, QuotaService

    class FlakyJournal(ReservationJournal):
        down = True
        attempts = 0

        def record(self, entries, released=()):
            self.attempts += 1
            if self.down:
                raise ConnectionError("database away")
            super().record(entries, released)

    journal = FlakyJournal(tmp_path / "r.db")
    quota = QuotaService(AccountStore(tmp_path / "a.db", b"p"), UsageLedger(tmp_path / "u.db"),
                         QuotaPolicy(), "admin", journal=journal)
    key = quota.create_key("t", rpm=100)["key"]

    async def admit(rid: str) -> None:
        quota.admit(api_key=key, model="m", model_known=True, tokens=1, cost_usd=0.0,
                    request_id=rid)
        await quota.persist_admissions()

    async def main() -> None:
        await admit("a")
        await admit("b")  # within the retry pause: not even tried
        assert journal.attempts == 1
        journal.down = False
        quota._journal_down_until = 0.0  # the pause is over
        await admit("c")

    asyncio.run(main())
    assert {e.request_id for e in journal.live(0.0)} == {"a", "b", "c"}


def test_an_admission_resent_to_the_restarted_shard_gets_its_reservation_once(
        tmp_path, db_target) -> None:
    """The multi-node node-kill test caught it: the shard journaled an admission and died
    before answering, Serve re-sent the call to the restarted shard, which refused its own
    restored reservation as a duplicate id (409). The retry now gets it, counted once."""
    from serve_app.accounts.store import AccountStore
    from serve_app.quota.journal import ReservationJournal
    from serve_app.quota.ledger import UsageLedger
    from serve_app.quota.service import QuotaPolicy, QuotaService

    def service() -> QuotaService:
        return QuotaService(AccountStore(db_target("a.db"), b"p"),
                            UsageLedger(db_target("u.db")), QuotaPolicy(), "admin",
                            journal=ReservationJournal(db_target("r.db")))

    async def admit(quota: QuotaService, key: str, rid: str, tokens: int = 100) -> dict:
        admitted = quota.admit(api_key=key, model="m", model_known=True, tokens=tokens,
                               cost_usd=0.2, request_id=rid)
        await quota.persist_admissions()
        return admitted

    first = service()
    created = first.create_key("t", rpm=2, budget_usd=1.0)
    asyncio.run(admit(first, created["key"], "r1"))
    second = service()  # restarted: r1 restored from the journal
    again = asyncio.run(admit(second, created["key"], "r1"))
    assert again["reservation"]["id"] == "r1"
    assert second.budget_status(created["key_id"])["reserved_usd"] == pytest.approx(0.2)
    asyncio.run(admit(second, created["key"], "r2"))  # rpm 2: r1 counted once
    with pytest.raises(ApiError) as refused:
        asyncio.run(admit(second, created["key"], "r3"))
    assert refused.value.code == "rate_limit_rpm"
    with pytest.raises(ApiError) as different:  # a held id with other amounts: refused
        asyncio.run(admit(second, created["key"], "r1", tokens=999))
    assert different.value.status == 409
