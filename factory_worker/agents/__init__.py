"""Agent runners: the protocol and the command (subprocess) runner."""

from .base import OUTCOMES, AgentResult, AgentRunner, Dispatch
from .command import CommandAgent

__all__ = ["OUTCOMES", "AgentResult", "AgentRunner", "CommandAgent", "Dispatch"]
