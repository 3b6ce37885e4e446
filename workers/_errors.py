"""Errors of the worker layer."""

from __future__ import annotations

__all__ = ["AgentError", "PluginError"]


class AgentError(Exception):
    """Base class of errors raised on purpose by :mod:`workers`."""


class PluginError(AgentError):
    """An agent plugin cannot be loaded or is not a valid agent type.

    The message always names the plugin (``module:Class`` or entry point) and what
    is wrong with it; a node refuses to start rather than start half-way.
    """
