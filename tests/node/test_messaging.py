"""Messaging on a real node: pub/sub across workers, mailbox strategies, rate limits,
fairness under a flood, credit-based flow control, compressed and JSON payloads."""

from __future__ import annotations

import os
import signal
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import pytest
import zmq

from ipc.protocol import ASK, REPLY, decode_reply_kind, encode_request, unpack
from phoenix_node import Client, Node
from phoenix_node.errors import BackpressureError, PhoenixError
from workers.placement import owner_index

StartNode = Callable[..., Node]
SAMPLE = "tests.node.sample_agents:"
MSG_AGENTS = [
    SAMPLE + name
    for name in (
        "MsgSubscriber",
        "MsgDropOldest",
        "MsgDropNewest",
        "MsgReject",
        "MsgSpill",
        "MsgSink",
        "MsgRedirect",
        "MsgBusy",
        "MsgRated",
    )
]
MiB = 2**20


def key_on(index: int, prefix: str, workers: int = 2, skip: int = 0) -> str:
    """The ``skip``-th id ``prefix<i>`` owned by worker ``index``."""
    found = (f"{prefix}{i}" for i in range(10_000) if owner_index(f"{prefix}{i}", workers) == index)
    for _ in range(skip):
        next(found)
    return next(found)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except PhoenixError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def settled(c: Client) -> bool:
    """Every worker's outbox is empty: every staged fan-out was delivered and acked."""
    return all(s["outbox"] == 0 and s["queued"] == 0 for s in c.worker_stats())


def events_of(c: Client, agent: str) -> set[str]:
    return set(c.ask(agent, "events"))


@pytest.fixture
def node(start_node: StartNode) -> Node:
    return start_node(workers=2, agents=MSG_AGENTS)


# --- pub/sub ----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_agents_on_both_workers_get_exactly_the_matching_events(node: Node) -> None:
    star0 = key_on(0, "MsgSubscriber/star")  # client-made subscription, worker 0
    star1 = key_on(1, "MsgSubscriber/star")  # client-made subscription, worker 1
    tail0 = key_on(0, "MsgSubscriber/tail")  # the agent's own self.subscribe, worker 0
    tail1 = key_on(1, "MsgSubscriber/tail")  # the agent's own self.subscribe, worker 1
    publisher = key_on(1, "MsgSubscriber/pub")
    with node.client() as c:
        c.subscribe_agent("orders.*", star0)
        c.subscribe_agent("orders.*", star1)
        c.ask(tail0, "follow", pattern="orders.#")
        c.ask(tail1, "follow", pattern="orders.#")
        for topic in ("orders.eu", "orders.us.west", "orders", "billing.eu", "ordersx.eu"):
            c.publish(topic, 1)
        c.ask(publisher, "announce", topic="orders.asia", data=2)  # an agent publishes
        c.ask(publisher, "announce", topic="billing.asia", data=2)
        star = {"orders.eu|1", "orders.asia|2"}
        tail = {"orders.eu|1", "orders.us.west|1", "orders|1", "orders.asia|2"}
        expected = {star0: star, star1: star, tail0: tail, tail1: tail}
        wait_for(
            lambda: all(events_of(c, a) >= want for a, want in expected.items()),
            15,
            "every subscriber to get its events",
        )
        wait_for(lambda: settled(c), 10, "the outboxes to drain")
        for agent, want in expected.items():
            assert events_of(c, agent) == want, agent
        assert c.ask(publisher, "events") == []


@pytest.mark.timeout(60)
def test_unsubscribe_stops_delivery(node: Node) -> None:
    by_client = key_on(0, "MsgSubscriber/u")
    by_itself = key_on(1, "MsgSubscriber/u")
    witness = key_on(1, "MsgSubscriber/w")  # still subscribed: proves the later events went out
    with node.client() as c:
        c.subscribe_agent("u.*", by_client)
        c.ask(by_itself, "follow", pattern="u.*")
        c.subscribe_agent("u.*", witness)
        c.publish("u.before", 1)
        wait_for(
            lambda: all("u.before|1" in events_of(c, a) for a in (by_client, by_itself, witness)),
            15,
            "the first event",
        )
        c.unsubscribe_agent("u.*", by_client)
        c.ask(by_itself, "unfollow", pattern="u.*")
        c.publish("u.after", 2)
        wait_for(lambda: "u.after|2" in events_of(c, witness), 15, "the witness's event")
        wait_for(lambda: settled(c), 10, "the outboxes to drain")
        assert events_of(c, by_client) == {"u.before|1"}
        assert events_of(c, by_itself) == {"u.before|1"}


