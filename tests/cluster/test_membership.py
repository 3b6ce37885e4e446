"""SWIM membership: unit tests of the state machine, and whole clusters on a simulated
network (see ``sim.py``: fake clock, seeded loss, duplication, latency and partitions).

Every simulation is deterministic (seeded), so a failure reproduces exactly.
"""

from __future__ import annotations

import math
import random
import statistics
from typing import Any

import msgpack
import pytest

from phoenix_node.cluster._swim_wire import MAX_GOSSIP, MAX_MEMBERS_WIRE, Record, decode
from phoenix_node.cluster.membership import (
    InvalidNodeIdError,
    Membership,
    MembershipProtocolError,
    MemberState,
    NodeId,
    SwimConfig,
    beats,
)

from .sim import SimNetwork

ADDR = [f"tcp://10.0.0.{i}:7000" for i in range(1, 10)]
CONFIG = SwimConfig()


def make_cluster(n: int, seed: int, **faults: Any) -> tuple[SimNetwork, list[str]]:
    """``n`` nodes joined through the first one, all seeing all up."""
    net = SimNetwork(seed, **faults)
    addresses = ADDR[:n]
    net.add(addresses[0])
    for address in addresses[1:]:
        net.add(address, seeds=[addresses[0]])
    assert net.run(30, lambda: net.all_see(addresses, "up", addresses))
    for node in net.nodes.values():
        node.events()
    return net, addresses


def history(net: SimNetwork, observers: list[str], about: str) -> list[tuple[str, float]]:
    """``(new state, time)`` of every change of ``about`` the observers saw (drains events)."""
    return [
        (event.new.value, event.time)
        for observer in observers
        for event in net.nodes[observer].events()
        if event.node.address == about
    ]


def ever(net: SimNetwork, observers: list[str], about: str, state: str) -> list[float]:
    """Times at which the observers saw ``about`` enter ``state`` (drains the events)."""
    return [t for new, t in history(net, observers, about) if new == state]


def rec(node: str, state: str = "up", version: int = 0) -> list[Any]:
    return [node, state, version]


def msg(kind: str, sender: str = ADDR[1] + "#1", **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"v": 1, "kind": kind, "from": rec(sender), "gossip": []}
    if kind in ("ping", "ack", "ping-req"):
        out.update(seq=1, target=ADDR[0] + "#1")
    elif kind in ("sync", "sync-reply"):
        out["members"] = []
    out.update(extra)
    return out


# ---------------------------------------------------------------- identities and rules


def test_node_id_text_form_round_trips() -> None:
    node = NodeId("tcp://node-1.example.com:7000", 1717171717000000000)
    assert str(node) == "tcp://node-1.example.com:7000#1717171717000000000"
    assert NodeId.parse(str(node)) == node
    assert NodeId.parse("tcp://[::1]:1#0") == NodeId("tcp://[::1]:1", 0)


@pytest.mark.parametrize(
    "text",
    [
        "tcp://h:7000",  # no incarnation
        "tcp://h:7000#",
        "tcp://h:7000#01",  # not canonical
        "tcp://h:7000#-1",
        "tcp://h:7000#+1",
        "tcp://h:7000#1.0",
        "tcp://h:7000# 1",
        f"tcp://h:7000#{2**63}",
        "tcp://h:0#1",  # bind-only ports
        "tcp://h:*#1",
        "tcp://h:65536#1",
        "tcp://h#1",
        "ipc://@x#1",
        "udp://h:1#1",
        "tcp://h h:1#1",
        "tcp://-h:1#1",
        "tcp://" + "a" * 300 + ":1#1",
        "",
    ],
)
def test_node_id_parse_is_strict(text: str) -> None:
    with pytest.raises(InvalidNodeIdError):
        NodeId.parse(text)


@pytest.mark.parametrize("bad", [None, 7, b"tcp://h:1#1"])
def test_node_id_parse_refuses_non_str(bad: object) -> None:
    with pytest.raises(InvalidNodeIdError, match="must be a str"):
        NodeId.parse(bad)


def test_node_id_constructor_validates() -> None:
    with pytest.raises(InvalidNodeIdError, match="incarnation"):
        NodeId("tcp://h:1", True)
    with pytest.raises(InvalidNodeIdError, match="incarnation"):
        NodeId("tcp://h:1", -1)
    with pytest.raises(InvalidNodeIdError, match="tcp://HOST:PORT"):
        NodeId("h:1", 1)


