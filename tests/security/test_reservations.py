"""Class 3: reservations are the true worst case of what is sent (counted with the
target's tokenizer; tools, response schemas and RAG context included; `n` times a capped
output), and every target is capped. Class 13 (second half): reservations leaked by a
crash expire. Plus O(1) settlement of rate windows whatever the traffic."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from serve_app.accounts.store import AccountStore
from serve_app.errors import ApiError
from serve_app.llm.prompt import LocalPromptTokenizer, read_tokenizer_files, template_messages
from serve_app.llm.token_count import ByteBoundCounter, TiktokenCounter
from serve_app.protocol import ChatCompletionRequest
from serve_app.quota.ledger import UsageLedger, UsageRow
from serve_app.quota.limits import SlidingWindow
from serve_app.quota.service import QuotaPolicy, QuotaService
from serve_app.routing.config import RouterSettings
from tests.support.chat_harness import LOCAL, context, make_service

MODEL_DIR = Path(__file__).resolve().parents[2] / "var" / "models" / "smollm2-135m-instruct"
EMOJI = "🦄🌈🔥" * 40
TOOLS = [{"type": "function", "function": {
    "name": f"tool_{i}", "description": "does a thing " * 20,
    "parameters": {"type": "object", "properties": {
        f"arg_{j}": {"type": "string", "description": "an argument"} for j in range(8)}}}}
    for i in range(6)]


def request(**extra) -> ChatCompletionRequest:
    body = {"model": LOCAL, "messages": [{"role": "user", "content": "hi"}]}
    body.update(extra)
    return ChatCompletionRequest.model_validate(body)


@pytest.fixture(scope="module")
def local_tokenizer() -> LocalPromptTokenizer:
    if not MODEL_DIR.is_dir():
        pytest.skip("the converted local model is made by `make models`")
    return LocalPromptTokenizer(read_tokenizer_files(MODEL_DIR))


@pytest.fixture(scope="module")
def engine_tokenizer(local_tokenizer):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(MODEL_DIR))


@pytest.mark.parametrize("extra", [
    {"messages": [{"role": "user", "content": EMOJI}]},
    {"messages": [{"role": "system", "content": "be brief"},
                  {"role": "user", "content": [{"type": "text", "text": "a"},
                                               {"type": "text", "text": EMOJI}]}]},
    {"tools": TOOLS},
])
def test_local_count_is_exactly_what_the_engine_tokenizes(local_tokenizer, engine_tokenizer,
                                                          extra) -> None:
    req = request(**extra)
    messages = template_messages(req)
    expected = engine_tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                    tokenize=True)
    if hasattr(expected, "keys"):
        expected = expected["input_ids"]
    assert local_tokenizer.prompt_ids(messages) == list(expected)


def test_emoji_and_tools_are_counted_not_guessed(local_tokenizer) -> None:
    """The old estimate was characters / 3: six times too low for emoji, and blind to tools."""
    emoji = request(messages=[{"role": "user", "content": EMOJI}])
    assert local_tokenizer.count(emoji) > 3 * (len(EMOJI) // 3 + 12)
    plain, with_tools = request(), request(tools=TOOLS)
    assert local_tokenizer.count(with_tools) > local_tokenizer.count(plain) + 500
    for counter in (TiktokenCounter(), ByteBoundCounter()):
        assert counter.count(with_tools) > counter.count(plain) + 500
        assert counter.count(emoji) >= len(EMOJI)


def test_byte_bound_is_an_upper_bound_of_real_bpe_counts(local_tokenizer) -> None:
    for text in (EMOJI, "plain words " * 50, "{}[]<>" * 30, "数学问题" * 40):
        req = request(messages=[{"role": "user", "content": text}])
        assert ByteBoundCounter().count(req) >= local_tokenizer.count(req) - 20  # template


def with_provider(**provider) -> tuple[RouterSettings, dict[str, str]]:
    settings = RouterSettings.model_validate({
        "providers": [{"name": "paid", "base_url": "http://127.0.0.1:9/v1", "model": "paid-1",
                       "api_key_env": "PAID_KEY", "price_in_per_mtok": 10,
                       "price_out_per_mtok": 30, **provider}],
        "tiers": {"small": ["paid", "local"], "medium": ["paid", "local"],
                  "large": ["paid", "local"]}})
    return settings, {"PAID_KEY": "x"}


def test_worst_case_multiplies_n_and_caps_output_of_every_target() -> None:
    settings, environ = with_provider()
    service, *_ = make_service(router_settings=settings, environ=environ)
    router = service.router
    route = router.resolve("paid")
    one = router.worst_case(route, request(model="paid"))
    many = router.worst_case(route, request(model="paid", n=40))
    # output capped at the provider default (32) when the client sets none, times n
    assert many.tokens - one.tokens == 39 * 32
    assert many.cost_usd > 30 * one.cost_usd
    capped = router.worst_case(route, request(model="paid", max_tokens=5, n=2))
    assert capped.tokens == capped.prompt_tokens + 10


async def test_providers_always_get_a_max_tokens() -> None:
    settings, environ = with_provider()
    service, _, _, provider = make_service(router_settings=settings, environ=environ)
    await service.handle(request(model="paid"), context(), "sk-aaaaaaaaaaaa_" + "b" * 32)
    await service.handle(request(model="paid", max_tokens=7), context(),
                         "sk-aaaaaaaaaaaa_" + "b" * 32)
    assert [r["max_tokens"] for r in provider.requests] == [32, 7]


async def test_rag_context_is_reserved_before_generation() -> None:
    service, accounting, _, _ = make_service()
    route = service.router.resolve(LOCAL)
    ctx = context()
    ctx.admitted, ctx.key_id = True, "k"
    small = request()
    big = request(messages=[{"role": "system", "content": "context " * 500},
                            {"role": "user", "content": "hi"}])
    before = service.router.worst_case(route, small)
    await service._reserve_context(ctx, route, big, before)
    (request_id, tokens, _), = accounting.extended
    assert request_id == ctx.request_id and tokens >= 500


# ---------------------------------------------------------------------------- the Quota side
class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def quota(tmp_path):
    clock = Clock()
    service = QuotaService(AccountStore(tmp_path / "a.db", b"p"), UsageLedger(tmp_path / "u.db"),
                           QuotaPolicy(reservation_ttl_s=600), "admin", clock=clock)
    return service, clock


def admit(service, key, rid, tokens=10, cost=0.01):
    return service.admit(api_key=key, model="m", model_known=True, tokens=tokens,
                         cost_usd=cost, request_id=rid)


def test_tpm_burst_is_exact_on_the_counted_tokens(quota) -> None:
    service, _ = quota
    key = service.create_key("t", tpm=3000)["key"]
    admitted = 0
    for i in range(20):
        try:
            admit(service, key, f"r{i}", tokens=700)
            admitted += 1
        except ApiError as error:
            assert error.code == "rate_limit_tpm"
    assert admitted == 4  # 4 x 700 <= 3000 < 5 x 700


def test_a_duplicate_internal_id_is_counted_once_and_never_reused(quota) -> None:
    """Ids are the gateway's own: the same admission again is a re-sent call (it gets the
    reservation it holds, counted once); anything else under a held id is refused."""
    service, _ = quota
    created = service.create_key("t", budget_usd=1.0)
    other = service.create_key("t", budget_usd=1.0)
    first = admit(service, created["key"], "same")
    assert admit(service, created["key"], "same")["reservation"] == first["reservation"]
    assert service.budget_status(created["key_id"])["reserved_usd"] == pytest.approx(0.01)
    for key, tokens in ((created["key"], 11), (other["key"], 10)):
        with pytest.raises(ApiError) as caught:
            admit(service, key, "same", tokens=tokens)
        assert caught.value.status == 409


def test_extension_is_checked_like_admission(quota) -> None:
    service, _ = quota
    key = service.create_key("t", tpm=1000, budget_usd=0.05)["key"]
    admit(service, key, "a", tokens=400, cost=0.01)
    service.extend("a", 500, 0.01)
    with pytest.raises(ApiError) as caught:
        service.extend("a", 200, 0.0)  # 1100 > 1000
    assert caught.value.code == "rate_limit_tpm"
    with pytest.raises(ApiError) as caught:
        service.extend("a", 0, 0.04)  # budget: 0.02 reserved + 0.04 > 0.05
    assert caught.value.code == "budget_exceeded"
    assert service.reservations["a"]["tokens"] == 900


def test_leaked_reservations_expire_instead_of_blocking_every_later_period(quota) -> None:
    service, clock = quota
    created = service.create_key("t", budget_usd=0.05, budget_period="day")
    for i in range(5):  # five requests whose gateway died: never settled
        admit(service, created["key"], f"lost{i}", cost=0.01)
    with pytest.raises(ApiError):
        admit(service, created["key"], "blocked", cost=0.01)
    clock.now += 601  # past the TTL, same day
    admit(service, created["key"], "after-ttl", cost=0.01)
    assert service.budget_status(created["key_id"])["reserved_usd"] == pytest.approx(0.01)
    clock.now += 86_400  # next day: the leaked reservation is not carried into it
    admit(service, created["key"], "next-day", cost=0.0)
    assert service.budget_status(created["key_id"])["reserved_usd"] == pytest.approx(0.0)
    assert service.expired_reservations == 6


async def test_settle_of_an_expired_reservation_books_the_real_cost(quota) -> None:
    service, clock = quota
    created = service.create_key("t", budget_usd=1.0)
    admit(service, created["key"], "slow", cost=0.5)
    clock.now += 601
    await service.settle(UsageRow(request_id="slow", tenant_id="t", key_id=created["key_id"],
                                  route="/v1/chat/completions", status=200, cost_usd=0.2))
    status = service.budget_status(created["key_id"])
    assert status["spent_usd"] == pytest.approx(0.2) and status["reserved_usd"] == 0


def _settle_cost(events: int) -> float:
    window = SlidingWindow(60)
    for i in range(events):
        window.add(0.0, 1, f"r{i}")
    started = time.process_time()
    for i in range(0, events, max(1, events // 2000)):
        window.adjust(f"r{i}", 2)
    return (time.process_time() - started) / min(events, 2000)


def test_window_settlement_does_not_grow_with_the_window() -> None:
    small = min(_settle_cost(1_000) for _ in range(3))
    large = min(_settle_cost(64_000) for _ in range(3))
    assert large < small * 8  # O(n) would be ~64x


def test_every_quota_method_runs_on_the_event_loop() -> None:
    """Ray runs sync deployment methods in a thread pool, where they would race the async
    ones over the same windows and reservations (seen: 'deque mutated during iteration')."""
    import inspect

    from deployments.quota import Quota

    cls = Quota.func_or_class
    public = [name for name, member in vars(cls).items()
              if callable(member) and not name.startswith("_")]
    assert "admit" in public and "settle" in public
    assert [name for name in public if not inspect.iscoroutinefunction(getattr(cls, name))] == []


def test_a_prompt_is_counted_once_per_tokenizer_kind() -> None:
    settings = RouterSettings.model_validate({
        "providers": [{"name": n, "base_url": "http://127.0.0.1:9/v1", "model": f"{n}-m",
                       "api_key_env": "PAID_KEY"} for n in ("a", "b", "c")],
        "tiers": {"small": ["a", "b", "local"], "medium": ["b", "c", "local"],
                  "large": ["c", "a", "local"]}})
    service, *_ = make_service(router_settings=settings, environ={"PAID_KEY": "x"})
    router = service.router
    counter = router.counters["a"]
    assert router.counters["b"] is counter and router.counters["c"] is counter
    calls = []
    original = counter.count
    counter.count = lambda request: calls.append(1) or original(request)
    router.worst_case(router.resolve("auto"), request(model="auto"))
    assert len(calls) == 1