@pytest.mark.timeout(60)
def test_agent_subscriptions_survive_a_node_restart(start_node: StartNode, tmp_path: Any) -> None:
    data = tmp_path / "kept"
    agents = [key_on(0, "MsgSubscriber/r"), key_on(1, "MsgSubscriber/r")]
    node = start_node(workers=2, agents=MSG_AGENTS, data=data)
    with node.client() as c:
        c.subscribe_agent("restart.#", agents[0])
        c.ask(agents[1], "follow", pattern="restart.#")
    assert node.stop() == 0
    node = start_node(workers=2, agents=MSG_AGENTS, data=data)
    with node.client() as c:
        c.publish("restart.x", 3)
        wait_for(
            lambda: all(events_of(c, a) == {"restart.x|3"} for a in agents),
            15,
            "events to subscriptions made before the restart",
        )


@pytest.mark.timeout(60)
def test_client_subscriptions_receive_events_through_events(node: Node) -> None:
    publisher = key_on(0, "MsgSubscriber/pub")
    with node.client() as listener, node.client() as c:
        assert listener.subscribe("news.*") == "news.*"
        c.publish("news.sport", {"score": [1, 0]})
        c.publish("weather.today", "sun")  # not subscribed
        c.ask(publisher, "announce", topic="news.tech", data="agent")
        got: dict[str, Any] = {}
        deadline = time.monotonic() + 10
        while len(got) < 2 and time.monotonic() < deadline:
            for event in listener.events(timeout=0.2):
                assert event.subscription == "news.*"
                assert event.topic not in got, f"{event.topic} delivered twice"
                got[event.topic] = event.data
        assert got == {"news.sport": {"score": [1, 0]}, "news.tech": "agent"}
        listener.unsubscribe("news.*")
        c.publish("news.late", 1)
        c.ask(publisher, "events")  # a round trip after the publish
        assert [e.topic for e in listener.events(timeout=0.5)] == []


@pytest.mark.timeout(90)
def test_at_least_once_subscription_gets_every_event_across_a_worker_kill(node: Node) -> None:
    topic = key_on(0, "feed.t")  # published on worker 0, whose outbox holds the fan-out
    subscriber = key_on(1, "MsgSubscriber/alo")
    with node.client(timeout=5.0) as c:
        c.subscribe_agent("feed.#", subscriber, delivery="at_least_once")
        # the subscription reaches worker 0 asynchronously (see the test below): warm up
        wait_for(
            lambda: c.publish(topic, "warm-up") or f"{topic}|warm-up" in events_of(c, subscriber),
            10,
            "the subscription to reach the publishing worker",
        )
        victim = c.status()["workers"][1]["pid"]
        for seq in range(40):
            c.publish(topic, seq)
            if seq == 15:
                os.kill(victim, signal.SIGKILL)
        want = {f"{topic}|{seq}" for seq in range(40)} | {f"{topic}|warm-up"}
        wait_for(lambda: events_of(c, subscriber) == want, 30, "every event despite the kill")
        assert c.status()["workers"][1]["pid"] != victim


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["subscribe_agent", "self.subscribe"])
def test_a_subscription_is_active_on_every_worker_once_the_call_returns(
    node: Node, how: str
) -> None:
    """A publish sent after subscribe_agent (or the subscribing action) returned must
    be matched, whichever worker handles it; a subscription that reaches the other
    workers later loses the first events."""
    subscriber = key_on(1, "MsgSubscriber/now")
    want = set()
    with node.client() as c:
        for round_ in range(10):  # a race: several rounds make a late subscription show
            topic = key_on(0, f"now{round_}.t")  # handled by worker 0; subscriber on 1
            if how == "subscribe_agent":
                c.subscribe_agent(f"now{round_}.#", subscriber)
            else:
                c.ask(subscriber, "follow", pattern=f"now{round_}.#")
            c.publish(topic, round_)
            want.add(f"{topic}|{round_}")
        wait_for(lambda: settled(c), 10, "the outboxes to drain")
        missed = want - events_of(c, subscriber)
        assert not missed, f"published after the subscribe returned, never delivered: {missed}"


@pytest.mark.timeout(60)
def test_subscriptions_made_on_both_workers_at_once_are_all_matched(node: Node) -> None:
    """Two clients store subscriptions on worker 0 and worker 1 at the same time, so each
    worker hears of the other's changes while it has its own uncommitted: after the
    calls return, each worker must match all of them (a reload that drops its own
    pending one, or its own write hiding the other's, loses events for good)."""
    for round_ in range(4):  # a race: rounds make it show
        _subscribe_on_both_workers_at_once(node, f"mix{round_}")


