"""Budgets stop a session at their limit and never beyond; loop detection."""
from __future__ import annotations

import pytest

from serve_app.agent.budgets import (Budget, LoopDetector, Prices, Stop, Usage, clamp_limits,
                                     prompt_tokens_upper_bound)
from serve_app.agent.config import AgentSettings, BudgetLimits
from serve_app.errors import ApiError
from tests.support.agent_env import service
from tests.support.scripted_model import answer, tool_call

FREE = Prices()


def limits(**fields) -> BudgetLimits:
    return BudgetLimits(**{"wall_clock_s": 60, "max_llm_calls": 5, "max_tool_calls": 5,
                           "max_tokens": 1000, "max_usd": 1.0, **fields})


# ----------------------------------------------------------------------------- pure
def test_llm_call_gets_what_is_left_of_the_token_budget():
    budget = Budget(limits(max_tokens=1000), Usage(prompt_tokens=500, completion_tokens=100))
    assert budget.plan_llm_call(prompt_tokens_bound=300, wanted_max_tokens=256,
                                min_completion_tokens=16, prices=FREE) == 100
    stop = budget.plan_llm_call(prompt_tokens_bound=390, wanted_max_tokens=256,
                                min_completion_tokens=16, prices=FREE)
    assert isinstance(stop, Stop) and stop.reason == "max_tokens"


def test_llm_call_count_and_time_limits():
    assert Budget(limits(max_llm_calls=2), Usage(llm_calls=2)).plan_llm_call(
        prompt_tokens_bound=1, wanted_max_tokens=16, min_completion_tokens=1,
        prices=FREE).reason == "max_llm_calls"
    assert Budget(limits(wall_clock_s=10), Usage(wall_clock_s=10)).plan_llm_call(
        prompt_tokens_bound=1, wanted_max_tokens=16, min_completion_tokens=1,
        prices=FREE).reason == "timeout"
    assert Budget(limits(max_tool_calls=1), Usage(tool_calls=1)).check_tool_call().reason \
        == "max_tool_calls"
    assert Budget(limits(), Usage()).check_tool_call() is None


def test_usd_budget_caps_max_tokens_at_worst_case_prices():
    prices = Prices(usd_per_million_input=1_000, usd_per_million_output=10_000)  # $/token .001/.01
    budget = Budget(limits(max_usd=1.0, max_tokens=10**6), Usage(usd=0.5))
    # prompt up to 100 tokens = $0.10; $0.40 left buys 40 output tokens.
    assert budget.plan_llm_call(prompt_tokens_bound=100, wanted_max_tokens=256,
                                min_completion_tokens=16, prices=prices) == 40
    budget.usage.usd = 0.88
    stop = budget.plan_llm_call(prompt_tokens_bound=100, wanted_max_tokens=256,
                                min_completion_tokens=16, prices=prices)
    assert stop.reason == "max_usd"


def test_client_budgets_are_capped_and_validated():
    settings = AgentSettings()
    capped = clamp_limits({"max_llm_calls": 10**6, "max_usd": 0.01}, settings.default_budgets,
                          settings.max_budgets)
    assert capped.max_llm_calls == settings.max_budgets.max_llm_calls
    assert capped.max_usd == 0.01
    assert capped.max_tokens == settings.default_budgets.max_tokens
    with pytest.raises(ValueError, match="unknown budget"):
        clamp_limits({"max_coffee": 1}, settings.default_budgets, settings.max_budgets)
    with pytest.raises(ValueError):
        clamp_limits({"max_llm_calls": 0}, settings.default_budgets, settings.max_budgets)


def test_settings_reject_defaults_above_the_maximum():
    with pytest.raises(ValueError, match="exceeds max_budgets"):
        AgentSettings(default_budgets={"max_llm_calls": 50}, max_budgets={"max_llm_calls": 10})
    with pytest.raises(ValueError, match="not a host name"):
        AgentSettings(http_get_allowlist=["https://example.com/path"])


def test_prompt_bound_is_at_least_the_bytes():
    messages = [{"role": "user", "content": "é" * 100}]
    assert prompt_tokens_upper_bound(messages, []) >= 200


def test_loop_detector_counts_identical_calls_only():
    detector = LoopDetector(3)
    counts: dict[str, int] = {}
    assert detector.observe(counts, "files.read", {"path": "a"}) is None
    assert detector.observe(counts, "files.read", {"path": "b"}) is None
    assert detector.observe(counts, "files.read", {"path": "a"}) is None
    stop = detector.observe(counts, "files.read", {"path": "a"})
    assert stop is not None and stop.reason == "loop_detected"
    # argument order does not matter
    assert LoopDetector.key("t", {"a": 1, "b": 2}) == LoopDetector.key("t", {"b": 2, "a": 1})


# ----------------------------------------------------------------------------- in the loop
def reads(n: int) -> list[dict]:
    return [tool_call("files_list", {"path": f"dir{i}"}) for i in range(n)]


