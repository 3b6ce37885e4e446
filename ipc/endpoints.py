"""Endpoint strings: validation and the names of a node's local ipc sockets.

Accepted forms:

- ``tcp://HOST:PORT`` where PORT is 1..65535, or ``0`` / ``*`` for "any free
  port" (ZeroMQ picks one; read the bound endpoint back from the socket);
- ``ipc://@NAME`` (Linux abstract namespace: no file, nothing to clean up, and
  no silent theft of a path by a second bind) or ``ipc:///short/path``; the
  address is limited to 107 bytes (``sun_path``);
- ``inproc://NAME`` (same process, same ZeroMQ context).
"""

from __future__ import annotations

from ._errors import EndpointError

__all__ = ["bindable", "check_endpoint", "worker_ipc_endpoint"]

_IPC_MAX = 107


def check_endpoint(endpoint: str) -> str:
    """Return ``endpoint`` if valid, else raise :class:`EndpointError` saying why."""
    if not isinstance(endpoint, str):
        raise EndpointError(f"endpoint must be a str, got {type(endpoint).__name__}")
    scheme, sep, rest = endpoint.partition("://")
    if not sep or not rest:
        raise EndpointError(f"endpoint {endpoint!r} is not of the form scheme://address")
    if scheme == "tcp":
        host, colon, port = rest.rpartition(":")
        if not colon or not host:
            raise EndpointError(f"tcp endpoint {endpoint!r} needs HOST:PORT")
        if port != "*" and not (port.isascii() and port.isdigit() and 0 <= int(port) <= 65535):
            raise EndpointError(f"tcp endpoint {endpoint!r}: port must be 0..65535 or *")
        return endpoint
    if scheme == "ipc":
        if len(rest.encode()) > _IPC_MAX:
            raise EndpointError(f"ipc endpoint {endpoint!r} is longer than {_IPC_MAX} bytes")
        return endpoint
    if scheme == "inproc":
        return endpoint
    raise EndpointError(f"endpoint {endpoint!r}: scheme must be tcp, ipc or inproc")


def bindable(endpoint: str) -> str:
    """The form to pass to ``bind``: a tcp port of 0 becomes ZeroMQ's ``*``."""
    check_endpoint(endpoint)
    if endpoint.startswith("tcp://") and endpoint.endswith(":0"):
        return endpoint[:-1] + "*"
    return endpoint


def worker_ipc_endpoint(node_id: str, index: int) -> str:
    """The abstract-namespace ipc endpoint of worker ``index`` of node ``node_id``."""
    return check_endpoint(f"ipc://@phoenix-{node_id}-w{index}")


def control_ipc_endpoint(node_id: str) -> str:
    """The abstract-namespace ipc endpoint of the node's control process."""
    return check_endpoint(f"ipc://@phoenix-{node_id}-ctl")