def test_merge_order() -> None:
    node = NodeId(ADDR[0], 1)

    def r(state: str, version: int) -> Record:
        return Record(node, MemberState(state), version)

    assert beats(r("up", 2), r("down", 1))  # the node itself refuted
    assert not beats(r("up", 1), r("down", 1))
    assert beats(r("suspect", 1), r("up", 1))
    assert beats(r("leaving", 1), r("up", 1))
    assert beats(r("down", 1), r("suspect", 1))
    assert not beats(r("up", 1), r("suspect", 1))
    assert not beats(r("suspect", 0), r("up", 1))  # stale
    assert beats(r("removed", 0), r("up", 5))
    assert not beats(r("up", 9), r("removed", 1))  # removed is final for a NodeId
    assert not beats(r("up", 1), r("up", 1))


def test_config_validation_and_derived_times() -> None:
    assert CONFIG.suspicion_timeout(5) == pytest.approx(2.0)
    assert CONFIG.suspicion_timeout(100) == pytest.approx(4.0)
    assert CONFIG.retransmit_limit(5) == 4
    assert CONFIG.retransmit_limit(100) == 12
    assert CONFIG.detection_bound(5) == pytest.approx(7.5)
    with pytest.raises(ValueError, match="probe_timeout"):
        SwimConfig(probe_timeout=0.5)
    with pytest.raises(ValueError, match="probe_interval"):
        SwimConfig(probe_interval=-1)
    with pytest.raises(ValueError, match="probe_interval"):
        SwimConfig(probe_interval=math.nan)
    with pytest.raises(TypeError, match="indirect_probes"):
        SwimConfig(indirect_probes=2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_piggyback"):
        SwimConfig(max_piggyback=MAX_GOSSIP + 1)
    with pytest.raises(ValueError, match="max_members"):
        SwimConfig(max_members=MAX_MEMBERS_WIRE + 1)
    assert SwimConfig(join_timeout=math.inf).join_timeout == math.inf


def test_constructor_and_clock_validation() -> None:
    with pytest.raises(TypeError, match="NodeId"):
        Membership("tcp://h:1#1")  # type: ignore[arg-type]
    with pytest.raises(InvalidNodeIdError):
        Membership(NodeId(ADDR[0], 1), seeds=["h:1"])
    with pytest.raises(ValueError, match="seeds"):
        Membership(NodeId(ADDR[0], 1), seeds=ADDR[1])
    node = Membership(NodeId(ADDR[0], 1), now=10.0)
    with pytest.raises(ValueError, match="backwards"):
        node.tick(9.0)
    with pytest.raises(ValueError, match="finite"):
        node.tick(math.inf)
    with pytest.raises(InvalidNodeIdError):
        node.member("nonsense")


# ---------------------------------------------------------------- joining


def test_single_node_without_seeds_is_up_at_once() -> None:
    node = Membership(NodeId(ADDR[0], 1), seeds=[ADDR[0]])  # itself as seed: no seed
    assert node.state is MemberState.UP
    assert node.alive() == [node.me]
    assert [(e.old, e.new) for e in node.events()] == [(None, MemberState.UP)]
    assert node.tick(100.0) == []  # nobody to probe, sync or join


def test_five_nodes_join_through_one_seed() -> None:
    net = SimNetwork(1)
    net.add(ADDR[0])
    for address in ADDR[1:5]:
        net.add(address, seeds=[ADDR[0]])
        assert net.nodes[address].state is MemberState.JOINING
    assert net.run(5.0, lambda: net.all_see(ADDR[:5], "up", ADDR[:5]))
    assert net.now < 5.0
    for address in ADDR[:5]:
        node = net.nodes[address]
        assert [n.address for n in node.alive()] == ADDR[:5]
        mine = [(e.old, e.new) for e in node.events() if e.node == node.me]
        if address != ADDR[0]:
            assert mine == [(None, MemberState.JOINING), (MemberState.JOINING, MemberState.UP)]
    # ... and stays so
    net.run(30.0)
    assert net.all_see(ADDR[:5], "up", ADDR[:5])
    assert sum(n.statistics().suspicions for n in net.nodes.values()) == 0


def test_join_retries_with_backoff_then_starts_alone() -> None:
    config = SwimConfig(join_retry=0.5, join_retry_max=2.0, join_timeout=10.0)
    node = Membership(NodeId(ADDR[0], 1), config, seeds=[ADDR[1]])
    sent_at = []
    t = 0.0
    while node.state is MemberState.JOINING:
        if any(o.message["kind"] == "join" for o in node.tick(t)):
            sent_at.append(t)
        t = node.next_deadline()
    assert sent_at == [0.0, 0.5, 1.5, 3.5, 5.5, 7.5, 9.5]
    up = [e for e in node.events() if e.new is MemberState.UP]
    assert len(up) == 1 and up[0].time == pytest.approx(10.0)
    # still looking for the seed: reconnect sends it a sync
    kinds = []
    while t < 20.0:
        t = node.next_deadline()
        kinds += [(o.address, o.message["kind"]) for o in node.tick(t)]
    assert (ADDR[1], "sync") in kinds


def test_a_joiner_whose_seed_cannot_answer_joins_through_a_member_it_heard_of() -> None:
    """The seed gets the joins but its answers are lost (a broken channel one way): the
    joiner also asks a live member that gossip named, and is up long before join_timeout."""
    net = SimNetwork(4)
    for address in ADDR[:3]:
        net.add(address, seeds=[ADDR[0]])
    assert net.run(5.0, lambda: net.all_see(ADDR[:3], "up", ADDR[:3]))
    net.one_way.add((ADDR[0], ADDR[3]))
    joiner = net.add(ADDR[3], seeds=[ADDR[0]])
    start = net.now
    assert net.run(20.0, lambda: joiner.state is MemberState.UP)
    assert net.now - start < 10.0 < net.config.join_timeout
    assert net.run(10.0, lambda: net.all_see(ADDR[1:4], "up", ADDR[:4]))


def test_nodes_that_name_each_other_as_seeds_all_join() -> None:
    net = SimNetwork(3)
    for address in ADDR[:4]:
        net.add(address, seeds=ADDR[:4])
    assert net.run(5.0, lambda: net.all_see(ADDR[:4], "up", ADDR[:4]))


# ---------------------------------------------------------------- failure detection


def test_crash_is_detected_within_the_documented_bound() -> None:
    """Crash-to-down at every other member, over 30 seeded runs of 5 nodes."""
    detection = []
    for seed in range(30):
        net, addresses = make_cluster(5, seed)
        net.run(net.rng.uniform(0, 2))  # crash at a random phase of the probe cycle
        victim = addresses[seed % 5]
        net.crash(victim)
        start = net.now
        others = [a for a in addresses if a != victim]
        assert net.run(30, lambda: net.all_see(others, "down", [victim]))  # noqa: B023
        changes = history(net, others, victim)
        suspected = [t for new, t in changes if new == "suspect"]
        downs = [t for new, t in changes if new == "down"]
        assert len(downs) == len(others)
        assert min(suspected) < min(downs)  # suspect first, then down
        detection += [t - start for t in downs]
    p50 = statistics.median(detection)
    p99 = statistics.quantiles(detection, n=100)[98]
    worst = max(detection)
    print(f"\ndetection time, 5 nodes: p50 {p50:.2f} s, p99 {p99:.2f} s, max {worst:.2f} s")
    assert worst <= CONFIG.detection_bound(5)
    assert p50 <= CONFIG.suspicion_timeout(5) + 3 * CONFIG.probe_interval


def test_ten_minutes_of_ten_percent_loss_declare_nobody_down() -> None:
    net, addresses = make_cluster(8, seed=7, loss=0.10, duplicate=0.01)
    net.run(600.0)
    stats = [n.statistics() for n in net.nodes.values()]
    false_suspicions = sum(s.refutations for s in stats)
    print(
        f"\n10 min, 8 nodes, 10% loss: {sum(s.suspicions for s in stats)} suspicions, "
        f"{false_suspicions} refuted, {sum(s.downs for s in stats)} downs, "
        f"{net.sent} messages"
    )
    assert sum(s.downs for s in stats) == 0
    assert all(e.new is not MemberState.DOWN for n in net.nodes.values() for e in n.events())
    # loss does cause false suspicions (so the test can see them), and every one was refuted
    assert 0 < false_suspicions <= 40
    assert sum(s.refuted_suspicions for s in stats) >= false_suspicions
    assert net.all_see(addresses, "up", addresses)


def test_suspected_node_refutes_in_the_cluster() -> None:
    net, addresses = make_cluster(5, seed=11)
    victim = addresses[2]
    others = [a for a in addresses if a != victim]
    version_before = net.nodes[victim].member(victim).version  # type: ignore[union-attr]
    net.crash(victim)  # silent long enough to be suspected, not long enough to be down
    assert net.run(10, lambda: bool(ever(net, others, victim, "suspect")))
    net.crashed.discard(victim)
    net.run(10.0)
    assert net.all_see(addresses, "up", addresses)
    assert net.nodes[victim].statistics().refutations >= 1
    for address in others:
        seen = net.nodes[address].member(victim)
        assert seen is not None and seen.version > version_before
    assert sum(n.statistics().downs for n in net.nodes.values()) == 0


def test_a_node_that_hears_it_is_suspect_refutes() -> None:
    me = NodeId(ADDR[0], 1)
    node = Membership(me)
    gossip = [rec(str(me), "suspect", 0)]
    out = node.receive(ADDR[1], msg("ping", gossip=gossip), 1.0)
    assert node.member(ADDR[0]).version == 1  # type: ignore[union-attr]
    assert node.state is MemberState.UP
    assert node.statistics().refutations == 1
    ack = decode(out[0].message)
    assert ack.kind == "ack" and ack.sender == Record(me, MemberState.UP, 1)
    # the refutation is also gossiped to others
    assert Record(me, MemberState.UP, 1) in ack.gossip
    # a stale suspicion (older version) changes nothing
    node.receive(ADDR[1], msg("ping", gossip=gossip), 2.0)
    assert node.member(ADDR[0]).version == 1  # type: ignore[union-attr]
    # a down at the current version is refuted too
    node.receive(ADDR[1], msg("ping", gossip=[rec(str(me), "down", 1)]), 3.0)
    assert node.member(ADDR[0]).version == 2  # type: ignore[union-attr]


def test_a_silent_member_is_suspected_then_reminded_each_period() -> None:
    """Direct ping, then ping-req plus a second ping, then suspect; then every period a
    ping that carries the suspicion, until the ack brings the refutation."""
    me, other = NodeId(ADDR[0], 1), NodeId(ADDR[1], 1)
    node = Membership(me, rng=random.Random(1))
    for helper in ADDR[2:5]:
        node.receive(helper, msg("ping", sender=helper + "#1"), 0.0)
    node.receive(other.address, msg("ping"), 0.0)
    t, probe = 0.0, None
    while probe is None:  # run until the round-robin probes ``other``
        t = node.next_deadline()
        out = node.tick(t)
        probe = next((o for o in out if o.address == other.address), None)
        for o in out:  # everybody else answers
            if o.address != other.address:
                ack = msg("ack", sender=o.address + "#1", seq=o.message["seq"])
                node.receive(o.address, {**ack, "target": o.message["target"]}, t)
    retry = node.tick(t + CONFIG.probe_timeout)
    assert sorted(o.message["kind"] for o in retry) == ["ping", "ping-req", "ping-req", "ping-req"]
    assert node.member(other.address).state is MemberState.UP  # type: ignore[union-attr]
    reminders = node.tick(t + CONFIG.probe_interval)
    assert node.member(other.address).state is MemberState.SUSPECT  # type: ignore[union-attr]
    assert node.statistics().suspicions == 1
    to_other = [decode(o.message) for o in reminders if o.address == other.address]
    assert to_other and to_other[0].gossip[0] == Record(other, MemberState.SUSPECT, 0)
    # the suspect refutes in its ack
    ack = msg("ack", seq=to_other[0].seq, target=str(other))
    ack["from"] = rec(str(other), "up", 1)
    node.receive(other.address, ack, t + CONFIG.probe_interval + 0.01)
    assert node.member(other.address).state is MemberState.UP  # type: ignore[union-attr]
    assert node.statistics().refuted_suspicions == 1


def test_partition_then_heal_converges_to_all_up() -> None:
    net, addresses = make_cluster(5, seed=5)
    left, right = addresses[:3], addresses[3:]
    net.partition(left, right)
    start = net.now
    assert net.run(
        30, lambda: net.all_see(left, "down", right) and net.all_see(right, "down", left)
    )
    assert net.now - start <= CONFIG.detection_bound(5)
    assert net.all_see(left, "up", left) and net.all_see(right, "up", right)
    for address in left:
        assert [n.address for n in net.nodes[address].alive()] == left
    net.run(20.0)  # a long partition, shorter than tombstone_ttl
    net.heal()
    healed = net.now
    assert net.run(30, lambda: net.all_see(addresses, "up", addresses))
    print(f"\npartition 3+2 healed: all up again after {net.now - healed:.2f} s")
    assert net.now - healed <= 3 * CONFIG.reconnect_interval + CONFIG.sync_interval
    net.run(30.0)
    assert net.all_see(addresses, "up", addresses)


def test_duplicated_and_reordered_messages_are_harmless() -> None:
    net, addresses = make_cluster(5, seed=2, duplicate=0.5, latency=(0.001, 0.1), jitter=0.08)
    net.run(60.0)
    assert net.all_see(addresses, "up", addresses)
    assert sum(n.statistics().downs for n in net.nodes.values()) == 0


# ---------------------------------------------------------------- leaving and restarts


def test_graceful_leave_is_never_suspected() -> None:
    net, addresses = make_cluster(5, seed=9)
    leaver = addresses[4]
    others = addresses[:4]
    notices = net.nodes[leaver].leave(net.now)
    assert sorted(o.address for o in notices) == others  # told at once, not only gossiped
    net.send(leaver, notices)
    assert net.run(2, lambda: net.all_see(others, "leaving", [leaver]))
    for address in others:  # still serving: still on the ring
        assert leaver in [n.address for n in net.nodes[address].alive()]
    net.run(5.0)  # hand-off time: it is still probed and answers
    net.send(leaver, net.nodes[leaver].left(net.now))
    assert net.nodes[leaver].state is MemberState.REMOVED
    assert net.run(2, lambda: net.all_see(others, "removed", [leaver]))
    assert net.nodes[leaver].tick(net.now + 10) == []  # stopped probing
    net.crash(leaver)  # the process exits
    net.run(30.0)
    for address in others:
        assert leaver not in [n.address for n in net.nodes[address].alive()]
    assert ever(net, others, leaver, "suspect") == []
    assert ever(net, others, leaver, "down") == []
    assert net.all_see(others, "up", others)
    net.run(CONFIG.tombstone_ttl + 10)  # the tombstone expires
    assert all(net.nodes[a].member(leaver) is None for a in others)


def test_restart_with_a_higher_incarnation_supersedes_the_old_record() -> None:
    net, addresses = make_cluster(5, seed=4)
    old = net.nodes[addresses[3]].me
    net.crash(old.address)
    net.add(old.address, incarnation=2, seeds=[addresses[0]])  # restarts at once
    new = net.nodes[old.address].me

    def all_see_new() -> bool:
        return all(
            (m := net.nodes[a].member(old.address)) is not None
            and m.node_id == new
            and m.state is MemberState.UP
            for a in addresses
        )

    assert net.run(10, all_see_new)
    for address in addresses[:3]:
        changes = [(e.node, e.new) for e in net.nodes[address].events()]
        assert (old, MemberState.REMOVED) in changes
        assert (old, MemberState.DOWN) not in changes
    # stale gossip about the old incarnation cannot bring it back
    observer = net.nodes[addresses[0]]
    stale = msg("ping", sender=f"{addresses[1]}#1", gossip=[rec(str(old), "up", 99)])
    stale["target"] = str(observer.me)
    observer.receive(addresses[1], stale, net.now)
    assert observer.member(old.address).node_id == new  # type: ignore[union-attr]
    net.run(10.0)
    assert all_see_new()


def test_ping_for_an_older_incarnation_is_answered_by_the_new_one() -> None:
    node = Membership(NodeId(ADDR[0], 2))
    out = node.receive(ADDR[1], msg("ping", target=f"{ADDR[0]}#1"), 1.0)
    ack = decode(out[0].message)
    assert ack.target == node.me  # not an ack for #1: the prober's probe of #1 fails


# ---------------------------------------------------------------- hostile input


def _many(n: int) -> list[list[Any]]:
    return [rec(f"tcp://10.1.{i // 250}.{i % 250}:1#1") for i in range(n)]


HOSTILE: dict[str, Any] = {
    "not a map": [1, "ping"],
    "no version": {k: v for k, v in msg("ping").items() if k != "v"},
    "version 2": msg("ping", v=2),
    "version as bool": msg("ping", v=True),
    "version as float": msg("ping", v=1.0),
    "unknown kind": {**msg("ping"), "kind": "pong"},
    "kind not str": {**msg("ping"), "kind": 1},
    "missing seq": {k: v for k, v in msg("ping").items() if k != "seq"},
    "unknown key": msg("ping", extra=1),
    "int key": {**msg("join"), 1: 2},
    "seq negative": msg("ping", seq=-1),
    "seq bool": msg("ping", seq=True),
    "seq too big": msg("ping", seq=2**63),
    "seq str": msg("ping", seq="1"),
    "target bad id": msg("ping", target="tcp://h:1"),
    "target not str": msg("ping", target=["tcp://h:1", 1]),
    "from not a record": {**msg("ping"), "from": "tcp://10.0.0.2:7000#1"},
    "from short record": {**msg("ping"), "from": [ADDR[1] + "#1", "up"]},
    "from bad state": {**msg("ping"), "from": rec(ADDR[1] + "#1", "zombie")},
    "from bad version": {**msg("ping"), "from": rec(ADDR[1] + "#1", "up", -1)},
    "from huge version": {**msg("ping"), "from": rec(ADDR[1] + "#1", "up", 2**63)},
    "from another address": msg("ping", sender=ADDR[2] + "#1"),
    "from this very node": msg("ping", sender=ADDR[0] + "#1"),
    "ping for another node": msg("ping", target=ADDR[2] + "#1"),
    "gossip not a list": msg("ping", gossip={"a": 1}),
    "gossip too long": msg("ping", gossip=_many(MAX_GOSSIP + 1)),
    "gossip, one bad id at the end": msg("ping", gossip=[*_many(5), rec("tcp://h#1")]),
    "members too long": msg("sync", members=_many(MAX_MEMBERS_WIRE + 1)),
    "members, one bad record at the end": msg("sync", members=[*_many(50), [1, 2, 3]]),
    "members as a map": msg("sync", members={"x": 1}),
    "join with members": msg("join", members=[]),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_messages_are_refused_and_change_nothing(name: str) -> None:
    node = Membership(NodeId(ADDR[0], 1), SwimConfig(max_members=100))
    node.receive(ADDR[3], msg("ping", sender=ADDR[3] + "#1"), 1.0)
    node.events()
    members, stats = node.members(), node.statistics()
    sender = ADDR[0] if name == "from this very node" else ADDR[1]
    raw = msgpack.unpackb(msgpack.packb(HOSTILE[name]), raw=False, strict_map_key=False)
    with pytest.raises(MembershipProtocolError):
        node.receive(sender, raw, 2.0)
    assert node.members() == members
    assert node.events() == []
    after = node.statistics()
    assert after.bad_messages == stats.bad_messages + 1
    assert after.messages_received == stats.messages_received
    # ... and the node still works
    assert node.receive(ADDR[1], msg("ping"), 3.0)[0].message["kind"] == "ack"


def test_member_table_and_relays_are_bounded() -> None:
    node = Membership(NodeId(ADDR[0], 1), SwimConfig(max_members=10, max_relays=4))
    out = node.receive(ADDR[1], msg("sync", members=_many(MAX_MEMBERS_WIRE)), 1.0)
    assert len(node.members()) == 10
    assert node.statistics().members_refused == MAX_MEMBERS_WIRE + 1 - 9
    assert len(decode(out[0].message).members) == 10  # a sync-reply lists at most the cap
    pings = []
    for i in range(10):
        target = f"tcp://10.2.0.{i}:1#1"
        pings += node.receive(ADDR[1], msg("ping-req", target=target, seq=i), 2.0)
    assert len(pings) == 4 and node.statistics().relays_refused == 6
    node.tick(10.0)  # relays expire: room again
    assert node.receive(ADDR[1], msg("ping-req", target="tcp://10.3.0.1:1#1"), 10.0)


def test_every_outgoing_message_is_valid_msgpack_on_the_wire() -> None:
    net, addresses = make_cluster(3, seed=8)
    node = net.nodes[addresses[0]]
    for outgoing in node.tick(net.now + 5) + node.leave(net.now + 5):
        packed = msgpack.packb(outgoing.message, use_bin_type=True)
        again = msgpack.unpackb(packed, raw=False, strict_map_key=True, use_list=False)
        assert decode(again).sender.node == node.me
