"""Phoenix: a node runtime for distributed, stateful Python agents.

``Client`` and ``Node`` are imported lazily so that ``phoenix_node.state``
stays importable without ZeroMQ or the worker layer.
"""

from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
    from .client import Client
    from .node import Node

__all__ = ["Client", "Node", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Client":
        from .client import Client

        return Client
    if name == "Node":
        from .node import Node

        return Node
    raise AttributeError(f"module 'phoenix_node' has no attribute {name!r}")