def _subscribe_on_both_workers_at_once(node: Node, name: str) -> None:
    subscribers = [[key_on(w, f"MsgSubscriber/{name}w{w}_", skip=i) for i in range(30)]
                   for w in (0, 1)]  # fmt: skip
    topics = [key_on(0, f"{name}.a"), key_on(1, f"{name}.b")]  # published by worker 0, 1

    def subscribe(ids: list[str]) -> None:
        with node.client() as c:
            for s in ids:
                c.subscribe_agent(f"{name}.#", s)

    with node.client() as c:
        for t in topics:
            c.publish(t, 0)  # both workers have read the table (and cached its version)
        threads = [threading.Thread(target=subscribe, args=(ids,)) for ids in subscribers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        for t in topics:
            c.publish(t, 1)
        want = {f"{t}|1" for t in topics}
        wait_for(lambda: settled(c), 10, "the outboxes to drain")
        everyone = subscribers[0] + subscribers[1]
        missed = {s: sorted(want - events_of(c, s)) for s in everyone if want - events_of(c, s)}
        assert not missed, f"events never delivered: {missed}"


# --- mailbox strategies -----------------------------------------------------------------------


def _flood_asks(c: Client, agent: str, n: int = 12) -> list[Any]:
    """n asks in one BATCH frame: all of them reach the mailbox before the first runs."""
    return c.ask_many([(agent, "work", {"seq": i}) for i in range(n)], timeout=10)


@pytest.mark.timeout(60)
def test_drop_oldest_keeps_the_newest_and_fails_the_dropped_asks(node: Node) -> None:
    with node.client() as c:
        results = _flood_asks(c, "MsgDropOldest/a")
        assert all(isinstance(r, BackpressureError) for r in results[:8]), results
        assert results[8:] == [["MsgDropOldest/a", i] for i in range(8, 12)]
        assert c.ask("MsgDropOldest/a", "got") == [8, 9, 10, 11]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("agent", ["MsgDropNewest/a", "MsgReject/a"])
def test_drop_newest_and_reject_keep_the_oldest_and_refuse_the_rest(node: Node, agent: str) -> None:
    with node.client() as c:
        results = _flood_asks(c, agent)
        assert results[:4] == [[agent, i] for i in range(4)]
        assert all(isinstance(r, BackpressureError) for r in results[4:]), results
        assert c.ask(agent, "got") == [0, 1, 2, 3]
        assert c.ask(agent, "work", seq=99) == [agent, 99], "the mailbox did not recover"


@pytest.mark.timeout(60)
def test_spill_to_disk_delivers_every_message_in_order(node: Node) -> None:
    with node.client() as c:
        c.tell_many([("MsgSpill/a", "work", {"seq": i}) for i in range(200)])
        results = _flood_asks(c, "MsgSpill/a", 20)
        assert results == [["MsgSpill/a", i] for i in range(20)]
        assert c.ask("MsgSpill/a", "seen_order") == [*range(200), *range(20)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sink_worker", ["same worker", "other worker"])
def test_redirect_sends_the_overflow_to_the_redirect_agent(node: Node, sink_worker: str) -> None:
    sink = owner_index("MsgSink/0", 2)
    agent = key_on(sink if sink_worker == "same worker" else 1 - sink, "MsgRedirect/")
    with node.client(timeout=5.0) as c:
        c.tell_many([(agent, "work", {"seq": i}) for i in range(12)])
        wait_for(lambda: c.ask("MsgSink/0", "got") == list(range(4, 12)), 10, "the overflow")
        wait_for(lambda: c.ask(agent, "got") == [0, 1, 2, 3], 10, "the first four")
        # an ask that overflows is answered by the redirect agent, wherever it lives
        results = _flood_asks(c, agent)
        assert results[:4] == [[agent, i] for i in range(4)], results
        assert results[4:] == [["MsgSink/0", i] for i in range(4, 12)], results


# --- rate limits, fairness, credits -----------------------------------------------------------


@pytest.mark.timeout(60)
def test_rate_limited_agent_runs_no_faster_than_its_rate_and_others_are_served(
    node: Node,
) -> None:
    limited = key_on(0, "MsgRated/flood")
    probe = key_on(0, "MsgRated/probe")  # same worker, its own bucket
    neighbour = key_on(0, "MsgBusy/n")
    with node.client() as c:
        t0 = time.monotonic()
        c.tell_many([(limited, "spin", {}) for _ in range(400)])
        latencies = []
        while time.monotonic() - t0 < 1.2:
            t = time.monotonic()
            c.ask(neighbour, "spin")
            latencies.append(time.monotonic() - t)
        ran = c.ask(probe, "calls", agent=limited)
        elapsed = time.monotonic() - t0
        assert max(latencies) < 0.3, f"neighbour asks took up to {max(latencies):.3f} s"
        # burst (50) plus 50/s; generous margin for scheduling
        assert ran <= 50 + 50 * elapsed + 15, f"{ran} calls in {elapsed:.2f} s"
        assert ran >= 50, f"only {ran} calls in {elapsed:.2f} s: the agent is starved"
        assert c.ask(probe, "calls", agent=neighbour) == len(latencies)


@pytest.mark.timeout(60)
def test_a_flood_to_one_agent_does_not_stall_another_on_the_same_worker(node: Node) -> None:
    flooded = key_on(1, "MsgBusy/flood")
    other = key_on(1, "MsgBusy/other")
    total = 2500  # about 2.5 s of work, below the default mailbox capacity
    with node.client() as c:
        c.tell_many([(flooded, "spin", {"ms": 1.0}) for _ in range(total)])
        during = []  # latencies of asks answered while the flood was still running
        for _ in range(50):
            t = time.monotonic()
            c.ask(other, "spin")
            latency = time.monotonic() - t
            if c.ask(other, "calls", agent=flooded) == total:
                break
            during.append(latency)
        assert during, "no ask was answered during the flood: make it longer"
        assert max(during) < 0.5, f"asks during the flood took up to {max(during):.3f} s"
        wait_for(lambda: c.ask(other, "calls", agent=flooded) == total, 20, "the flood to end")


class _QueuedWatcher:
    """Polls one worker's ``queued`` count from its own client and thread, recording
    the maximum, while the test's client sends."""

    def __init__(self, node: Node, index: int) -> None:
        self.node, self.index = node, index
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self.node.client(timeout=5.0) as c:
            while not self._stop.is_set():
                self.samples.append(c.worker_stats()[self.index]["queued"])
                self._stop.wait(0.005)

    def __enter__(self) -> _QueuedWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["tell", "tell_many"])
def test_a_small_credit_window_bounds_what_the_worker_holds(node: Node, how: str) -> None:
    window, n = 5, 80
    agent = key_on(0, "MsgBusy/slow")
    probe = key_on(0, "MsgBusy/probe")
    with node.client(window=window) as c, _QueuedWatcher(node, 0) as watcher:
        if how == "tell":
            for _ in range(n):
                c.tell(agent, "spin", ms=3)
        else:
            c.tell_many([(agent, "spin", {"ms": 3}) for _ in range(n)])
        # the sender can be at most `window` messages ahead of what the worker consumed
        ran = c.ask(probe, "calls", agent=agent)
        assert ran >= n - window - 1, f"sending returned with {n - ran} tells not consumed"
        wait_for(lambda: c.ask(probe, "calls", agent=agent) == n, 20, "every tell to run")
    assert watcher.samples, "the watcher saw nothing"
    assert max(watcher.samples) <= window, f"worker held {max(watcher.samples)} > {window}"


# --- payload encodings ------------------------------------------------------------------------


@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        yield context
    finally:
        context.destroy(linger=0)


def _raw_ask(
    ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, header: bytes, payload: bytes
) -> tuple[int, Any]:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send_multipart([b"", header, payload])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if not sock.poll(100):
                continue
            frames = sock.recv_multipart()
            kind, corr, status = decode_reply_kind(frames[-2])
            if kind == REPLY:
                assert corr == 77
                return status, unpack(frames[-1])
        raise AssertionError("no reply")
    finally:
        sock.close(linger=0)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("target", ["node", "worker"])
def test_zlib_and_json_payloads_are_decoded_for_the_agent(
    node: Node, ctx: zmq.Context[zmq.Socket[bytes]], target: str
) -> None:
    big = bytes(range(256)) * (4 * 1024)  # 1 MiB
    with node.client() as c:
        workers = c.status()["workers"]
        endpoint = node.endpoint
        if target == "worker":
            endpoint = workers[owner_index("KV/enc", 2)]["endpoint"]
        packed = msgpack.packb({"key": "big", "value": big}, use_bin_type=True)
        zipped = zlib.compress(packed)
        assert len(zipped) < len(packed) // 10
        header = encode_request(ASK, 77, "KV/enc", "put", 0, {"phoenixencoding": "zlib"})
        assert _raw_ask(ctx, endpoint, header, zipped) == (0, None)
        assert c.ask("KV/enc", "get", key="big") == big
        header = encode_request(
            ASK, 77, "KV/enc", "put", 0, {"datacontenttype": "application/json"}
        )
        body = b'{"key": "j", "value": {"a": [1, 2.5, "x", null, true]}}'
        assert _raw_ask(ctx, endpoint, header, body) == (0, None)
        assert c.ask("KV/enc", "get", key="j") == {"a": [1, 2.5, "x", None, True]}
        # both at once: JSON, then compressed
        both = {"phoenixencoding": "zlib", "datacontenttype": "application/json"}
        header = encode_request(ASK, 77, "KV/enc", "put", 0, both)
        zjson = zlib.compress(b'{"key": "zj", "value": "' + b"y" * MiB + b'"}')
        assert _raw_ask(ctx, endpoint, header, zjson) == (0, None)
        assert c.ask("KV/enc", "get", key="zj") == "y" * MiB
