"""Fixtures of the cluster tests: the node tests' ``start_node``."""

from __future__ import annotations

from ..node.conftest import start_node

__all__ = ["start_node"]
