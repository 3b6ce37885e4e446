"""The Registry in isolation: real Stores, an injected clock and seeded randomness, and a
fake network that carries the gossip between copies as the control processes do."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from ipc.protocol import (
    ADMIN,
    ProtocolError,
    decode_header,
    encode_reply,
    pack,
    split_envelope,
    unpack,
)
from phoenix_node.cluster import registry as registry_module
from phoenix_node.cluster.registry import REGISTRY_ACTION, Registry, RegistryError
from phoenix_node.state import LWWMap, hlc
from phoenix_node.state.store import Store

from .test_replicator import Clock

N1, N2, N3, N4 = (f"tcp://127.0.0.1:{p}" for p in (1, 2, 3, 4))
AGENT = "Tally/a"


@pytest.fixture
def store(tmp_path: Path) -> Any:
    with Store(tmp_path / "db", durability="buffered") as s:
        yield s


def make(replica: str = f"{N1}#1", store: Store | None = None) -> Registry:
    """A registry whose every tick runs a digest round (interval 0)."""
    return Registry(replica, store=store, interval=0.0, clock=Clock(), rng=random.Random(1))


def placed(reg: Registry, agent: str, address: str | None) -> None:
    """A placement write made and applied on ``reg`` (what a migration does)."""
    reg.merge(reg.prepare_placement(agent, address))


class Net:
    """Copies at addresses; ``send`` queues a sync, ``pump`` delivers the queue and the
    answers as the control process does (ADMIN ``registry.sync`` -> on_sync -> reply)."""

    def __init__(self, count: int, seed: int = 7) -> None:
        self.clock = Clock()
        addresses = [N1, N2, N3, N4][:count]
        self.regs = {
            a: Registry(f"{a}#1", interval=1.0, clock=self.clock, rng=random.Random(seed + i))
            for i, a in enumerate(addresses)
        }
        self.queue: list[tuple[str, str, list[bytes]]] = []
        self.lose = False  # drop what is sent (the sender thinks it went)

    def sender(self, me: str) -> Any:
        def send(peer: str, frames: list[bytes]) -> bool:
            if not self.lose:
                self.queue.append((me, peer, frames))
            return True

        return send

    def pump(self) -> None:
        while self.queue:
            src, dst, frames = self.queue.pop(0)
            _, header, payload = split_envelope(frames)
            kind, corr, _, action = decode_header(header)
            assert (kind, action) == (ADMIN, REGISTRY_ACTION)
            result = self.regs[dst].on_sync(payload)
            assert self.regs[src].on_reply(dst, [b"", encode_reply(corr, 0), pack(result)])

    def round(self) -> None:
        for me, reg in self.regs.items():
            reg.tick([a for a in self.regs if a != me], self.sender(me))
        self.pump()
        self.clock.now += 1.0

    def digests(self) -> set[bytes]:
        return {reg.digest() for reg in self.regs.values()}

    def converge(self, rounds: int) -> int:
        """Rounds run until every copy has the same digest (fails after ``rounds``)."""
        for n in range(1, rounds + 1):
            self.round()
            if len(self.digests()) == 1:
                return n
        raise AssertionError(f"no convergence in {rounds} rounds")


class Sent:
    """A ``send`` that records (peer, frames) and reports them sent."""

    def __init__(self) -> None:
        self.frames: list[tuple[str, list[bytes]]] = []

    def __call__(self, peer: str, frames: list[bytes]) -> bool:
        self.frames.append((peer, frames))
        return True


def sync_payload(reg: Registry) -> tuple[int, bytes]:
    """(corr, payload) of the digest-only sync ``reg`` sends at its next round."""
    sent = Sent()
    reg.tick([N2], sent)
    assert len(sent.frames) == 1
    _, header, payload = split_envelope(sent.frames[0][1])
    assert unpack(payload)["copy"] is None
    return decode_header(header)[1], payload


def lww_copy(*keys: Any) -> bytes:
    m = LWWMap()
    for key in keys:
        m.put("x#1", key, "v")
    return m.encode()


# --- placements and metadata ------------------------------------------------------------


def test_a_prepared_placement_is_applied_only_by_merge() -> None:
    reg = make()
    before = reg.digest()
    write = reg.prepare_placement(AGENT, N2)
    assert reg.placement(AGENT) is None and not reg.has_placements()
    assert reg.digest() == before
    assert reg.merge(write) is True
    assert reg.placement(AGENT) == N2 and reg.has_placements()
    assert reg.placements() == {AGENT: N2}
    assert reg.merge(write) is False  # already held
    assert reg.digest() != before


def test_placements_returns_a_copy() -> None:
    reg = make()
    placed(reg, AGENT, N2)
    reg.placements()[AGENT] = N3
    assert reg.placement(AGENT) == N2


def test_removing_a_placement_leaves_the_ring_in_charge() -> None:
    reg = make()
    placed(reg, AGENT, N2)
    placed(reg, "Tally/b", N3)
    placed(reg, AGENT, None)
    assert reg.placement(AGENT) is None
    assert reg.placements() == {"Tally/b": N3}
    placed(reg, "Tally/b", None)
    assert not reg.has_placements() and reg.view()["placements"] == {}


def test_a_later_placement_replaces_an_earlier_one() -> None:
    reg = make()
    placed(reg, AGENT, N2)
    placed(reg, AGENT, N3)
    assert reg.placement(AGENT) == N3


def test_metadata_is_set_read_and_removed() -> None:
    reg = make()
    reg.set_meta(AGENT, {"owner": "ann", "tags": ["a", "b"]})
    placed(reg, "Tally/b", N2)
    assert reg.meta(AGENT) == {"owner": "ann", "tags": ["a", "b"]}
    assert reg.meta("Tally/b") is None
    assert reg.view() == {
        "placements": {"Tally/b": N2},
        "meta": {AGENT: {"owner": "ann", "tags": ["a", "b"]}},
        "weights": {},
    }
    reg.set_meta(AGENT, None)
    assert reg.meta(AGENT) is None
    assert reg.view()["meta"] == {}


def test_metadata_is_copied_in_and_out() -> None:
    reg = make()
    meta: dict[str, Any] = {"tags": ["a"]}
    reg.set_meta(AGENT, meta)
    meta["tags"].append("b")
    out = reg.meta(AGENT)
    assert out == {"tags": ["a"]}
    out["tags"].append("c")
    assert reg.meta(AGENT) == {"tags": ["a"]}


@pytest.mark.parametrize(
    "meta",
    [
        ["not", "a", "map"],
        "text",
        {1: "int key"},
        {"big": "x" * (64 * 1024 + 1)},
        {"obj": object()},
        {"set": {1, 2}},
        {"nan": float("nan")},
        {"huge": 2**64},
    ],
    ids=["list", "str", "int-key", "too-big", "object", "set", "nan", "huge-int"],
)
def test_bad_metadata_is_refused_and_changes_nothing(meta: Any) -> None:
    reg = make()
    reg.set_meta(AGENT, {"kept": True})
    digest = reg.digest()
    with pytest.raises(RegistryError):
        reg.set_meta(AGENT, meta)
    assert reg.meta(AGENT) == {"kept": True} and reg.digest() == digest


def test_metadata_just_under_the_limit_is_accepted() -> None:
    reg = make()
    meta = {"big": "x" * (64 * 1024 - 16)}
    assert len(pack(meta)) <= 64 * 1024
    reg.set_meta(AGENT, meta)
    assert reg.meta(AGENT) == meta


@pytest.mark.parametrize("agent", ["", "no-slash", 5, None, b"Tally/a"])
def test_bad_agent_ids_are_refused(agent: Any) -> None:
    reg = make()
    with pytest.raises(RegistryError):
        reg.prepare_placement(agent, N2)
    with pytest.raises(RegistryError):
        reg.set_meta(agent, {"a": 1})
    assert reg.view() == {"placements": {}, "meta": {}, "weights": {}}


@pytest.mark.parametrize("address", ["", 5, b"tcp://x"])
def test_a_placement_names_a_node_by_its_address(address: Any) -> None:
    with pytest.raises(RegistryError):
        make().prepare_placement(AGENT, address)


def test_a_full_registry_refuses_new_keys_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "MAX_ENTRIES", 2)
    reg = make()
    placed(reg, AGENT, N2)
    reg.set_meta(AGENT, {"a": 1})
    with pytest.raises(RegistryError, match="full"):
        reg.prepare_placement("Tally/b", N2)
    with pytest.raises(RegistryError, match="full"):
        reg.set_meta("Tally/b", {})
    placed(reg, AGENT, N3)  # an existing key may still be written
    reg.set_meta(AGENT, None)
    assert reg.placements() == {AGENT: N3} and reg.meta(AGENT) is None


def test_a_node_weight_is_announced_and_read_back() -> None:
    reg = make()
    changes: list[int] = []
    reg.on_weights = lambda: changes.append(1)
    assert reg.weight(N1) == 1.0
    reg.announce_weight(N1, 2)
    assert reg.weight(N1) == 2.0 and reg.view()["weights"] == {N1: 2.0}
    digest = reg.digest()
    reg.announce_weight(N1, 2.0)  # the same again: no write
    assert reg.digest() == digest and changes == [1]


@pytest.mark.parametrize("weight", [0, -1.0, 1000.5, float("nan"), float("inf"), "2", None])
def test_a_bad_weight_is_refused(weight: Any) -> None:
    reg = make()
    with pytest.raises(RegistryError):
        reg.announce_weight(N1, weight)
    assert reg.view()["weights"] == {}


def test_a_merged_weight_out_of_range_is_ignored() -> None:
    m = LWWMap()
    m.put(f"{N2}#1", ("weight", N2), 5000.0)
    m.put(f"{N3}#1", ("weight", N3), "heavy")
    m.put(f"{N4}#1", ("weight", N4), 3.0)
    reg = make()
    reg.merge(m.encode())
    assert reg.weight(N2) == 1.0 and reg.weight(N3) == 1.0 and reg.weight(N4) == 3.0


# --- last writer wins -------------------------------------------------------------------


def test_the_later_write_wins_whatever_order_the_copies_see_them() -> None:
    r1, r2 = make(f"{N1}#1"), make(f"{N2}#1")
    w1 = r1.prepare_placement(AGENT, N1)
    r1.merge(w1)
    w2 = r2.prepare_placement(AGENT, N2)  # later
    r2.merge(w2)
    assert r1.merge(w2) is True  # the newer write replaces r1's
    assert r2.merge(w1) is False  # the older one does not replace r2's
    assert r1.placement(AGENT) == r2.placement(AGENT) == N2
    assert r1.digest() == r2.digest()


def test_a_later_remove_wins_over_an_earlier_placement() -> None:
    r1, r2 = make(f"{N1}#1"), make(f"{N2}#1")
    w1 = r1.prepare_placement(AGENT, N1)
    removal = r2.prepare_placement(AGENT, None)
    r2.merge(removal)
    r2.merge(w1)
    r1.merge(w1)
    r1.merge(removal)
    assert r1.placement(AGENT) is None and r2.placement(AGENT) is None
    assert r1.digest() == r2.digest()


def test_a_prepared_write_passes_a_merged_write_from_a_clock_far_ahead(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(hlc, "DEFAULT_CLOCK", hlc.HybridClock(lambda: 1_000_000))
    ahead = LWWMap()
    ahead.put(f"{N2}#1", ("placement", AGENT), N2, timestamp=hlc.make_timestamp(9_000_000))
    r1, r2 = make(f"{N1}#1"), make(f"{N3}#1")
    r1.merge(ahead.encode())
    r2.merge(ahead.encode())
    r2.merge(r1.prepare_placement(AGENT, N1))  # r1's wall clock is far behind
    assert r2.placement(AGENT) == N1


# --- gossip -----------------------------------------------------------------------------


def test_a_write_on_one_node_reaches_every_copy_in_one_round() -> None:
    net = Net(4)
    placed(net.regs[N1], AGENT, N3)
    net.regs[N1].set_meta(AGENT, {"owner": "ann"})
    assert net.converge(rounds=2) == 1
    for reg in net.regs.values():
        assert reg.placement(AGENT) == N3 and reg.meta(AGENT) == {"owner": "ann"}


def test_concurrent_writes_on_every_node_converge() -> None:
    net = Net(4)
    for i, (address, reg) in enumerate(net.regs.items()):
        placed(reg, f"Tally/{i}", address)  # one agent per node
        placed(reg, AGENT, address)  # and the same agent everywhere
        reg.set_meta(f"Tally/{i}", {"by": address})
    net.converge(rounds=5)
    views = [reg.view() for reg in net.regs.values()]
    assert all(v == views[0] for v in views)
    assert views[0]["placements"] == {
        **{f"Tally/{i}": a for i, a in enumerate(net.regs)},
        AGENT: N4,  # the last write (the HLC is shared in this process)
    }
    assert len(views[0]["meta"]) == 4


def test_weights_spread_by_gossip_and_call_on_weights() -> None:
    net = Net(3)
    calls: list[str] = []
    for address, reg in net.regs.items():
        reg.on_weights = lambda address=address: calls.append(address)
    net.regs[N1].announce_weight(N1, 3.0)
    net.converge(rounds=3)
    assert all(reg.weight(N1) == 3.0 for reg in net.regs.values())
    assert sorted(calls) == [N1, N2, N3]


def test_lost_pushes_are_repaired_by_the_periodic_digest_rounds() -> None:
    net = Net(3)
    placed(net.regs[N2], AGENT, N2)
    net.lose = True
    net.round()  # the push is lost; the sender believes it went
    assert len(net.digests()) == 2
    net.lose = False
    net.converge(rounds=10)
    assert all(reg.placement(AGENT) == N2 for reg in net.regs.values())


def test_a_push_not_sent_is_tried_again_at_the_next_turn() -> None:
    net = Net(2)
    placed(net.regs[N1], AGENT, N2)
    net.regs[N1].tick([N2], lambda _peer, _frames: False)  # not connected yet
    assert net.regs[N1].next_deadline() == 0.0
    net.regs[N1].tick([N2], net.sender(N1))
    net.pump()
    assert net.regs[N2].placement(AGENT) == N2


def test_next_deadline_is_now_while_a_change_is_unpushed() -> None:
    clock = Clock()
    reg = Registry(f"{N1}#1", interval=2.0, clock=clock, rng=random.Random(1))
    assert reg.next_deadline() == clock.now + 2.0
    reg.set_meta(AGENT, {"a": 1})
    assert reg.next_deadline() == 0.0
    reg.tick([N2], lambda _peer, _frames: True)
    assert reg.next_deadline() == clock.now + 2.0


def test_on_sync_answers_its_copy_only_when_the_digests_differ() -> None:
    r1, r2 = make(f"{N1}#1"), make(f"{N2}#1")
    placed(r2, AGENT, N2)
    _, payload = sync_payload(r1)
    answer = r2.on_sync(payload)
    assert answer["digest"] == r2.digest() and isinstance(answer["copy"], bytes)
    r1.merge(answer["copy"])
    assert r2.on_sync(pack({"digest": r1.digest(), "copy": None})) == {
        "digest": r2.digest(),
        "copy": None,
    }


def test_on_sync_merges_a_pushed_copy() -> None:
    r1, r2 = make(f"{N1}#1"), make(f"{N2}#1")
    placed(r1, AGENT, N1)
    answer = r2.on_sync(pack({"digest": r1.digest(), "copy": _copy_of(r1)}))
    assert r2.placement(AGENT) == N1
    assert answer == {"digest": r1.digest(), "copy": None}
    assert r2.status()["merges"] == 1


# --- persistence ------------------------------------------------------------------------


def test_a_new_registry_on_the_same_store_starts_from_the_last_copy(tmp_path: Path) -> None:
    with Store(tmp_path / "db", durability="buffered") as s:
        reg = make(f"{N1}#1", store=s)
        placed(reg, AGENT, N2)
        placed(reg, "Tally/b", N3)
        placed(reg, "Tally/b", None)
        reg.set_meta(AGENT, {"owner": "ann"})
        reg.prepare_placement("Tally/c", N3)  # prepared only: not kept
        digest = reg.digest()
    with Store(tmp_path / "db", durability="buffered") as s:
        again = make(f"{N1}#2", store=s)
        assert again.placements() == {AGENT: N2}
        assert again.meta(AGENT) == {"owner": "ann"}
        assert again.digest() == digest


def test_a_merged_copy_is_persisted_too(tmp_path: Path) -> None:
    other = make(f"{N2}#1")
    placed(other, AGENT, N2)
    with Store(tmp_path / "db", durability="buffered") as s:
        make(f"{N1}#1", store=s).on_sync(pack({"digest": b"", "copy": _copy_of(other)}))
    with Store(tmp_path / "db", durability="buffered") as s:
        assert make(f"{N1}#2", store=s).placement(AGENT) == N2


def _copy_of(reg: Registry) -> bytes:
    copy = reg.on_sync(pack({"digest": b"", "copy": None}))["copy"]
    assert isinstance(copy, bytes)
    return copy


# --- bad input --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1",
        pack([1, 2]),
        pack({"copy": None}),
        pack({"digest": "text"}),
        pack({"digest": b"d", "copy": "text"}),
        pack({"digest": b"d", "copy": b"\x93\x01\x02"}),
        pack({"digest": b"d", "copy": b"\xc1"}),
        pack({"digest": b"d", "copy": lww_copy(("other", AGENT))}),
        pack({"digest": b"d", "copy": lww_copy(("placement", 5))}),
        pack({"digest": b"d", "copy": lww_copy("placement")}),
        pack({"digest": b"d", "copy": lww_copy(("meta", AGENT, "x"))}),
        pack({"digest": b"d", "copy": lww_copy(("placement", AGENT), ("bad", AGENT))}),
    ],
    ids=[
        "not-msgpack",
        "not-a-map",
        "no-digest",
        "digest-str",
        "copy-str",
        "copy-not-lww",
        "copy-not-msgpack",
        "key-kind",
        "key-agent-int",
        "key-not-tuple",
        "key-three",
        "one-good-one-bad",
    ],
)
def test_on_sync_refuses_bad_payloads_and_counts_them(payload: bytes) -> None:
    reg = make()
    placed(reg, "Tally/b", N2)
    digest = reg.digest()
    with pytest.raises(ProtocolError):
        reg.on_sync(payload)
    assert reg.status()["bad"] == 1
    assert reg.digest() == digest and reg.placements() == {"Tally/b": N2}


def test_check_placement_write_accepts_one_write_of_the_agent_only() -> None:
    reg = make()
    Registry.check_placement_write(AGENT, reg.prepare_placement(AGENT, N2))
    Registry.check_placement_write(AGENT, reg.prepare_placement(AGENT, None))
    two = make()
    placed(two, AGENT, N2)
    placed(two, "Tally/b", N2)
    meta = make()
    meta.set_meta(AGENT, {"a": 1})
    refused = [
        reg.prepare_placement("Tally/b", N2),  # another agent's
        _copy_of(two),  # two writes
        _copy_of(meta),  # a metadata write
        lww_copy(),  # no write
        b"\xc1",
        b"not lww",
    ]
    for encoded in refused:
        with pytest.raises(ProtocolError):
            Registry.check_placement_write(AGENT, encoded)


def test_on_reply_consumes_only_answers_to_its_own_syncs() -> None:
    r1, r2 = make(f"{N1}#1"), make(f"{N2}#1")
    placed(r2, AGENT, N2)
    corr, payload = sync_payload(r1)
    answer = pack(r2.on_sync(payload))
    assert r1.on_reply(N2, [b"", encode_reply(5, 0), answer]) is False
    assert r1.on_reply(N2, [b"", encode_reply(1 << 62, 0), answer]) is False
    assert r1.on_reply(N2, [b"junk"]) is False
    assert r1.placement(AGENT) is None
    assert r1.on_reply(N2, [b"", encode_reply(corr, 0), answer]) is True
    assert r1.placement(AGENT) == N2


def test_on_reply_consumes_an_error_or_a_bad_answer_without_merging() -> None:
    r1 = make()
    corr, _ = sync_payload(r1)
    assert r1.on_reply(N2, [b"", encode_reply(corr, 3), pack("no")]) is True
    assert r1.status()["bad"] == 0
    corr, _ = sync_payload(r1)
    assert r1.on_reply(N2, [b"", encode_reply(corr, 0), pack(["not a map"])]) is True
    bad_copy = pack({"digest": b"d", "copy": lww_copy(("other", AGENT))})
    corr, _ = sync_payload(r1)
    assert r1.on_reply(N2, [b"", encode_reply(corr, 0), bad_copy]) is True
    assert r1.status()["bad"] == 2 and r1.view() == {"placements": {}, "meta": {}, "weights": {}}


def test_an_asker_holding_writes_the_peer_lacks_pushes_them_to_that_peer() -> None:
    r1, r2 = make(f"{N1}#1"), make(f"{N2}#1")
    placed(r1, AGENT, N1)
    r1.tick([N3], lambda _peer, _frames: True)  # r1's change pushed, to N3 only
    corr, payload = sync_payload(r1)
    answer = r2.on_sync(payload)  # digests differ: r2 answers its (empty) copy
    assert answer["copy"] is not None
    assert r1.on_reply(N2, [b"", encode_reply(corr, 0), pack(answer)])
    send = Sent()
    r1.tick([N2, N3], send)
    sent = [(peer, unpack(frames[-1])) for peer, frames in send.frames]
    assert [p for p, body in sent if body["copy"] is not None] == [N2]
    for _, body in sent:
        r2.on_sync(pack(body))
    assert r2.digest() == r1.digest() and r2.placement(AGENT) == N1
