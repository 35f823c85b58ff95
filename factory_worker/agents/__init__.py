"""Agent runners: the protocol and the command (subprocess) runner."""

from .base import AgentResult, AgentRunner, Dispatch
from .command import CommandAgent

__all__ = ["AgentResult", "AgentRunner", "CommandAgent", "Dispatch"]
