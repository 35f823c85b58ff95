"""agents/: agent runners. The AgentRunner protocol, the command (subprocess) runner and its supervision:
process plumbing (PDEATHSIG, uid/gid, groups), the sandbox (identity, allowlisted environment, working
directory), the lease keeper, private capped logs.

May import: sources (the Issue model), ledger, config.

Agent runners: the protocol and the command (subprocess) runner.

``CommandAgent`` is loaded on first use: settings validation imports ``agents.lease`` (two lease
formulas), and the CLI's status commands should not pay for the process plumbing (ctypes, setpriv).
"""

from typing import Any

from factory_worker.agents.base import AgentResult, AgentRunner, Dispatch

__all__ = ["AgentResult", "AgentRunner", "CommandAgent", "Dispatch"]


def __getattr__(name: str) -> Any:
    if name == "CommandAgent":
        from factory_worker.agents.command import CommandAgent

        return CommandAgent
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
