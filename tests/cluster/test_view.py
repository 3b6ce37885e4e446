"""The node view (phoenix_node/cluster/view.py) and the engine's routing by it: which
node owns an agent, published by the control process through LMDB, read by workers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipc.protocol import AT_LEAST_ONCE, AT_MOST_ONCE, pack, unpack
from phoenix_node.cluster.ring import Ring
from phoenix_node.cluster.view import VERSION_KEY, VIEW_KEY, NodeView, ViewPublisher
from phoenix_node.state.store import Store
from workers.engine import OTHER_NODE, Engine
from workers.host import AgentHost
from workers.placement import owner_index

A, B = "tcp://10.0.0.1:7000", "tcp://10.0.0.2:7000"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "db", durability="buffered")
    try:
        yield s
    finally:
        s.close()


def split(ring: Ring, n: int = 200) -> tuple[list[str], list[str]]:
    keys = [f"Counter/{i}" for i in range(n)]
    return [k for k in keys if ring.owner(k) == A], [k for k in keys if ring.owner(k) == B]


def test_a_view_routes_by_the_ring_and_placements_override_it() -> None:
    ring = Ring({A: 1.0, B: 1.0})
    on_a, on_b = split(ring)
    assert on_a and on_b
    view = NodeView(A, ring, {on_a[0]: B})
    assert view.clustered()
    assert not view.elsewhere(on_a[1])
    assert view.elsewhere(on_b[0])
    assert view.elsewhere(on_a[0])  # placed on B
    assert view.owner(on_a[0]) == B
    again = NodeView.from_wire(unpack(pack(view.to_wire())))
    assert [again.owner(k) for k in on_a + on_b] == [view.owner(k) for k in on_a + on_b]


def test_a_view_of_one_node_is_not_clustered_unless_something_is_placed_away() -> None:
    alone = Ring({A: 1.0})
    assert not NodeView(A, alone, {}).clustered()
    assert NodeView(A, alone, {"Counter/1": B}).clustered()


@pytest.mark.parametrize(
    "raw",
    [
        None,
        [],
        {"me": A, "vnodes": 128, "members": {A: 1.0}},
        {"me": 1, "vnodes": 128, "members": {A: 1.0}, "placements": {}},
        {"me": A, "vnodes": True, "members": {A: 1.0}, "placements": {}},
        {"me": A, "vnodes": 128, "members": {A: -1.0}, "placements": {}},
        {"me": A, "vnodes": 128, "members": {A: 1.0}, "placements": {"Counter/1": 5}},
        {"me": A, "vnodes": 0, "members": {A: 1.0}, "placements": {}},
    ],
)
def test_a_bad_view_is_refused_with_a_value_error(raw: Any) -> None:
    with pytest.raises(ValueError):
        NodeView.from_wire(raw)


def test_the_publisher_writes_only_changes_and_only_live_placements(store: Store) -> None:
    pub = ViewPublisher(store, A)
    ring = Ring({A: 1.0, B: 1.0})
    placements = {"Counter/1": B, "Counter/2": "tcp://gone:1"}
    assert pub.publish(ring, placements)
    version, view = NodeView.load(store)
    assert view is not None and version == store.get("meta", VERSION_KEY)
    assert view.placements == {"Counter/1": B}  # a placement on a non-member is ignored
    assert not pub.publish(ring, placements)  # same objects: nothing written
    assert not pub.publish(Ring({A: 1.0, B: 1.0}), dict(placements))  # equal: nothing
    assert NodeView.load(store, version) == (version, None)  # unchanged: not re-read
    assert pub.publish(ring.without_member(B), placements)
    version2, view2 = NodeView.load(store, version)
    assert version2 != version and view2 is not None and not view2.clustered()
    assert pub.published == 2


def test_an_unreadable_stored_view_reads_as_none(store: Store) -> None:
    batch = store.batch()
    batch.put("meta", VIEW_KEY, b"\xc1garbage")
    batch.put("meta", VERSION_KEY, b"12345678")
    store.commit(batch)
    assert NodeView.load(store) == (b"12345678", None)


def _engine(store: Store, workers: int = 2) -> Engine:
    from phoenix_node.demo import Counter

    host = AgentHost({"Counter": Counter}, store, "n#1")
    return Engine(host, store, index=0, workers=workers, node_id="n")


def test_the_engine_sends_other_nodes_agents_through_the_control_process(store: Store) -> None:
    engine = _engine(store)
    ring = Ring({A: 1.0, B: 1.0})
    on_a, on_b = split(ring)
    local = next(k for k in on_a if owner_index(k, 2) == 1)
    far = [k for k in on_b if owner_index(k, 2) == 1][:2]
    engine.elsewhere = NodeView(A, ring, {}).elsewhere
    kwargs = pack({"n": 1})
    engine._send_tell(far[0], "inc", kwargs, AT_LEAST_ONCE, "Counter/me")
    engine._send_tell(far[1], "inc", kwargs, AT_MOST_ONCE, "Counter/me")
    engine._send_tell(local, "inc", kwargs, AT_LEAST_ONCE, "Counter/me")
    assert engine.commit()
    out = engine.flush()
    assert sorted(out.remote) == [OTHER_NODE, 1]
    assert [unpack(e)[2] for e in out.remote[OTHER_NODE]] == far
    assert [unpack(e)[2] for e in out.remote[1]] == [local]
    # A retry is routed again by the current view: the node is alone now, so the
    # at-least-once tell to far[0] goes to this node's worker 1 (at-most-once: gone).
    engine.elsewhere = None
    engine.outbox._clock = lambda: 1e12  # every retry is due
    engine.send_due()
    out = engine.flush()
    assert list(out.remote) == [1]
    assert sorted(unpack(e)[2] for e in out.remote[1]) == sorted([far[0], local])