async def run_session(tmp_path, model, replies, budgets, **settings):
    model.script(*replies)
    agent = service(tmp_path, model, settings=settings)
    session = await agent.create_session(budgets=budgets)
    result = await agent.post_message(session["id"], "work")
    return agent, result


async def test_max_llm_calls_stops_at_the_limit(tmp_path, model):
    agent, result = await run_session(tmp_path, model, reads(10), {"max_llm_calls": 3})
    assert result["status"] == "stopped" and result["stop"]["reason"] == "max_llm_calls"
    assert len(model.requests) == 3 and result["usage"]["llm_calls"] == 3
    with pytest.raises(ApiError) as closed:
        await agent.post_message(result["id"], "more")
    assert closed.value.status == 409 and closed.value.code == "session_stopped"
    assert len(model.requests) == 3


async def test_max_tool_calls_stops_before_the_next_call(tmp_path, model):
    agent, result = await run_session(tmp_path, model, reads(10), {"max_tool_calls": 2})
    assert result["stop"]["reason"] == "max_tool_calls"
    assert result["usage"]["tool_calls"] == 2
    calls = (await agent.audit(result["id"]))["data"]
    assert [c["decision"] for c in calls] == ["auto", "auto", "blocked"]
    assert "max_tool_calls" in calls[-1]["error"]


async def test_token_budget_is_never_exceeded(tmp_path, model):
    replies = [tool_call("files_list", {"path": f"d{i}"}, completion_tokens=200)
               for i in range(20)]
    agent, result = await run_session(tmp_path, model, replies, {"max_tokens": 4000})
    assert result["stop"]["reason"] == "max_tokens"
    assert result["usage"]["tokens"] <= 4000
    used = 0
    for request in model.requests:
        assert request["max_tokens"] <= 4000 - used  # each call fits in what is left
        used += len(__import__("json").dumps(request["messages"])) // 4 + 1
        used += min(200, request["max_tokens"])


async def test_usd_budget_is_never_exceeded(tmp_path, model):
    replies = [tool_call("files_list", {"path": f"d{i}"}, completion_tokens=100)
               for i in range(20)]
    agent, result = await run_session(
        tmp_path, model, replies, {"max_usd": 0.2, "max_tokens": 10**5},
        usd_per_million_input_tokens=20.0, usd_per_million_output_tokens=80.0)
    assert result["stop"]["reason"] == "max_usd"
    assert 0 < result["usage"]["usd"] <= 0.2
    assert result["usage"]["llm_calls"] >= 2


async def test_provider_reported_cost_is_charged(tmp_path, model):
    replies = [tool_call("files_list", {"path": f"d{i}"}, cost_usd=0.02) for i in range(5)]
    _, result = await run_session(tmp_path, model, replies, {"max_usd": 0.05})
    assert result["usage"]["usd"] == pytest.approx(0.04)
    assert result["usage"]["llm_calls"] == 2


async def test_wall_clock_budget_cuts_a_slow_model_off(tmp_path, model):
    replies = [tool_call("files_list", {"path": "a"}), answer("late", delay_s=30)]
    agent, result = await run_session(tmp_path, model, replies, {"wall_clock_s": 2.0})
    assert result["status"] == "stopped" and result["stop"]["reason"] == "timeout"
    assert result["answer"] is None
    # The loop gave up at its budget instead of waiting for the slow answer.
    assert result["usage"]["wall_clock_s"] < 30


async def test_wall_clock_budget_bounds_sandboxed_code(tmp_path, model):
    replies = [tool_call("python", {"code": "import time\ntime.sleep(30)"}), answer("x")]
    agent, result = await run_session(tmp_path, model, replies, {"wall_clock_s": 3.0})
    assert result["stop"]["reason"] == "timeout"
    record = (await agent.audit(result["id"]))["data"][0]
    assert record["status"] == "failed"
    # Killed by the sandbox at what was left of the budget (or, on a machine too busy to
    # get there in time, refused before it started).
    assert ("wall_time" in (record["result_summary"] or "") or "budget" in record["error"]
            or "timeout" in record["error"])


async def test_the_same_call_repeated_stops_the_session(tmp_path, model):
    replies = [tool_call("files_list", {"path": "."}) for _ in range(10)]
    agent, result = await run_session(tmp_path, model, replies, None, loop_repeat_limit=3)
    assert result["stop"]["reason"] == "loop_detected"
    calls = (await agent.audit(result["id"]))["data"]
    assert [c["decision"] for c in calls] == ["auto", "auto", "blocked"]
    assert len(model.requests) == 3


async def test_budgets_in_the_session_view(tmp_path, model):
    model.script(answer("hi"))
    agent = service(tmp_path, model)
    session = await agent.create_session(budgets={"max_llm_calls": 4})
    assert session["budgets"]["max_llm_calls"] == 4
    result = await agent.post_message(session["id"], "hello")
    assert result["answer"] == "hi" and result["remaining"]["llm_calls"] == 3
    with pytest.raises(ApiError) as bad:
        await agent.create_session(budgets={"max_llm_calls": -1})
    assert bad.value.status == 422
