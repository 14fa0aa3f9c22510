"""The agent loop (plain class, no Ray): sessions, tool calls, guardrails.

`AgentService` runs a session until the model answers, a budget or guardrail stops it, or
an irreversible tool call waits for a human. Every guardrail lives here, on the server:
- budgets are checked before each LLM call and each tool call (budgets.py);
- the same tool with the same arguments asked for `loop_repeat_limit` times stops it;
- an irreversible call (an irreversible tool, or arguments that make one irreversible:
  python with write_workspace) is never run when asked for: the session pauses with the
  pending call; `confirm(approve=True)` by a confirmer runs it exactly once, `approve=False`
  tells the model it was refused; an unanswered call expires. The confirmer must be
  allowed to confirm and, by default, be another key than the one that asked (access.py);
- a session belongs to the key that created it; other keys need a grant; each run's LLM
  steps are admitted and billed under the key that drives that run;
- every tool call the model asks for, run or not, is in the audit log, whose `started`
  row is committed before the tool runs.
Tools from MCP servers (mcp_tools.py) are registered as ordinary tools and go through all
of the above; one that its server does not declare read-only (or declares destructive)
is irreversible here.

State lives in SQLite after every step (sessions.py); a replica holds a session's lease
while it runs it. A call found in flight after a crash is never repeated: the model is told
its outcome is unknown.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serve_app.agent import access
from serve_app.agent.access import Principal
from serve_app.agent.audit import AuditLog
from serve_app.agent.budgets import (Budget, LoopDetector, Prices, Stop, Usage,
                                     clamp_limits, prompt_tokens_upper_bound)
from serve_app.agent.config import AgentSettings, BudgetLimits
from serve_app.agent.events import AgentEvents
from serve_app.agent.llm_port import LLMPort, call_port
from serve_app.agent.mcp_tools import McpToolbox
from serve_app.agent.sandbox import Sandbox
from serve_app.agent.sessions import (AWAITING, COMPLETED, DELETED, ERROR, RUNNING, STOPPED,
                                      Session, SessionConflict, SessionStore)
from serve_app.agent.tools import (SessionRetrieveFn, Tool, ToolContext, ToolOutcome, ToolRegistry,
                                   Workspace, default_registry)
from serve_app.errors import ApiError

DEFAULT_SYSTEM_PROMPT = (
    "You are an agent that completes the user's task with the tools provided. Call a tool "
    "when it helps; when the task is done, answer in plain text. Some tools need a human's "
    "approval; if a call is refused, do not ask for it again.")


@dataclass
class _Run:
    """One request's work on a session: its budget view and wall-clock accounting."""

    budget: Budget
    mark: float
    first_new_message: int
    driver: str | None = None  # the key whose request runs the loop: its steps, its bill


