"""AgentHost (workers/host.py) with a real LMDB Store and a fake clock, no processes:
activation, dispatch errors, lifecycle hooks, group commit, passivation, LRU, tells."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ipc.protocol import TELL, ErrorCode, pack, unpack
from phoenix_node.demo import Counter
from phoenix_node.state import GCounter, LWWMap, StoreWriteError
from phoenix_node.state.store import Store
from workers.agent import Agent, action
from workers.host import REPLICATE_DELTAS, REPLICATE_KEY, REPLICATE_OFF, REPLICATE_WHOLE, AgentHost
from workers.replog import entry_agent, read_entry

EVENTS: list[tuple[Any, ...]] = []


class Probe(Agent):
    """Records its lifecycle hooks in EVENTS; some keys misbehave on purpose."""

    hits = GCounter()

    def on_start(self) -> None:
        EVENTS.append(("start", self.id, self.hits.value))
        if self.key.startswith("badstart"):
            raise RuntimeError("cannot start")

    def on_stop(self) -> None:
        EVENTS.append(("stop", self.id))
        if self.key.startswith("stopwrite"):
            self.hits.increment(self.replica, 100)
        if self.key.startswith("badstop"):
            raise RuntimeError("cannot stop")

    def on_failure(self, error: BaseException, action_name: str) -> None:
        EVENTS.append(("failure", self.id, action_name, type(error).__name__, str(error)))
        if self.key.startswith("badfailure"):
            raise RuntimeError("on_failure broke too")

    @action
    def hit(self, n: int = 1) -> int:
        self.hits.increment(self.replica, n)
        return self.hits.value

    @action
    def read(self) -> int:
        return self.hits.value

    @action
    def need(self, value: int) -> int:
        return value

    @action
    def boom(self, message: str = "kaput") -> None:
        self.hits.increment(self.replica)
        raise ValueError(message)

    @action
    def inner_type_error(self) -> int:
        return len(5)  # type: ignore[arg-type]

    @action
    def assign(self) -> None:
        self.hits = GCounter()

    @action
    def send(self, target: str, n: int = 1) -> None:
        self.tell(target, "hit", n=n)

    @action
    def send_unpackable(self, target: str) -> None:
        self.tell(target, "hit", n=object())


class Quick(Probe):
    type_name = "Quick"
    hits = GCounter()
    idle_timeout = 1.0


class Shelf(Agent):
    """A map and a counter: a large state whose writes change a small part of it."""

    items = LWWMap()
    hits = GCounter()

    @action
    def put(self, key: str, value: Any) -> None:
        self.items.put(self.replica, key, value)

    @action
    def fill(self, n: int) -> None:
        for i in range(n):
            self.items.put(self.replica, f"k{i}", "v" * 20)

    @action
    def hit(self) -> None:
        self.hits.increment(self.replica)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


TYPES: dict[str, type[Agent]] = {
    "Probe": Probe,
    "Quick": Quick,
    "Counter": Counter,
    "Shelf": Shelf,
}


@pytest.fixture(autouse=True)
def clear_events() -> Iterator[None]:
    EVENTS.clear()
    yield
    EVENTS.clear()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "db", durability="buffered")
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


MakeHost = Callable[..., AgentHost]


@pytest.fixture
def make_host(store: Store, clock: FakeClock) -> MakeHost:
    def make(**kwargs: Any) -> AgentHost:
        kwargs.setdefault("idle_timeout", 10.0)
        kwargs.setdefault("clock", clock)
        return AgentHost(dict(TYPES), store, "node:0", **kwargs)

    return make


@pytest.fixture
def host(make_host: MakeHost) -> AgentHost:
    return make_host()


def ask(host: AgentHost, agent_id: str, action_name: str, **kwargs: Any) -> tuple[int, Any]:
    return host.handle(agent_id, action_name, pack(kwargs))


def stored_hits(store: Store, agent_id: str) -> int | None:
    raw = store.load_state(agent_id)
    if raw is None:
        return None
    return Probe.__phoenix_schema__.decode(raw)["hits"].value


def store_hits(store: Store, agent_id: str, n: int) -> None:
    state = Probe.__phoenix_schema__.new_state()
    state["hits"].increment("elsewhere:1", n)
    batch = store.batch()
    batch.save_state(agent_id, state.encode())
    store.commit(batch)


# --- activation -----------------------------------------------------------------------------


def test_activation_loads_the_stored_state(host: AgentHost, store: Store) -> None:
    store_hits(store, "Probe/a", 7)
    assert ask(host, "Probe/a", "read") == (0, 7)
    assert EVENTS == [("start", "Probe/a", 7)]  # on_start already sees the loaded state
    assert ask(host, "Probe/a", "hit") == (0, 8)
    assert ask(host, "Probe/new", "read") == (0, 0)
    assert host.activations == 2 and set(host.active) == {"Probe/a", "Probe/new"}


def test_unreadable_stored_state_is_an_internal_error(host: AgentHost, store: Store) -> None:
    batch = store.batch()
    batch.save_state("Probe/corrupt", b"\xc1 not a state")
    store.commit(batch)
    status, payload = ask(host, "Probe/corrupt", "read")
    assert status == ErrorCode.INTERNAL == payload["code"]
    assert payload["agent"] == "Probe/corrupt" and "Probe/corrupt" in payload["message"]
    assert "Probe/corrupt" not in host.active and EVENTS == []


# --- dispatch errors -----------------------------------------------------------------------


def test_unknown_agent_type(host: AgentHost) -> None:
    status, payload = ask(host, "Nope/1", "get")
    assert status == ErrorCode.UNKNOWN_AGENT_TYPE
    assert payload == {
        "code": ErrorCode.UNKNOWN_AGENT_TYPE,
        "message": payload["message"],
        "agent": "Nope/1",
        "action": "get",
        "type": "",
    }
    assert "'Nope'" in payload["message"] and "Counter, Probe, Quick" in payload["message"]
    assert host.active == {} and host.failed == 1 and host.handled == 1


def test_unknown_action(host: AgentHost) -> None:
    status, payload = ask(host, "Probe/1", "fly")
    assert status == ErrorCode.UNKNOWN_ACTION == payload["code"]
    assert payload["agent"] == "Probe/1" and payload["action"] == "fly"
    assert "'fly'" in payload["message"] and "hit" in payload["message"]
    assert host.active == {}, "an unknown action must not activate the agent"


@pytest.mark.parametrize(
    ("action_name", "kwargs", "fragment"),
    [
        ("hit", {"wings": 2}, "unexpected keyword"),
        ("need", {}, "missing 1 required"),
        ("hit", {"self": 1}, "multiple values"),
    ],
)
def test_arguments_that_do_not_fit_are_bad_arguments(
    host: AgentHost, action_name: str, kwargs: dict[str, Any], fragment: str
) -> None:
    status, payload = ask(host, "Probe/args", action_name, **kwargs)
    assert status == ErrorCode.BAD_ARGUMENTS == payload["code"]
    assert payload["agent"] == "Probe/args" and payload["action"] == action_name
    assert payload["type"] == "TypeError" and fragment in payload["message"]
    assert f"Probe.{action_name}" in payload["message"]
    assert EVENTS == [("start", "Probe/args", 0)], "on_failure is not for bad arguments"


@pytest.mark.parametrize(
    "payload",
    [pack([1, 2]), pack(5), pack(None), b"\xc1", pack({"n": 1})[:-1], pack({1: 2})],
    ids=["list", "int", "nil", "garbage", "truncated", "int key"],
)
def test_payload_that_is_not_a_msgpack_map_is_a_bad_request(
    host: AgentHost, payload: bytes
) -> None:
    status, body = host.handle("Probe/p", "hit", payload)
    assert status == ErrorCode.BAD_REQUEST == body["code"]
    assert body["agent"] == "Probe/p" and body["action"] == "hit"


def test_an_empty_payload_means_no_arguments(host: AgentHost) -> None:
    assert host.handle("Probe/p", "hit", b"") == (0, 1)


def test_action_exception_is_action_failed_and_on_failure_runs(
    host: AgentHost, store: Store
) -> None:
    status, payload = ask(host, "Probe/f", "boom", message="it broke")
    assert status == ErrorCode.ACTION_FAILED == payload["code"]
    assert payload["agent"] == "Probe/f" and payload["action"] == "boom"
    assert payload["type"] == "ValueError"
    assert "Probe/f" in payload["message"] and "boom" in payload["message"]
    assert "ValueError" in payload["message"] and "it broke" in payload["message"]
    assert EVENTS[-1] == ("failure", "Probe/f", "boom", "ValueError", "it broke")
    # documented: changes made before the raise are committed, not rolled back
    assert host.commit()
    assert stored_hits(store, "Probe/f") == 1
    assert ask(host, "Probe/f", "read") == (0, 1), "the agent survives its failure"


def test_type_error_inside_an_action_is_action_failed_not_bad_arguments(
    host: AgentHost,
) -> None:
    status, payload = ask(host, "Probe/t", "inner_type_error")
    assert status == ErrorCode.ACTION_FAILED and payload["type"] == "TypeError"
    assert EVENTS[-1][:3] == ("failure", "Probe/t", "inner_type_error")


def test_on_failure_raising_is_ignored(host: AgentHost) -> None:
    status, payload = ask(host, "Probe/badfailure", "boom")
    assert status == ErrorCode.ACTION_FAILED and payload["type"] == "ValueError"
    assert ask(host, "Probe/badfailure", "read") == (0, 1)


def test_assigning_a_state_field_in_an_action_fails_the_action(host: AgentHost) -> None:
    status, payload = ask(host, "Probe/as", "assign")
    assert status == ErrorCode.ACTION_FAILED and payload["type"] == "AttributeError"
    assert "hits" in payload["message"]


def test_on_start_raising_fails_the_message_and_the_agent_is_not_kept(
    host: AgentHost,
) -> None:
    status, payload = ask(host, "Probe/badstart", "hit")
    assert status == ErrorCode.ACTION_FAILED == payload["code"]
    assert payload["agent"] == "Probe/badstart" and payload["action"] == "on_start"
    assert payload["type"] == "RuntimeError" and "cannot start" in payload["message"]
    assert "Probe/badstart" not in host.active
    assert host.commit() is True  # nothing to write
    # the next message tries again
    ask(host, "Probe/badstart", "hit")
    assert [e for e in EVENTS if e[0] == "start"] == [("start", "Probe/badstart", 0)] * 2
    assert host.activations == 0


# --- group commit ----------------------------------------------------------------------------


def test_commit_writes_only_changed_agents_in_one_batch(
    host: AgentHost, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real_commit = Store.commit

    def spy(self: Store, batch: Any) -> None:
        calls.append(len(batch))
        real_commit(self, batch)

    monkeypatch.setattr(Store, "commit", spy)  # Store has __slots__: patch the class
    store_hits(store, "Probe/c", 4)
    calls.clear()
    ask(host, "Probe/a", "hit", n=2)
    ask(host, "Probe/b", "hit")
    ask(host, "Probe/a", "hit")
    ask(host, "Probe/c", "read")  # touched, unchanged
    ask(host, "Probe/d", "read")  # activated, unchanged
    assert stored_hits(store, "Probe/a") is None, "nothing is written before commit"
    assert host.commit() is True
    assert calls == [2], "one transaction holding exactly the two changed agents"
    assert stored_hits(store, "Probe/a") == 3 and stored_hits(store, "Probe/b") == 1
    assert stored_hits(store, "Probe/c") == 4 and stored_hits(store, "Probe/d") is None
    assert host.commits == 1
    # nothing changed since: no transaction at all
    ask(host, "Probe/a", "read")
    assert host.commit() is True and calls == [2]


def test_a_failed_commit_drops_the_changed_agents_and_they_reload(
    host: AgentHost, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    ask(host, "Probe/a", "hit", n=5)
    ask(host, "Probe/keep", "read")
    assert host.commit()

    def broken(self: Store, batch: Any) -> None:
        raise StoreWriteError("disk full (simulated)")

    monkeypatch.setattr(Store, "commit", broken)  # Store has __slots__: patch the class
    assert ask(host, "Probe/a", "hit", n=10) == (0, 15)
    assert host.commit() is False
    assert "Probe/a" not in host.active, "a changed agent must not outlive a failed commit"
    assert "Probe/keep" in host.active, "unchanged agents stay"
    monkeypatch.undo()
    # the next message reloads the last committed state: the +10 never happened
    assert ask(host, "Probe/a", "read") == (0, 5)
    assert ask(host, "Probe/a", "hit") == (0, 6)
    assert host.commit() is True
    assert stored_hits(store, "Probe/a") == 6


# --- passivation -----------------------------------------------------------------------------


def test_idle_agents_are_passivated_with_on_stop_and_its_changes_committed(
    host: AgentHost, store: Store, clock: FakeClock
) -> None:
    ask(host, "Probe/old", "hit")
    ask(host, "Probe/stopwrite", "hit")
    clock.now += 8
    ask(host, "Probe/recent", "hit")
    assert host.commit()
    EVENTS.clear()
    clock.now += 2.5  # old and stopwrite idle 10.5 s > 10; recent 2.5 s
    assert host.passivate_idle() == 2
    assert sorted(EVENTS) == [("stop", "Probe/old"), ("stop", "Probe/stopwrite")]
    assert set(host.active) == {"Probe/recent"}
    assert host.passivations == 2
    assert stored_hits(store, "Probe/stopwrite") == 1, "committed only at commit()"
    assert host.commit()
    assert stored_hits(store, "Probe/stopwrite") == 101
    assert ask(host, "Probe/stopwrite", "read") == (0, 101)
    clock.now += 100
    assert host.passivate_idle() == 2


def test_nothing_is_passivated_before_its_timeout(host: AgentHost, clock: FakeClock) -> None:
    ask(host, "Probe/a", "hit")
    clock.now += 10.0  # exactly the timeout: still alive
    assert host.passivate_idle() == 0
    ask(host, "Probe/a", "read")  # use resets the idle time
    clock.now += 9.9
    assert host.passivate_idle() == 0 and "Probe/a" in host.active


def test_a_type_idle_timeout_overrides_the_host_default(host: AgentHost, clock: FakeClock) -> None:
    ask(host, "Probe/slow", "hit")
    ask(host, "Quick/fast", "hit")
    clock.now += 1.5
    assert host.passivate_idle() == 1
    assert set(host.active) == {"Probe/slow"}


def test_on_stop_raising_still_passivates(host: AgentHost, clock: FakeClock) -> None:
    ask(host, "Probe/badstop", "hit")
    assert host.commit()
    clock.now += 11
    assert host.passivate_idle() == 1 and host.active == {}
    assert ask(host, "Probe/badstop", "read") == (0, 1)


def test_stop_all_calls_on_stop_for_every_agent(host: AgentHost, store: Store) -> None:
    for key in ("a", "b", "stopwrite"):
        ask(host, f"Probe/{key}", "hit")
    host.stop_all()
    assert {e[1] for e in EVENTS if e[0] == "stop"} == {"Probe/a", "Probe/b", "Probe/stopwrite"}
    assert host.active == {}
    assert host.commit()
    assert stored_hits(store, "Probe/stopwrite") == 101
    assert stored_hits(store, "Probe/a") == 1


def test_max_active_evicts_the_least_recently_used(
    make_host: MakeHost, store: Store, clock: FakeClock
) -> None:
    host = make_host(max_active=2)
    ask(host, "Probe/a", "hit")
    clock.now += 1
    ask(host, "Probe/b", "hit")
    clock.now += 1
    ask(host, "Probe/a", "read")  # a is now more recent than b
    assert host.commit()
    clock.now += 1
    ask(host, "Probe/c", "hit")
    assert set(host.active) == {"Probe/a", "Probe/c"}
    assert ("stop", "Probe/b") in EVENTS and ("stop", "Probe/a") not in EVENTS
    assert host.commit()
    assert ask(host, "Probe/b", "read") == (0, 1), "an evicted agent keeps its state"
    assert len(host.active) == 2


def test_eviction_and_reactivation_within_one_batch_loses_no_update(
    make_host: MakeHost, store: Store
) -> None:
    host = make_host(max_active=1)
    assert ask(host, "Counter/a", "inc") == (0, 1)
    assert ask(host, "Counter/b", "inc") == (0, 1)  # evicts Counter/a, not yet committed
    assert ask(host, "Counter/a", "inc") == (0, 2)
    assert host.commit()
    assert ask(make_host(), "Counter/a", "get") == (0, 2)


# --- tells -----------------------------------------------------------------------------------


def test_tells_from_an_action_land_in_outgoing_packed(host: AgentHost) -> None:
    assert ask(host, "Probe/sender", "send", target="Counter/x", n=3) == (0, None)
    assert ask(host, "Probe/sender", "send", target="Probe/y") == (0, None)
    assert len(host.outgoing) == 2
    kind, agent_id, action_name, payload, delivery, sender, extra = host.outgoing.popleft()
    assert extra is None
    assert (kind, agent_id, action_name, delivery) == (TELL, "Counter/x", "hit", 0)
    assert sender == "Probe/sender"
    assert isinstance(payload, bytes) and unpack(payload) == {"n": 3}
    assert host.outgoing.popleft()[1] == "Probe/y"
    # a value msgpack cannot carry fails the sending action, and nothing is queued
    status, body = ask(host, "Probe/sender", "send_unpackable", target="Probe/y")
    assert status == ErrorCode.ACTION_FAILED and body["type"] == "TypeError"
    assert not host.outgoing


# --- replication: _merge and the change log -------------------------------------------------


def _probe_state(replica: str, n: int) -> bytes:
    agent = Probe.__phoenix_schema__.new_state(track_deltas=False)
    agent["hits"].increment(replica, n)
    return agent.encode()


def test_merge_joins_a_replica_state_into_stored_and_active_agents(
    host: AgentHost, store: Store
) -> None:
    assert host.handle("Probe/cold", "_merge", _probe_state("other:0", 5)) == (0, True)
    assert host.commit()
    assert ask(host, "Probe/cold", "hit") == (0, 6)  # activated from the merged state
    assert host.handle("Probe/cold", "_merge", _probe_state("other:0", 7)) == (0, True)
    assert ask(host, "Probe/cold", "read") == (0, 8)  # merged into the active agent
    assert host.commit()
    assert host.handle("Probe/cold", "_merge", _probe_state("other:0", 7)) == (0, False)
    assert not host.active["Probe/cold"]._state.dirty  # a merge that adds nothing
    host.stop_all()
    assert host.commit()
    assert Probe.__phoenix_schema__.decode(store.load_state("Probe/cold") or b"").value == {
        "hits": 8
    }


def test_merge_refuses_what_is_not_a_state_of_that_type(host: AgentHost) -> None:
    code, payload = host.handle("Probe/x", "_merge", b"\x93\x01\x02\x03")
    assert code == ErrorCode.BAD_REQUEST and "replica state" in payload["message"]
    code, _ = host.handle("Nope/x", "_merge", _probe_state("o", 1))
    assert code == ErrorCode.UNKNOWN_AGENT_TYPE


def test_commits_log_changed_agents_for_replication_but_not_merges(
    host: AgentHost, store: Store, clock: FakeClock
) -> None:
    ask(host, "Probe/before", "hit")
    assert host.commit()
    assert list(store.iter_items("repl")) == []  # no peers: nothing logged
    with store.batch() as b:
        b.put("meta", b"cluster.replicate", b"1")
    host._replicate_checked = -10.0  # the flag is re-read at most once a second
    ask(host, "Probe/changed", "hit")
    host.handle("Probe/merged", "_merge", _probe_state("other:0", 2))
    host.handle("Probe/before", "_merge", _probe_state("other:0", 2))  # active, merge only
    assert host.commit()
    assert [entry_agent(k) for k, _ in store.iter_items("repl")] == ["Probe/changed"]


# --- migration: _release -------------------------------------------------------------------


def _hits(state: bytes | None) -> int:
    assert state is not None
    value: int = Probe.__phoenix_schema__.decode(state).value["hits"]
    return value


def test_release_stops_the_agent_and_returns_its_uncommitted_state(
    host: AgentHost, store: Store
) -> None:
    ask(host, "Probe/m", "hit", n=4)  # changed in this batch, not committed yet
    code, state = host.handle("Probe/m", "_release", b"")
    assert code == 0 and _hits(state) == 4
    assert "Probe/m" not in host.active  # stopped (on_stop ran)
    # A merge or a message in the same batch sees the released state, not the store's.
    assert host.handle("Probe/m", "_merge", _probe_state("other:0", 1)) == (0, True)
    assert ask(host, "Probe/m", "read") == (0, 5)
    assert host.commit()
    assert _hits(store.load_state("Probe/m")) == 5


def test_release_of_an_inactive_agent_returns_its_stored_state_or_none(
    host: AgentHost, store: Store
) -> None:
    ask(host, "Probe/s", "hit", n=2)
    assert host.commit()
    host.stop_all()
    assert host.commit()
    code, state = host.handle("Probe/s", "_release", b"")
    assert code == 0 and _hits(state) == 2
    assert host.handle("Probe/never", "_release", b"") == (0, None)
    assert host.handle("Probe/merged", "_merge", _probe_state("o:0", 3)) == (0, True)
    code, state = host.handle("Probe/merged", "_release", b"")  # merged, not committed yet
    assert code == 0 and _hits(state) == 3
    code, _ = host.handle("Nope/x", "_release", b"")
    assert code == ErrorCode.UNKNOWN_AGENT_TYPE


def test_replica_merges_keep_the_committed_state_decoded_between_commits(
    host: AgentHost, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads: list[str] = []
    load = Store.load_state

    def counting(self: Store, agent_id: str) -> bytes | None:
        loads.append(agent_id)
        return load(self, agent_id)

    monkeypatch.setattr(Store, "load_state", counting)  # Store has __slots__: the class
    for n in (2, 5, 9):
        assert host.handle("Probe/r", "_merge", _probe_state("other:0", n)) == (0, True)
        assert host.commit()
        assert _hits(load(store, "Probe/r")) == n  # each commit stores the join
    assert host.handle("Probe/r", "_merge", _probe_state("other:0", 9)) == (0, False)
    assert host.handle("Probe/r", "_merge", _probe_state("other:0", 3)) == (0, False)
    assert loads == ["Probe/r"]  # loaded once, then kept decoded
    assert ask(host, "Probe/r", "hit") == (0, 10)  # activated from the kept state
    assert loads == ["Probe/r"]
    assert host.commit()
    assert _hits(load(store, "Probe/r")) == 10


def test_the_replica_cache_is_bounded_and_a_failed_commit_forgets_its_merges(
    host: AgentHost, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    host.replica_cache = 2
    for key in ("a", "b", "c"):
        host.handle(f"Probe/{key}", "_merge", _probe_state("other:0", 1))
    assert host.commit()
    assert list(host._replicas) == ["Probe/b", "Probe/c"]  # least recently merged dropped
    host.handle("Probe/b", "_merge", _probe_state("other:0", 4))

    def fail(self: Store, batch: Any) -> None:
        raise StoreWriteError("disk full (simulated)")

    monkeypatch.setattr(Store, "commit", fail)
    assert not host.commit()
    monkeypatch.undo()
    assert "Probe/b" not in host._replicas
    assert _hits(store.load_state("Probe/b")) == 1  # the failed merge was not stored
    assert host.handle("Probe/b", "_merge", _probe_state("other:0", 4)) == (0, True)
    assert host.commit()
    assert _hits(store.load_state("Probe/b")) == 4


# --- replication: deltas in the change log --------------------------------------------------

SHELF = Shelf.__phoenix_schema__


def set_replication(host: AgentHost, store: Store, flag: bytes) -> None:
    """What the control process does when the node gains or loses peers."""
    with store.batch() as b:
        b.put("meta", REPLICATE_KEY, flag)
    host._replicate_checked = -10.0
    host._replicating()  # read now (a worker reads it at a commit, at most every 0.2 s)


def entries(store: Store, agent_id: str) -> list[tuple[bytes, bytes]]:
    """The change log entries of ``agent_id``, oldest first (one per commit)."""
    return [(k, v) for k, v in store.iter_items("repl") if entry_agent(k) == agent_id]


def logged(store: Store, agent_id: str) -> tuple[bytes, dict[str, Any] | None]:
    """The stamp and the delta's value (None: whole-state mark) of the newest entry."""
    found = entries(store, agent_id)
    assert found, f"{agent_id} is not logged"
    stamp, delta = read_entry(found[-1][1])
    return stamp, None if delta is None else SHELF.decode(delta).value


