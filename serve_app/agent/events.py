"""What the agent loop tells the outside about its tool calls (metrics), derived from the
audit rows it writes: every call the model asks for, run or not, gets its rows there
(runner.py), so these counts agree with the audit log.

`AgentService(events=...)` takes an `AgentEvents`, which reports to a sink with
`tool_call` and `confirmation` (deployments/metrics.py `AgentMetrics`: Ray Serve counters);
the default reports nowhere.

- `tool_call(tool, outcome)` once per call, on its `finished` row: `ok` or `error` for a
  call that was decided `auto` or `approved` (an invalid call that was refused before
  running is an `error` too), else the decision that refused it (`blocked`, `denied`,
  `expired`); `interrupted` for one whose replica died while it ran.
- `confirmation(tool, decision)`: `requested` when a call starts waiting for a human, then
  `approved`, `denied` or `expired`.

Events never disturb the loop: a failing hook is logged and ignored.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Protocol

logger = logging.getLogger(__name__)

CONFIRMATION_DECISIONS = ("approved", "denied", "expired")
RAN = ("auto", "approved")
_REMEMBERED = 10_000  # started-but-unfinished calls kept (a crash leaves some behind)


class EventSink(Protocol):
    def tool_call(self, tool: str, outcome: str) -> None: ...

    def confirmation(self, tool: str, decision: str) -> None: ...


class _Nowhere:
    def tool_call(self, tool: str, outcome: str) -> None:
        pass

    def confirmation(self, tool: str, decision: str) -> None:
        pass


class AgentEvents:
    """`audited` turns audit rows into the sink's events."""

    def __init__(self, sink: EventSink | None = None) -> None:
        self.sink: EventSink = sink or _Nowhere()
        self._decisions: OrderedDict[str, str] = OrderedDict()

    def audited(self, event: str, tool: str, call_id: str, fields: dict[str, Any]) -> None:
        """One audit row was written (runner.AgentService._append_audit)."""
        try:
            self._derive(event, tool, call_id, fields)
        except Exception:
            logger.warning("agent event hook failed", exc_info=True)

    def _derive(self, event: str, tool: str, call_id: str, fields: dict[str, Any]) -> None:
        decision = fields.get("decision")
        if event == "requested":
            self.sink.confirmation(tool, "requested")
        elif event == "started":
            if decision in CONFIRMATION_DECISIONS:
                self.sink.confirmation(tool, decision)
            self._decisions[call_id] = str(decision or "auto")
            while len(self._decisions) > _REMEMBERED:
                self._decisions.popitem(last=False)
        elif event == "finished":
            decided = self._decisions.pop(call_id, None)
            if decided is None:  # no started row from this process: recovery after a crash
                outcome = "interrupted"
            elif decided in RAN:
                outcome = "error" if fields.get("error") else "ok"
            else:
                outcome = decided
            self.sink.tool_call(tool, outcome)
