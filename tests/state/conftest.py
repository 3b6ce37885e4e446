"""Fixtures shared by the state tests."""

from __future__ import annotations

import pytest

from phoenix_node.state import HybridClock, hlc


class FakeWall:
    """A wall clock in milliseconds that only moves when a test moves it."""

    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


@pytest.fixture
def wall(monkeypatch: pytest.MonkeyPatch) -> FakeWall:
    """Replace the default clock by one on a fake wall clock."""
    fake = FakeWall(1_000_000)
    monkeypatch.setattr(hlc, "DEFAULT_CLOCK", HybridClock(fake))
    return fake