def shipped(store: Store, agent_id: str) -> None:
    """The control shipped the agent's entries to every replica and deleted them."""
    found = entries(store, agent_id)
    assert found
    assert store.delete_if("repl", found) == len(found)


@pytest.mark.timeout(30)
def test_each_commit_logs_its_own_entry_with_that_commits_delta(
    host: AgentHost, store: Store
) -> None:
    set_replication(host, store, REPLICATE_DELTAS)
    ask(host, "Shelf/s", "fill", n=100)
    assert host.commit()
    _, delta = logged(store, "Shelf/s")
    assert delta is None  # activated here: the first change ships the whole state
    shipped(store, "Shelf/s")
    ask(host, "Shelf/s", "put", key="k1", value="one")
    assert host.commit()
    first, delta = logged(store, "Shelf/s")
    assert delta == {"items": {"k1": "one"}, "hits": 0}  # what changed, not the 100 keys
    ask(host, "Shelf/s", "put", key="k2", value="two")  # before the first was shipped
    ask(host, "Shelf/s", "hit")
    assert host.commit()
    second, delta = logged(store, "Shelf/s")
    assert second != first
    assert delta == {"items": {"k2": "two"}, "hits": 1}  # this commit's change only
    found = entries(store, "Shelf/s")
    assert [read_entry(v)[0] for _, v in found] == [first, second]  # the first one stays
    state = store.load_state("Shelf/s")
    assert state is not None and all(len(v) < len(state) / 10 for _, v in found)


