"""Guarded tool-using agent: sessions, tools, sandbox, budgets, confirmations, audit log.

Public surface (the AgentRunner deployment and the gateway use these):
- AgentService (runner.py): create_session / post_message / get / audit / confirm / delete
- AgentSettings (config.py): the `agent:` settings block
- ToolRegistry, Tool, default_registry (tools.py): add tools
- McpToolbox (mcp_tools.py): tools of the MCP servers in `agent.mcp_servers`, registered
  as ordinary tools (AgentService builds it)
- LLMPort, OpenAICompatibleLLM (llm_port.py): the model the agent talks to
- Principal (access.py): the key a call acts for (ownership, grants, confirmation policy)
"""
from serve_app.agent.access import Principal
from serve_app.agent.config import AgentSettings, BudgetLimits, SandboxSettings
from serve_app.agent.llm_port import LLMPort, OpenAICompatibleLLM
from serve_app.agent.runner import AgentService
from serve_app.agent.tools import Tool, ToolContext, ToolError, ToolRegistry, default_registry

__all__ = ["AgentService", "AgentSettings", "BudgetLimits", "LLMPort", "OpenAICompatibleLLM",
           "Principal", "SandboxSettings", "Tool", "ToolContext", "ToolError", "ToolRegistry",
           "default_registry"]
