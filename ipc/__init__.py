"""ipc: the ZeroMQ transport (endpoints, socket factory, wire protocol).

Knows nothing about agents; depends on nothing else of Phoenix.
"""

from ._errors import EndpointError, ProtocolError, TransportError
from .endpoints import bindable, check_endpoint, control_ipc_endpoint, worker_ipc_endpoint
from .protocol import ErrorCode
from .sockets import make_dealer, make_router

__all__ = [
    "EndpointError",
    "ErrorCode",
    "ProtocolError",
    "TransportError",
    "bindable",
    "check_endpoint",
    "control_ipc_endpoint",
    "make_dealer",
    "make_router",
    "worker_ipc_endpoint",
]