@pytest.mark.timeout(30)
def test_agents_active_before_replication_or_changed_by_a_merge_log_the_whole_state(
    host: AgentHost, store: Store
) -> None:
    ask(host, "Shelf/early", "put", key="a", value=1)
    assert host.commit()
    assert not host.active["Shelf/early"]._state.tracks_deltas  # alone: no delta cost
    assert list(store.iter_items("repl")) == []
    set_replication(host, store, REPLICATE_DELTAS)
    ask(host, "Shelf/early", "put", key="b", value=2)
    assert host.commit()
    assert logged(store, "Shelf/early")[1] is None  # its delta since activation: unknown
    shipped(store, "Shelf/early")
    ask(host, "Shelf/early", "put", key="c", value=3)
    assert host.commit()
    assert logged(store, "Shelf/early")[1] == {"items": {"c": 3}, "hits": 0}
    shipped(store, "Shelf/early")
    other = SHELF.new_state(track_deltas=False)
    other["items"].put("other:0", "m", "merged")
    assert host.handle("Shelf/early", "_merge", other.encode()) == (0, True)
    ask(host, "Shelf/early", "put", key="d", value=4)
    assert host.commit()
    assert logged(store, "Shelf/early")[1] is None  # the merged key is in no delta
    shipped(store, "Shelf/early")
    ask(host, "Shelf/early", "put", key="e", value=5)
    assert host.commit()
    assert logged(store, "Shelf/early")[1] == {"items": {"e": 5}, "hits": 0}