class AgentService:
    def __init__(self, settings: AgentSettings, data_dir: Path | str, llm: LLMPort, *,
                 registry: ToolRegistry | None = None,
                 retrieve: SessionRetrieveFn | None = None,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 replica_id: str | None = None, http_transport: Any = None,
                 database_url: str | None = None,
                 events: AgentEvents | None = None) -> None:
        """`database_url`: a postgresql:// URL holding the sessions and the audit log
        (shared by every replica); None: their SQLite files under data_dir. `events`
        hears of every audit row (tool-call metrics, events.py)."""
        self.events = events or AgentEvents()
        data_dir = Path(data_dir)
        self.settings = settings
        self.llm = llm
        self.registry = registry or default_registry()
        # MCP servers' tools join the registry when a session first needs them.
        self.mcp = McpToolbox(settings.mcp_servers, self.registry) \
            if settings.mcp_servers else None
        self.retrieve_fn = retrieve
        self.clock = clock
        self.monotonic = monotonic
        self.replica_id = replica_id or uuid.uuid4().hex[:12]
        self.http_transport = http_transport
        self.store = SessionStore(
            database_url or settings.resolve(data_dir, settings.sessions_db), clock=clock)
        self.audit_log = AuditLog(
            database_url or settings.resolve(data_dir, settings.audit_db), clock=clock)
        self.sandbox = Sandbox(settings.sandbox)
        self.workspace_root = settings.resolve(data_dir, settings.workspace_dir)
        self.loops = LoopDetector(settings.loop_repeat_limit)
        self.prices = Prices(settings.usd_per_million_input_tokens,
                             settings.usd_per_million_output_tokens)

    def close(self) -> None:
        self.store.close()
        self.audit_log.close()

    async def close_connections(self) -> None:
        """Close the MCP connections (stdio servers are child processes of this one)."""
        if self.mcp is not None:
            await self.mcp.aclose()

    async def aclose(self) -> None:
        await self.close_connections()
        self.close()

    # ================================================================== public API
    async def create_session(self, *, owner: str | None = None,
                             principal: Principal | None = None,
                             system_prompt: str | None = None, goal: str | None = None,
                             tools: list[str] | None = None,
                             budgets: dict[str, Any] | None = None, model: str | None = None,
                             metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        s = self.settings
        metadata = dict(metadata or {})
        if principal is not None:
            owner = principal.tenant_id
            metadata.pop("billing_key_id", None)  # who pays is never the client's word
        names = await self._session_tools(tools)
        try:
            limits = clamp_limits(budgets, s.default_budgets, s.max_budgets)
        except ValueError as exc:
            raise ApiError(422, f"invalid budgets: {_first_line(exc)}", param="budgets",
                           code="invalid_budgets") from exc
        prompt = system_prompt if system_prompt is not None else DEFAULT_SYSTEM_PROMPT
        if len(prompt) > s.max_system_prompt_chars or len(goal or "") > s.max_message_chars:
            raise ApiError(413, "system_prompt or goal is too long", param="system_prompt")
        if goal:
            prompt = f"{prompt}\n\nGoal: {goal}"
        session = Session(
            id=f"as_{uuid.uuid4().hex[:24]}", owner=owner, model=model or s.model,
            tools=names, limits=limits.model_dump(), usage=Usage().as_dict(),
            messages=[{"role": "system", "content": prompt}], goal=goal,
            metadata=metadata, creator_key=principal.key_id if principal else None)
        self.sandbox_workspace(session.id)
        self.store.create(session)
        return self._view(session)

    async def post_message(self, session_id: str, content: str, *,
                           owner: str | None = None,
                           principal: Principal | None = None) -> dict[str, Any]:
        if not isinstance(content, str) or not content.strip():
            raise ApiError(400, "content must be a non-empty string", param="content")
        if len(content) > self.settings.max_message_chars:
            raise ApiError(413, f"content is longer than {self.settings.max_message_chars} "
                           "characters", param="content")
        async with self._leased(session_id, owner, principal, "drive") as session:
            self._expire_if_due(session)
            self._require_open(session)
            if session.status == AWAITING:
                raise ApiError(409, f"the session waits for confirmation of call "
                               f"{session.pending['call_id']}; approve or deny it first",
                               code="confirmation_pending")
            await self._ensure_tools(session.tools)
            run = self._start_run(session, driver=self._driver(session, principal))
            self._recover(session, run)
            session.messages.append({"role": "user", "content": content})
            session.status = RUNNING
            session.last_error = None
            self._save(session, run)
            await self._advance(session, run)
            return self._result(session, run)

    async def get(self, session_id: str, *, owner: str | None = None,
                  principal: Principal | None = None) -> dict[str, Any]:
        session = self._load_visible(session_id, owner, principal, "read")
        if self._pending_expired(session):
            holder = self._holder()
            if self.store.acquire(session_id, holder, 30):
                try:
                    session = self.store.load(session_id) or session
                    self._expire_if_due(session)
                finally:
                    self.store.release(session_id, holder)
        return self._view(session)

    async def list_sessions(self, principal: Principal, *, tenant: str | None = None,
                            status: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """The admin key's overview: sessions of every tenant (or one), newest first,
        with budgets used and any pending confirmation (messages left out)."""
        if not principal.admin:
            raise ApiError(403, "Listing sessions needs the admin key.", code="not_admin")
        return [self._summary(s) for s in self.store.recent(owner=tenant, status=status,
                                                            limit=limit)]

    async def pending_confirmations(self, principal: Principal,
                                    limit: int = 100) -> list[dict[str, Any]]:
        """Calls waiting for a human that this principal may decide: the admin key any
        tenant's, a can_confirm key its own tenant's (never another's). Each carries the
        exact tool call (tool, arguments) and who asked for it."""
        if not principal.can_confirm:
            raise ApiError(403, "This API key may not confirm agent actions.",
                           code="confirmation_not_allowed")
        owner = None if principal.admin else principal.tenant_id
        sessions = self.store.recent(owner=owner, status=AWAITING, limit=limit)
        return [self._summary(s) for s in sessions if s.pending]

    def _summary(self, session: Session) -> dict[str, Any]:
        view = self._view(session)
        view.pop("messages")
        view["tenant"] = session.owner
        view["messages_count"] = len(session.messages)
        return view

    async def audit(self, session_id: str, *, owner: str | None = None,
                    principal: Principal | None = None) -> dict[str, Any]:
        self._load_visible(session_id, owner, principal, "read")
        return {"object": "list", "session_id": session_id,
                "data": self.audit_log.calls(session_id),
                "events": self.audit_log.events(session_id)}

    async def confirm(self, session_id: str, call_id: str, *, approve: bool,
                      confirmer: str | None = None, may_confirm: bool = False,
                      owner: str | None = None, principal: Principal | None = None,
                      may_self_confirm: bool = False) -> dict[str, Any]:
        """Approve or deny a pending call. With a principal, its key is the confirmer and
        its policy decides; without one (internal callers) confirmer/may_confirm do."""
        if principal is None:
            # An internal caller: owner None means not scoped to a tenant.
            principal = Principal(key_id=confirmer or "", tenant_id=owner,
                                  can_confirm=may_confirm, can_self_confirm=may_self_confirm,
                                  admin=owner is None)
        elif not principal.admin:
            owner = principal.tenant_id
        if not principal.can_confirm:
            raise ApiError(403, "This API key may not confirm agent actions.",
                           code="confirmation_not_allowed")
        if not principal.key_id:
            raise ApiError(400, "confirmer identity is required", param="confirmer")
        confirmer = principal.key_id
        async with self._leased(session_id, owner) as session:
            self._require_open(session)
            pending = session.pending
            if pending is not None and pending["call_id"] == call_id:
                access.may_confirm(session, principal, pending.get("requested_by"),
                                   allow_self=self.settings.allow_self_confirmation)
            if pending is None or pending["call_id"] != call_id:
                known = any(c["call_id"] == call_id for c in self.audit_log.calls(session_id))
                if known:
                    raise ApiError(409, f"call {call_id} is not waiting for confirmation "
                                   "(already decided or expired)", code="confirmation_not_pending")
                raise ApiError(404, f"no call {call_id} in this session", param="call_id",
                               code="call_not_found")
            if self._expire_if_due(session):
                raise ApiError(409, f"the confirmation of call {call_id} expired; it was not "
                               "executed", code="confirmation_expired")
            # The loop goes on as the run that asked for the call: same driving key.
            await self._ensure_tools(session.tools)
            run = self._start_run(session, driver=pending.get("requested_by")
                                  or access.creator_of(session))
            session.pending = None
            session.status = RUNNING
            tool = self.registry.get(pending["tool"])
            if approve and tool is not None:
                # Saved (version-checked) before the tool runs: a second approval finds
                # nothing pending, so the call runs once.
                await self._execute(session, run, tool, call_id, pending["arguments"],
                                    step=pending["step"], decision="approved",
                                    confirmer=confirmer)
            else:
                if approve:  # approved, but the tool is gone (the registry changed)
                    error = f"{pending['tool']} is no longer available; it was not executed."
                    audit_error = "tool no longer registered"
                else:
                    error = (f"A human ({confirmer}) refused this call; it was not executed. "
                             "Do not ask for it again.")
                    audit_error = f"denied by {confirmer}"
                self._append_audit(session.id, call_id, pending["step"], "started",
                                   pending["tool"], pending["arguments"],
                                   decision="approved" if approve else "denied",
                                   confirmer=confirmer, requester=pending.get("requested_by"))
                self._append_audit(session.id, call_id, pending["step"], "finished",
                                   pending["tool"], pending["arguments"], error=audit_error)
                self._tool_message(session, call_id, ToolOutcome(error=error))
                self._pop_queue(session, call_id)
                self._save(session, run)
            await self._advance(session, run)
            return self._result(session, run)

    async def delete(self, session_id: str, *, owner: str | None = None,
                     principal: Principal | None = None) -> dict[str, Any]:
        async with self._leased(session_id, owner, principal, "manage") as session:
            if session.status != DELETED:
                if session.pending:
                    p = session.pending
                    self._append_audit(session.id, p["call_id"], p["step"], "started",
                                       p["tool"], p["arguments"], decision="expired")
                    self._append_audit(session.id, p["call_id"], p["step"], "finished",
                                       p["tool"], p["arguments"],
                                       error="session deleted before confirmation")
                session.status = DELETED
                session.messages = []
                session.queue = []
                session.pending = None
                session.in_flight = None
                self._save(session)
                self._workspace(session.id).remove_all()
            return self._view(session)

    async def grant(self, session_id: str, key_id: str, right: str | None, *,
                    principal: Principal | None = None,
                    owner: str | None = None) -> dict[str, Any]:
        """Give key_id `right` ("read" | "drive") on the session, or take every right
        away (right None). Only the creator (or the admin) may."""
        if right is not None and right not in access.GRANTS:
            raise ApiError(422, f"right must be one of {', '.join(access.GRANTS)}",
                           param="right")
        if not isinstance(key_id, str) or not key_id or len(key_id) > 128:
            raise ApiError(422, "key_id must be a key id", param="key_id")
        async with self._leased(session_id, owner, principal, "manage") as session:
            self._require_open(session)
            if key_id == access.creator_of(session):
                raise ApiError(409, "the creator's own access cannot be changed",
                               code="grant_conflict", param="key_id")
            if right is None:
                session.grants.pop(key_id, None)
            else:
                session.grants[key_id] = right
            self._save(session)
            return {"object": "agent.session.grants", "session_id": session.id,
                    "creator_key": access.creator_of(session), "grants": dict(session.grants)}

    def verify_audit_chain(self) -> dict[str, Any] | None:
        return self.audit_log.verify_chain()

    # ================================================================== the loop
    async def _advance(self, session: Session, run: _Run) -> None:
        """Run until an answer, a stop, or a pause for confirmation."""
        while True:
            while session.queue:
                if await self._handle_next_call(session, run):
                    return
            if session.status in (STOPPED, AWAITING, DELETED):
                return
            if not await self._llm_step(session, run):
                return

    async def _llm_step(self, session: Session, run: _Run) -> bool:
        """One LLM call. True when it asked for tool calls (the loop goes on)."""
        s = self.settings
        tools = self.registry.openai_tools(session.tools)
        bound = prompt_tokens_upper_bound(session.messages, tools)
        self._tick(run)
        plan = run.budget.plan_llm_call(prompt_tokens_bound=bound,
                                        wanted_max_tokens=s.llm_max_tokens,
                                        min_completion_tokens=s.min_completion_tokens,
                                        prices=self.prices)
        if isinstance(plan, Stop):
            self._stop(session, run, plan)
            return False
        request: dict[str, Any] = {"model": session.model, "messages": session.messages,
                                   "max_tokens": plan, "temperature": s.temperature}
        if tools:
            request["tools"] = tools
            request["tool_choice"] = s.tool_choice
        if session.owner:
            request["user"] = session.owner
        if run.driver:
            # The step is admitted under the key driving this run: its models, limits
            # and budget (the gateway's LLM port reads billing_key_id).
            request["metadata"] = {"agent_session_id": session.id,
                                   "billing_key_id": run.driver}
        timeout = max(0.01, min(s.llm_timeout_s, run.budget.remaining_s()))
        session.step += 1
        try:
            completion = await asyncio.wait_for(call_port(self.llm, request), timeout)
        except asyncio.TimeoutError:
            # Unknown usage: charge the whole reservation (it fits in the budget).
            run.budget.record_llm_call(bound, plan, self.prices.cost(bound, plan))
            self._tick(run)
            stop = run.budget.check_time()
            if stop:
                self._stop(session, run, stop)
                return False
            self._fail(session, run, "the model did not answer in time")
            raise ApiError(504, "The agent's model did not answer in time.", code="timeout")
        except ApiError as error:
            run.budget.record_llm_call(0, 0, 0.0)
            self._fail(session, run, error.message)
            raise
        usage = completion.get("usage") or {}
        if isinstance(usage.get("prompt_tokens"), int):
            prompt_tokens = usage["prompt_tokens"]
            completion_tokens = int(usage.get("completion_tokens") or 0)
        else:
            prompt_tokens, completion_tokens = bound, plan
        cost = usage.get("cost_usd")
        if not isinstance(cost, (int, float)):
            cost = self.prices.cost(prompt_tokens, completion_tokens)
        run.budget.record_llm_call(prompt_tokens, completion_tokens, float(cost))
        message = _assistant_message(completion["choices"][0].get("message") or {})
        session.messages.append(message)
        if message.get("tool_calls"):
            session.queue = list(message["tool_calls"])
            self._save(session, run)
            return True
        session.status = COMPLETED
        self._save(session, run)
        return False

    async def _handle_next_call(self, session: Session, run: _Run) -> bool:
        """Decide on the first queued call. True when the run must end (pause or stop)."""
        call = session.queue[0]
        call_id = call["id"]
        wire_name = call["function"]["name"]
        tool = self.registry.get(wire_name)
        name = tool.name if tool else wire_name
        arguments, parse_error = _parse_arguments(call["function"].get("arguments"))
        step = session.step
        self._tick(run)
        stop = run.budget.check_tool_call()
        if stop is None:
            run.budget.record_tool_call()
            stop = self.loops.observe(session.loop_counts, name, arguments)
        if stop is not None:
            reason = f"not run: {stop.detail} ({stop.reason})"
            self._refuse(session, call_id, step, name, arguments, "blocked", reason)
            self._tool_message(session, call_id, ToolOutcome(error=reason))
            self._pop_queue(session, call_id)
            self._stop(session, run, stop)
            return True
        error = None
        if tool is None or tool.name not in session.tools:
            error = (f"unknown tool {wire_name!r}; this session may use: "
                     + ", ".join(self.registry.get(n).wire_name for n in session.tools))
        elif parse_error:
            error = f"invalid arguments for {wire_name}: {parse_error}"
        else:
            error = ToolRegistry.validate(tool, arguments)
        if error:
            self._refuse(session, call_id, step, name, arguments, "auto", error)
            self._tool_message(session, call_id, ToolOutcome(error=error))
            self._pop_queue(session, call_id)
            self._save(session, run)
            return False
        assert tool is not None
        if tool.needs_confirmation(arguments):
            now = self.clock()
            what = (f"{tool.name} is irreversible" if tool.irreversible
                    else f"{tool.name} with these arguments changes the workspace")
            if tool.confirmation_reason:
                what = f"{what} ({tool.confirmation_reason})"
            session.pending = {
                "call_id": call_id, "tool": tool.name, "wire_name": tool.wire_name,
                "arguments": arguments, "step": step,
                "reason": f"{what} and needs a human's approval",
                "requested_by": run.driver,
                "requested_at": now, "expires_at": now + self.settings.confirmation_ttl_s}
            session.status = AWAITING
            self._append_audit(session.id, call_id, step, "requested", tool.name, arguments,
                               decision="pending", requester=run.driver)
            self._save(session, run)
            return True
        await self._execute(session, run, tool, call_id, arguments, step=step,
                            decision="auto", confirmer=None)
        return False

    async def _execute(self, session: Session, run: _Run, tool: Tool, call_id: str,
                       arguments: dict[str, Any], *, step: int, decision: str,
                       confirmer: str | None) -> None:
        self._append_audit(session.id, call_id, step, "started", tool.name, arguments,
                           decision=decision, confirmer=confirmer, requester=run.driver)
        session.in_flight = {"call_id": call_id, "tool": tool.name, "step": step}
        self._save(session, run)
        self._tick(run)
        time_left = run.budget.remaining_s()
        ctx = ToolContext(session_id=session.id, workspace=self._workspace(session.id),
                          settings=self.settings, sandbox=self.sandbox,
                          time_left_s=max(0.1, time_left),
                          retrieve=self._session_retrieve(session),
                          http_transport=self.http_transport,
                          confirmed=decision == "approved")
        started = self.monotonic()
        try:
            outcome = await asyncio.wait_for(self.registry.run(tool, ctx, arguments),
                                             timeout=max(0.1, time_left))
        except asyncio.TimeoutError:
            outcome = ToolOutcome(error="the call ran out of the session's wall-clock budget")
        duration_ms = (self.monotonic() - started) * 1000
        self._append_audit(session.id, call_id, step, "finished", tool.name, arguments,
                           result_summary=outcome.summary(), duration_ms=duration_ms,
                           error=outcome.error)
        self._tool_message(session, call_id, outcome)
        self._pop_queue(session, call_id)
        session.in_flight = None
        self._save(session, run)

    # ================================================================== guardrail helpers
    def _stop(self, session: Session, run: _Run | None, stop: Stop) -> None:
        self._skip_queue(session, f"not run: the session stopped ({stop.reason})")
        session.status = STOPPED
        session.stop = stop.as_dict()
        self._save(session, run)

    def _skip_queue(self, session: Session, reason: str) -> None:
        """Every call still queued is refused (audited, answered) and dropped."""
        for call in list(session.queue):
            tool = self.registry.get(call["function"]["name"])
            name = tool.name if tool else call["function"]["name"]
            arguments, _ = _parse_arguments(call["function"].get("arguments"))
            self._refuse(session, call["id"], session.step, name, arguments, "blocked", reason)
            self._tool_message(session, call["id"], ToolOutcome(error=reason))
        session.queue = []

    def _refuse(self, session: Session, call_id: str, step: int, tool: str, arguments: Any,
                decision: str, error: str) -> None:
        self._append_audit(session.id, call_id, step, "started", tool, arguments,
                           decision=decision)
        self._append_audit(session.id, call_id, step, "finished", tool, arguments, error=error)

    def _pending_expired(self, session: Session) -> bool:
        return (session.status == AWAITING and session.pending is not None
                and self.clock() >= session.pending["expires_at"])

    def _expire_if_due(self, session: Session) -> bool:
        """An unanswered confirmation past its expiry: not run, the model is told."""
        if not self._pending_expired(session):
            return False
        p = session.pending
        assert p is not None
        error = (f"The approval for this call expired after "
                 f"{self.settings.confirmation_ttl_s:g}s; it was not executed.")
        self._append_audit(session.id, p["call_id"], p["step"], "started", p["tool"],
                           p["arguments"], decision="expired")
        self._append_audit(session.id, p["call_id"], p["step"], "finished", p["tool"],
                           p["arguments"], error="confirmation expired")
        self._tool_message(session, p["call_id"], ToolOutcome(error=error))
        self._pop_queue(session, p["call_id"])
        self._skip_queue(session, "not run: an earlier call of this step expired")
        session.pending = None
        session.status = COMPLETED
        self._save(session)
        return True

    def _recover(self, session: Session, run: _Run) -> None:
        """Leftovers of a run that died mid-way (replica crash): never repeat a call."""
        if session.in_flight:
            f = session.in_flight
            self._append_audit(session.id, f["call_id"], f["step"], "finished", f["tool"],
                               None, error="interrupted: the service stopped while this call "
                               "ran; its outcome is unknown")
            self._tool_message(session, f["call_id"], ToolOutcome(
                error="interrupted while running; the outcome is unknown"))
            self._pop_queue(session, f["call_id"])
            session.in_flight = None
        if session.queue:
            self._skip_queue(session, "not run: the previous run was interrupted")

    def _require_open(self, session: Session) -> None:
        if session.status == DELETED:
            raise ApiError(409, "the session was deleted", code="session_deleted")
        if session.status == STOPPED:
            stop = session.stop or {}
            raise ApiError(409, f"the session stopped: {stop.get('detail', '')} "
                           f"({stop.get('reason', '')})", code="session_stopped")

    # ================================================================== persistence
    def _session_retrieve(self, session: Session) -> Any:
        """The retrieve tool searches the session owner's collection (metadata.collection)."""
        if self.retrieve_fn is None:
            return None
        search, owner, metadata = self.retrieve_fn, session.owner, dict(session.metadata)

        async def retrieve(query: str, top_k: int) -> list[dict[str, Any]]:
            return await search(query, top_k, owner, metadata)

        return retrieve

    @asynccontextmanager
    async def _leased(self, session_id: str, owner: str | None,
                      principal: Principal | None = None,
                      right: access.Right = "read") -> AsyncIterator[Session]:
        session = self._load_visible(session_id, owner, principal, right)
        limits = BudgetLimits.model_validate(session.limits)
        holder = self._holder()
        ttl = limits.wall_clock_s + self.settings.lease_margin_s + self.settings.sandbox.wall_seconds
        if not self.store.acquire(session_id, holder, ttl):
            raise ApiError(409, "the session is busy with another request; retry when it "
                           "is done", code="session_busy")
        try:
            fresh = self.store.load(session_id)
            assert fresh is not None
            access.require(fresh, principal, right)  # a grant may have changed meanwhile
            yield fresh
        except SessionConflict as exc:
            raise ApiError(409, "the session was changed by another request; retry",
                           code="session_conflict") from exc
        finally:
            self.store.release(session_id, holder)

    def _load_visible(self, session_id: str, owner: str | None,
                      principal: Principal | None = None,
                      right: access.Right = "read") -> Session:
        session = self.store.load(session_id)
        if principal is not None and not principal.admin:
            owner = principal.tenant_id
        if session is None or (owner is not None and session.owner != owner):
            raise access.not_found(session_id)
        access.require(session, principal, right)
        return session

    @staticmethod
    def _driver(session: Session, principal: Principal | None) -> str | None:
        return principal.key_id if principal is not None else access.creator_of(session)

    def _holder(self) -> str:
        return f"{self.replica_id}:{uuid.uuid4().hex[:12]}"

    def _start_run(self, session: Session, driver: str | None = None) -> _Run:
        budget = Budget(BudgetLimits.model_validate(session.limits),
                        Usage.from_dict(session.usage))
        return _Run(budget=budget, mark=self.monotonic(),
                    first_new_message=len(session.messages), driver=driver)

    def _tick(self, run: _Run) -> None:
        now = self.monotonic()
        run.budget.record_time(now - run.mark)
        run.mark = now

    def _save(self, session: Session, run: _Run | None = None) -> None:
        if run is not None:
            self._tick(run)
            session.usage = run.budget.usage.as_dict()
        self.store.save(session)

    def _fail(self, session: Session, run: _Run, message: str) -> None:
        session.status = ERROR
        session.last_error = message
        self._save(session, run)

    def _append_audit(self, session_id: str, call_id: str, step: int, event: str, tool: str,
                      arguments: Any, **fields: Any) -> None:
        self.audit_log.append(session_id=session_id, call_id=call_id, step=step, event=event,
                              tool=tool, arguments=arguments, **fields)
        self.events.audited(event, tool, call_id, fields)

    # ================================================================== small helpers
    async def _session_tools(self, tools: list[str] | None) -> list[str]:
        """A new session's tools: the ones it names (`mcp__<server>` names all of that
        server's tools), else the defaults (with the MCP servers in_default_tools)."""
        names = tools if tools is not None else self.settings.default_tools
        if not isinstance(names, list):
            raise ApiError(422, "tools must be a list of tool names", param="tools")
        if self.mcp is not None:
            await self.mcp.ensure(names, defaults=tools is None)
            names = self.mcp.expand(names, defaults=tools is None)
        return self._tool_names(names)

    async def _ensure_tools(self, names: list[str]) -> None:
        """The MCP tools a session uses are registered (listed once per replica)."""
        if self.mcp is not None:
            await self.mcp.ensure(names)

    def _tool_names(self, names: list[str]) -> list[str]:
        if not isinstance(names, list):
            raise ApiError(422, "tools must be a list of tool names", param="tools")
        resolved: list[str] = []
        for name in names:
            tool = self.registry.get(name) if isinstance(name, str) else None
            reason = self.mcp.unavailable(name) if tool is None and self.mcp else None
            if reason is not None:
                raise ApiError(503, f"the MCP server of {name!r} is unavailable: {reason}",
                               param="tools", code="tool_unavailable")
            if tool is None:
                raise ApiError(422, f"unknown tool {name!r}; available: "
                               + ", ".join(self.registry.names()), param="tools",
                               code="unknown_tool")
            if tool.name not in resolved:
                resolved.append(tool.name)
        return resolved

    def _workspace(self, session_id: str) -> Workspace:
        return Workspace(self.workspace_root / session_id)

    def sandbox_workspace(self, session_id: str) -> Path:
        path = self.workspace_root / session_id
        self.sandbox.prepare_workspace(path)
        return path

    def _tool_message(self, session: Session, call_id: str, outcome: ToolOutcome) -> None:
        payload: dict[str, Any] = {"ok": outcome.ok}
        if outcome.result is not None:
            payload["result"] = outcome.result
        if outcome.error:
            payload["error"] = outcome.error
        text = json.dumps(payload, ensure_ascii=False, default=str)
        limit = self.settings.tool_result_max_chars
        if len(text) > limit:
            text = text[:limit] + f"... [truncated {len(text) - limit} characters]"
        session.messages.append({"role": "tool", "tool_call_id": call_id, "content": text})

    @staticmethod
    def _pop_queue(session: Session, call_id: str) -> None:
        session.queue = [c for c in session.queue if c["id"] != call_id]

    def _view(self, session: Session) -> dict[str, Any]:
        limits = BudgetLimits.model_validate(session.limits)
        usage = Usage.from_dict(session.usage)
        remaining = {
            "wall_clock_s": max(0.0, limits.wall_clock_s - usage.wall_clock_s),
            "llm_calls": max(0, limits.max_llm_calls - usage.llm_calls),
            "tool_calls": max(0, limits.max_tool_calls - usage.tool_calls),
            "tokens": max(0, limits.max_tokens - usage.tokens),
            "usd": max(0.0, limits.max_usd - usage.usd)}
        pending = None
        if session.pending:
            p = session.pending
            pending = {k: p[k] for k in ("call_id", "tool", "wire_name", "arguments", "reason",
                                         "step", "requested_at", "expires_at")}
            pending["requested_by"] = p.get("requested_by")
        tools = []
        for name in session.tools:
            tool = self.registry.get(name)
            if tool is not None:
                tools.append({"name": tool.name, "wire_name": tool.wire_name,
                              "irreversible": tool.irreversible,
                              "confirmation": "always" if tool.irreversible else (
                                  "for some arguments" if tool.irreversible_if else "never")})
        return {"id": session.id, "object": "agent.session", "status": session.status,
                "stop": session.stop, "model": session.model, "goal": session.goal,
                "tools": tools, "budgets": limits.model_dump(), "usage": usage.as_dict(),
                "remaining": remaining, "pending_confirmation": pending,
                "step": session.step, "last_error": session.last_error,
                "messages": session.messages, "metadata": session.metadata,
                "creator_key": access.creator_of(session), "grants": dict(session.grants),
                "created_at": session.created_at, "updated_at": session.updated_at}

    def _result(self, session: Session, run: _Run) -> dict[str, Any]:
        view = self._view(session)
        answer = None
        if session.status == COMPLETED and session.messages:
            last = session.messages[-1]
            if last.get("role") == "assistant" and not last.get("tool_calls"):
                answer = last.get("content")
        return {**view, "answer": answer,
                "new_messages": session.messages[run.first_new_message:]}


def _assistant_message(message: dict[str, Any]) -> dict[str, Any]:
    """The model's message as stored: our own unique call ids, only OpenAI fields."""
    out: dict[str, Any] = {"role": "assistant", "content": message.get("content")}
    calls = []
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        arguments = function.get("arguments")
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments if arguments is not None else {})
        calls.append({"id": f"call_{uuid.uuid4().hex[:20]}", "type": "function",
                      "function": {"name": str(function.get("name") or ""),
                                   "arguments": arguments}})
    if calls:
        out["tool_calls"] = calls
    elif out["content"] is None:
        out["content"] = ""
    return out


def _parse_arguments(raw: Any) -> tuple[Any, str | None]:
    if raw is None or raw == "":
        return {}, None
    if isinstance(raw, dict):
        return raw, None
    try:
        value = json.loads(raw)
    except (TypeError, json.JSONDecodeError) as exc:
        return raw, f"arguments are not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc})"
    return value, None


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
