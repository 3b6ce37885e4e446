"""The engine (workers/engine.py) with a real LMDB store, no processes: an
at-least-once tell re-sent after it ran and was committed is acknowledged again
without running twice; one whose commit failed runs again."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ipc.protocol import AT_LEAST_ONCE, TELL, pack
from phoenix_node.demo import Counter
from phoenix_node.state import StoreWriteError
from phoenix_node.state.store import Store
from workers.engine import Engine, Msg
from workers.host import AgentHost

ROUTE = (b"sender",)
SOURCE = "phoenix://other/worker/0"


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    store = Store(tmp_path / "db", durability="buffered")
    try:
        host = AgentHost({"Counter": Counter}, store, "n#1")
        yield Engine(host, store, index=0, workers=1, node_id="n")
    finally:
        store.close()


def tell(engine: Engine, corr: int, source: str = SOURCE) -> list[int]:
    """Deliver an at-least-once ``inc`` tell, run and commit; the corr ids acknowledged."""
    msg = Msg(TELL, corr, "Counter/x", "inc", AT_LEAST_ONCE, {"source": source}, pack({}), ROUTE)
    engine.accept(msg)
    engine.run(100)
    engine.commit()
    return engine.flush().acks.get(ROUTE, [])


def count(engine: Engine) -> int:
    status, value = engine.host.handle("Counter/x", "get", pack({}))
    assert status == 0
    return int(value)


@pytest.mark.timeout(10)
def test_a_resend_of_a_committed_tell_is_acknowledged_without_running_again(
    engine: Engine,
) -> None:
    assert tell(engine, 5) == [5]
    assert tell(engine, 5) == [5]  # its ack was late: the sender sent it again
    assert count(engine) == 1
    assert engine.stats["resends_dropped"] == 1
    assert tell(engine, 6) == [6] and tell(engine, 5, source="phoenix://another/w/0") == [5]
    assert count(engine) == 3  # other corr ids and other senders run


@pytest.mark.timeout(10)
def test_a_tell_whose_commit_failed_runs_again_when_re_sent(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(self: Store, batch: object) -> None:
        raise StoreWriteError("disk full (simulated)")

    monkeypatch.setattr(Store, "commit", fail)
    assert tell(engine, 7) == []  # not acknowledged: STORE_FAILED
    monkeypatch.undo()
    assert tell(engine, 7) == [7]
    assert count(engine) == 1  # ran again, and this time it is stored
