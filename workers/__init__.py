"""workers: the worker process, the agent host and the plugin API.

Depends on :mod:`phoenix_node.state` and :mod:`ipc` only.
"""

from ._errors import AgentError, PluginError
from .agent import RESERVED_ARGUMENTS, Agent, action, validate_agent_class
from .placement import owner_index
from .plugins import ENTRY_POINT_GROUP, load_agent_types

__all__ = [
    "ENTRY_POINT_GROUP",
    "RESERVED_ARGUMENTS",
    "Agent",
    "AgentError",
    "PluginError",
    "action",
    "load_agent_types",
    "owner_index",
    "validate_agent_class",
]