@pytest.mark.timeout(30)
def test_a_failed_commit_loses_no_delta_the_next_change_ships_the_whole_state(
    host: AgentHost, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_replication(host, store, REPLICATE_DELTAS)
    ask(host, "Shelf/f", "put", key="a", value=1)
    assert host.commit()
    shipped(store, "Shelf/f")
    ask(host, "Shelf/f", "put", key="b", value=2)
    assert host.commit()  # logged: a delta with b
    ask(host, "Shelf/f", "put", key="c", value=3)

    def fail(self: Store, batch: Any) -> None:
        raise StoreWriteError("disk full (simulated)")

    monkeypatch.setattr(Store, "commit", fail)
    assert not host.commit()  # c is lost (its client hears STORE_FAILED), b still logged
    monkeypatch.undo()
    assert logged(store, "Shelf/f")[1] == {"items": {"b": 2}, "hits": 0}
    ask(host, "Shelf/f", "put", key="d", value=4)  # reloaded from the store
    assert host.commit()
    assert logged(store, "Shelf/f")[1] is None  # the whole state: b and d both shipped
    assert SHELF.decode(store.load_state("Shelf/f") or b"").value["items"] == {
        "a": 1,
        "b": 2,
        "d": 4,
    }


@pytest.mark.timeout(30)
def test_an_agent_id_too_long_for_a_per_commit_key_logs_whole_marks_under_its_id(
    host: AgentHost, store: Store
) -> None:
    set_replication(host, store, REPLICATE_DELTAS)
    long_id = "Shelf/" + "x" * 500  # 506 bytes: with a separator and a stamp, past 511
    for value in (1, 2):
        ask(host, long_id, "put", key="a", value=value)
        assert host.commit()
    found = entries(store, long_id)
    assert [k for k, _ in found] == [long_id.encode()]  # one entry, rewritten
    assert read_entry(found[0][1])[1] is None  # the whole state: nothing lost


@pytest.mark.timeout(30)
def test_whole_state_replication_and_no_replication_track_no_deltas(
    host: AgentHost, store: Store
) -> None:
    set_replication(host, store, REPLICATE_WHOLE)  # replication_deltas off
    ask(host, "Shelf/w", "put", key="a", value=1)
    assert host.commit()
    assert logged(store, "Shelf/w")[1] is None
    assert not host.active["Shelf/w"]._state.tracks_deltas
    set_replication(host, store, REPLICATE_DELTAS)
    ask(host, "Shelf/w", "put", key="b", value=2)
    assert host.commit()
    assert host.active["Shelf/w"]._state.tracks_deltas
    set_replication(host, store, REPLICATE_OFF)  # alone again: tracking stops
    ask(host, "Shelf/w", "put", key="c", value=3)
    assert host.commit()
    assert not host.active["Shelf/w"]._state.tracks_deltas


def _shelf_record(**items: Any) -> bytes:
    state = SHELF.new_state(track_deltas=False)
    for key, value in items.items():
        state["items"].put("owner:0", key, value)
    return state.encode()


def _shelf_delta(state: Any, **items: Any) -> bytes:
    for key, value in items.items():
        state["items"].put("owner:0", key, value)
    delta = state.take_delta()
    assert delta is not None
    data: bytes = delta.encode()
    return data


@pytest.mark.timeout(30)
def test_merged_deltas_join_the_stored_state_and_the_cache_holds_the_join(
    host: AgentHost, store: Store
) -> None:
    owner = SHELF.new_state()
    base = _shelf_delta(owner, **{f"k{i}": i for i in range(10)})
    assert host.handle("Shelf/r", "_merge", owner.encode()) == (0, True)  # whole first
    assert host.commit()
    d1 = _shelf_delta(owner, k10=10)
    d2 = _shelf_delta(owner, k11=11)
    assert len(d1) < len(owner.encode()) / 3
    assert host.handle("Shelf/r", "_merge", d1) == (0, True)
    assert host.commit()
    assert host.handle("Shelf/r", "_merge", d2) == (0, True)  # from the kept state
    assert host.handle("Shelf/r", "_merge", d1) == (0, False)  # again: nothing new
    assert host.commit()
    assert store.load_state("Shelf/r") == owner.encode()  # the join, not the last delta
    code, _ = ask(host, "Shelf/r", "hit")  # activated from the kept state
    assert code == 0 and host.active["Shelf/r"]._state.value["items"] == owner.value["items"]
    assert base  # the first ten keys came with the whole state


@pytest.mark.timeout(30)
def test_a_delta_equal_in_bytes_to_the_stored_state_changes_nothing_and_is_not_kept_as_it(
    host: AgentHost, store: Store
) -> None:
    record = _shelf_record(a=1)
    assert host.handle("Shelf/e", "_merge", record) == (0, True)
    assert host.commit()
    owner = SHELF.new_state()
    owner["items"].merge_in(SHELF.decode(record)["items"])
    delta = _shelf_delta(owner, b=2)  # a delta of the one field
    assert host.handle("Shelf/e", "_merge", delta) == (0, True)
    assert host.commit()
    assert host.handle("Shelf/e", "_merge", delta) == (0, False)  # cached path
    stored = store.load_state("Shelf/e")
    assert stored is not None
    host._replicas.clear()
    assert host.handle("Shelf/e", "_merge", stored) == (0, False)  # equal bytes, no decode
    assert "Shelf/e" not in host._replicas
    assert host.handle("Shelf/e", "_merge", _shelf_delta(owner, c=3)) == (0, True)
    assert host.commit()
    assert SHELF.decode(store.load_state("Shelf/e") or b"").value["items"] == {
        "a": 1,
        "b": 2,
        "c": 3,
    }


@pytest.mark.timeout(30)
def test_an_agent_merged_into_then_written_in_one_batch_is_logged(
    host: AgentHost, store: Store
) -> None:
    set_replication(host, store, REPLICATE_WHOLE)
    ask(host, "Probe/mw", "hit")
    assert host.commit()
    shipped(store, "Probe/mw")
    assert host.handle("Probe/mw", "_merge", _probe_state("other:0", 5)) == (0, True)
    assert ask(host, "Probe/mw", "hit") == (0, 7)  # a write after the merge, same batch
    assert host.commit()
    assert entries(store, "Probe/mw")  # shipped: the write reaches the replicas
