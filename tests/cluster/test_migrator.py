"""The Migrator in isolation: a Registry without a store, fakes that record what would go
to the worker and to the peers, and an injected clock."""

from __future__ import annotations

from typing import Any

import pytest

from ipc.protocol import (
    ADMIN,
    ASK,
    CREDIT,
    ErrorCode,
    ProtocolError,
    decode_header,
    encode_reply,
    encode_reply_kind,
    encode_request,
    pack,
    split_envelope,
    unpack,
)
from phoenix_node.cluster import migration
from phoenix_node.cluster.migration import ACCEPT_ACTION, MigrationError, Migrator
from phoenix_node.cluster.registry import Registry
from workers.host import MERGE_ACTION, RELEASE_ACTION

from .test_replicator import Clock

ME, TARGET, DEAD = "tcp://127.0.0.1:1", "tcp://127.0.0.1:2", "tcp://127.0.0.1:9"
AGENT = "Tally/a"
UNAVAILABLE = int(ErrorCode.UNAVAILABLE)


class Harness:
    """A Migrator on ``ME`` with recording fakes; ``worker_ok`` / ``peer_ok``: what the
    fakes answer (False: not sent)."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.registry = Registry(f"{ME}#1", clock=self.clock)
        self.to_worker: list[list[bytes]] = []
        self.to_peer: list[tuple[str, list[bytes]]] = []
        self.replicated: list[list[str]] = []
        self.replies: list[tuple[int, Any]] = []
        self.worker_ok = self.peer_ok = True
        self.migrator = Migrator(
            ME, self.registry, alive=lambda: {ME, TARGET}, to_worker=self._worker,
            to_peer=self._peer, replicate=self.replicated.append, timeout=5.0,
            clock=self.clock,
        )  # fmt: skip

    def _worker(self, agent_id: str, frames: list[bytes]) -> bool:
        if self.worker_ok:
            self.to_worker.append(frames)
        return self.worker_ok

    def _peer(self, address: str, frames: list[bytes]) -> bool:
        if self.peer_ok:
            self.to_peer.append((address, frames))
        return self.peer_ok

    def reply(self, status: int, body: Any) -> None:
        self.replies.append((status, body))

    def start(self, agent: str = AGENT, target: str = TARGET, **kw: Any) -> int:
        """Starts a move; the corr of its release ASK."""
        self.migrator.start(agent, target, self.reply, **kw)
        kind, corr, agent_id, action, _ = request(self.to_worker[-1])
        assert (kind, agent_id, action) == (ASK, agent, RELEASE_ACTION)
        return corr

    def released(self, corr: int, state: Any = b"state") -> tuple[int, dict[str, Any]]:
        """The worker answers the release; the (corr, body) of the accept sent."""
        assert self.migrator.on_worker_reply(answer(corr, 0, state))
        address, frames = self.to_peer[-1]
        kind, accept_corr, _, action, payload = request(frames)
        assert (address, kind, action) == (TARGET, ADMIN, ACCEPT_ACTION)
        return accept_corr, unpack(payload)


def request(frames: list[bytes]) -> tuple[int, int, str, str, bytes]:
    """(kind, corr, agent, action, payload) of a request the migrator sent."""
    stack, header, payload = split_envelope(frames)
    assert stack == []
    return (*decode_header(header), payload)


def answer(corr: int, status: int = 0, body: Any = None) -> list[bytes]:
    return [b"", encode_reply(corr, status), pack(body)]


class Recorder:
    """Buffered requests: ``run`` and ``refuse`` callables that note their name."""

    def __init__(self) -> None:
        self.ran: list[str] = []

    def run(self, name: str) -> Any:
        return lambda: self.ran.append(name)

    def refuse(self, name: str) -> Any:
        return lambda: self.ran.append(f"refused {name}")


# --- the source: a move ------------------------------------------------------------------


def test_a_move_releases_transfers_places_replies_and_reruns_the_buffered() -> None:
    h, rec = Harness(), Recorder()
    corr = h.start()
    assert h.migrator.status()["moving"] == [AGENT]
    assert h.migrator.buffer([AGENT], rec.run("r1"), rec.refuse("r1"))
    assert h.migrator.buffer(["Other/b", AGENT], rec.run("r2"), rec.refuse("r2"))
    assert not h.migrator.buffer(["Other/b"], rec.run("r3"), rec.refuse("r3"))
    accept_corr, body = h.released(corr, b"state")
    assert body["agent"] == AGENT and body["state"] == b"state"
    Registry.check_placement_write(AGENT, body["place"])
    assert h.registry.placement(AGENT) is None and h.replies == [] and rec.ran == []
    assert h.migrator.on_peer_reply(answer(accept_corr, 0, {"agent": AGENT, "node": TARGET}))
    assert h.registry.placement(AGENT) == TARGET
    [(status, result)] = h.replies
    assert status == 0
    assert result["moved"] is True and result["buffered"] == 2
    assert (result["agent"], result["from"], result["to"]) == (AGENT, ME, TARGET)
    assert rec.ran == ["r1", "r2"]
    assert not h.migrator.buffer([AGENT], rec.run("r4"), rec.refuse("r4"))
    assert not h.migrator.has_moves() and h.migrator.status()["moved"] == 1


def test_the_buffered_requests_run_after_the_move_has_ended() -> None:
    h = Harness()
    buffered_again: list[bool] = []

    def rerun() -> None:  # the control process routes the request again
        buffered_again.append(h.migrator.buffer([AGENT], _nop, _nop))

    corr = h.start()
    h.migrator.buffer([AGENT], rerun, _nop)
    accept_corr, _ = h.released(corr)
    h.migrator.on_peer_reply(answer(accept_corr))
    assert buffered_again == [False]  # served, not buffered again


def _nop() -> None:
    pass


def test_the_place_sent_to_the_target_places_the_agent_there() -> None:
    h = Harness()
    _, body = h.released(h.start())
    target_copy = Registry(f"{TARGET}#1")
    assert target_copy.merge(body["place"])
    assert target_copy.placement(AGENT) == TARGET


def test_an_agent_without_state_still_moves() -> None:
    h = Harness()
    accept_corr, body = h.released(h.start(), None)
    assert body["state"] is None
    h.migrator.on_peer_reply(answer(accept_corr))
    assert h.registry.placement(AGENT) == TARGET and h.replies[0][1]["moved"] is True


def test_an_empty_release_answer_means_no_state() -> None:
    h = Harness()
    corr = h.start()
    assert h.migrator.on_worker_reply([b"", encode_reply(corr, 0), b""])
    _, _, _, _, payload = request(h.to_peer[-1][1])
    assert unpack(payload)["state"] is None


def test_a_move_to_this_node_answers_at_once_and_moves_nothing() -> None:
    h = Harness()
    h.registry.merge(h.registry.prepare_placement(AGENT, ME))
    h.migrator.start(AGENT, ME, h.reply)
    assert h.replies == [(0, {"agent": AGENT, "from": ME, "to": ME, "moved": False})]
    assert h.registry.placement(AGENT) == ME  # a pin stays
    assert h.to_worker == [] and not h.migrator.has_moves()


def test_unpin_to_this_node_removes_the_placement() -> None:
    h = Harness()
    h.registry.merge(h.registry.prepare_placement(AGENT, ME))
    h.migrator.start(AGENT, ME, h.reply, unpin=True)
    assert h.registry.placement(AGENT) is None
    assert h.replies[0][1]["moved"] is False and h.to_worker == []


def test_unpin_to_another_node_moves_and_removes_the_placement() -> None:
    h = Harness()
    h.registry.merge(h.registry.prepare_placement(AGENT, ME))
    accept_corr, body = h.released(h.start(unpin=True))
    target_copy = Registry(f"{TARGET}#1")
    target_copy.merge(_copy_of(h.registry))  # the target knew the pin
    assert target_copy.placement(AGENT) == ME
    target_copy.merge(body["place"])
    assert target_copy.placement(AGENT) is None
    h.migrator.on_peer_reply(answer(accept_corr))
    assert h.registry.placement(AGENT) is None and h.replies[0][1]["moved"] is True


@pytest.mark.parametrize("agent", ["no-slash", "", 5, None])
def test_a_bad_agent_id_cannot_move(agent: Any) -> None:
    h = Harness()
    with pytest.raises(MigrationError):
        h.migrator.start(agent, TARGET, h.reply)
    assert h.to_worker == [] and h.replies == [] and not h.migrator.has_moves()


def test_a_target_that_is_not_alive_is_refused() -> None:
    h = Harness()
    with pytest.raises(MigrationError, match="live"):
        h.migrator.start(AGENT, DEAD, h.reply)
    assert h.to_worker == [] and not h.migrator.has_moves()


def test_an_agent_already_moving_cannot_move_again() -> None:
    h = Harness()
    h.start()
    with pytest.raises(MigrationError, match="already moving"):
        h.migrator.start(AGENT, TARGET, h.reply)
    assert len(h.to_worker) == 1 and h.replies == []


# --- the source: failures ----------------------------------------------------------------


def test_a_release_the_worker_cannot_take_aborts_at_once() -> None:
    h, rec = Harness(), Recorder()

    def refusing_worker(agent_id: str, frames: list[bytes]) -> bool:
        h.migrator.buffer([agent_id], rec.run("r1"), rec.refuse("r1"))  # arrived meanwhile
        return False

    h.migrator._to_worker = refusing_worker
    h.migrator.start(AGENT, TARGET, h.reply)
    [(status, message)] = h.replies
    assert status == UNAVAILABLE and "not accepting" in message
    assert rec.ran == ["r1"]
    assert not h.migrator.has_moves() and h.migrator.status()["aborted"] == 1


def test_a_release_error_aborts_and_serves_the_buffered_here() -> None:
    h, rec = Harness(), Recorder()
    corr = h.start()
    h.migrator.buffer([AGENT], rec.run("r1"), rec.refuse("r1"))
    digest = h.registry.digest()
    boom = {"code": 9, "message": "store failed"}
    assert h.migrator.on_worker_reply(answer(corr, int(ErrorCode.STORE_FAILED), boom))
    [(status, message)] = h.replies
    assert status == UNAVAILABLE and "store failed" in message
    assert rec.ran == ["r1"] and h.to_peer == []
    assert h.registry.digest() == digest and not h.migrator.has_moves()


def test_an_unreadable_release_answer_aborts() -> None:
    h = Harness()
    corr = h.start()
    assert h.migrator.on_worker_reply(answer(corr, 0, {"not": "bytes"}))
    assert h.replies[0][0] == UNAVAILABLE and "unreadable" in h.replies[0][1]
    assert h.to_peer == [] and not h.migrator.has_moves()


def test_a_release_not_answered_in_time_aborts_without_a_registry_write() -> None:
    h, rec = Harness(), Recorder()
    corr = h.start()
    h.migrator.buffer([AGENT], rec.run("r1"), rec.refuse("r1"))
    digest = h.registry.digest()
    assert h.migrator.next_deadline() == h.clock.now + 5.0
    h.clock.now += 4.9
    h.migrator.tick()
    assert h.replies == [] and h.migrator.has_moves()
    h.clock.now += 0.1
    h.migrator.tick()
    assert h.replies[0][0] == UNAVAILABLE and rec.ran == ["r1"]
    assert h.registry.digest() == digest and h.migrator.next_deadline() == float("inf")
    assert h.migrator.on_worker_reply(answer(corr, 0, b"late"))  # late: consumed
    assert h.to_peer == [] and len(h.replies) == 1


@pytest.mark.parametrize("before", [None, ME])
def test_an_accept_not_answered_in_time_writes_the_old_placement_back(
    before: str | None,
) -> None:
    h, rec = Harness(), Recorder()
    if before is not None:
        h.registry.merge(h.registry.prepare_placement(AGENT, before))
    _, body = h.released(h.start())
    h.migrator.buffer([AGENT], rec.run("r1"), rec.refuse("r1"))
    h.clock.now += 5.0
    h.migrator.tick()
    assert h.replies[0][0] == UNAVAILABLE and rec.ran == ["r1"]
    assert h.registry.placement(AGENT) == before
    # The target applied the move's write after all: the write-back is newer.
    assert h.registry.merge(body["place"]) is False
    assert h.registry.placement(AGENT) == before
    target_copy = Registry(f"{TARGET}#1")
    target_copy.merge(body["place"])
    assert target_copy.placement(AGENT) == TARGET
    target_copy.on_sync(pack({"digest": b"", "copy": _copy_of(h.registry)}))
    assert target_copy.placement(AGENT) == before
    assert target_copy.digest() == h.registry.digest()


def test_the_accept_phase_gets_a_timeout_of_its_own() -> None:
    h = Harness()
    corr = h.start()
    h.clock.now += 4.0
    h.released(corr)
    h.clock.now += 4.0
    h.migrator.tick()
    assert h.migrator.has_moves() and h.replies == []
    assert h.migrator.next_deadline() == h.clock.now + 1.0
    h.clock.now += 1.0
    h.migrator.tick()
    assert not h.migrator.has_moves() and h.replies[0][0] == UNAVAILABLE


def _copy_of(reg: Registry) -> bytes:
    copy = reg.on_sync(pack({"digest": b"", "copy": None}))["copy"]
    assert isinstance(copy, bytes)
    return copy


def test_a_late_accept_answer_after_an_abort_changes_nothing() -> None:
    h, rec = Harness(), Recorder()
    accept_corr, _ = h.released(h.start())
    h.clock.now += 5.0
    h.migrator.tick()
    digest = h.registry.digest()
    assert h.migrator.on_peer_reply(answer(accept_corr, 0, {"agent": AGENT}))
    assert h.registry.placement(AGENT) is None and h.registry.digest() == digest
    assert len(h.replies) == 1 and h.migrator.status()["moved"] == 0
    assert not h.migrator.buffer([AGENT], rec.run("r"), rec.refuse("r"))


def test_a_target_that_refuses_aborts_the_move() -> None:
    h = Harness()
    accept_corr, _ = h.released(h.start())
    refusal = {"code": 1, "message": "bad placement"}
    assert h.migrator.on_peer_reply(answer(accept_corr, int(ErrorCode.BAD_REQUEST), refusal))
    assert h.replies[0][0] == UNAVAILABLE and "bad placement" in h.replies[0][1]
    assert h.registry.placement(AGENT) is None and not h.migrator.has_moves()


def test_a_target_not_reachable_aborts_the_move() -> None:
    h = Harness()
    corr = h.start()
    h.peer_ok = False
    assert h.migrator.on_worker_reply(answer(corr, 0, b"state"))
    assert h.replies[0][0] == UNAVAILABLE and "not reachable" in h.replies[0][1]
    assert h.registry.placement(AGENT) is None and not h.migrator.has_moves()


def test_a_full_buffer_refuses_further_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(migration, "_MAX_BUFFERED", 2)
    h, rec = Harness(), Recorder()
    corr = h.start()
    for name in ("r1", "r2", "r3"):
        assert h.migrator.buffer([AGENT], rec.run(name), rec.refuse(name))
    assert rec.ran == ["refused r3"]
    assert h.migrator.status()["buffered"] == 2 and h.migrator.status()["refused"] == 1
    accept_corr, _ = h.released(corr)
    h.migrator.on_peer_reply(answer(accept_corr))
    assert rec.ran == ["refused r3", "r1", "r2"]
    assert h.replies[0][1]["buffered"] == 2


def test_an_answer_of_the_wrong_phase_does_not_advance_a_move() -> None:
    h = Harness()
    corr = h.start()
    assert h.migrator.on_peer_reply(answer(corr))  # a peer echoing the release's corr
    assert h.registry.placement(AGENT) is None and h.replies == []
    h2 = Harness()
    accept_corr, _ = h2.released(h2.start())
    assert h2.migrator.on_worker_reply(answer(accept_corr, 0, b"again"))
    assert len(h2.to_peer) == 1 and h2.registry.placement(AGENT) is None


# --- the target --------------------------------------------------------------------------


def accept_payload(state: Any = b"state", **overrides: Any) -> bytes:
    """A source's accept placing ``AGENT`` on ``ME`` (the migrator under test)."""
    place = Registry(f"{TARGET}#1").prepare_placement(AGENT, ME)
    return pack({"agent": AGENT, "state": state, "place": place, **overrides})


def test_an_accepted_state_is_merged_then_placed_replicated_and_answered() -> None:
    h = Harness()
    h.migrator.on_accept(accept_payload(state=b"state"), h.reply)
    kind, corr, agent, action, payload = request(h.to_worker[-1])
    assert (kind, agent, action, payload) == (ASK, AGENT, MERGE_ACTION, b"state")
    assert h.registry.placement(AGENT) is None and h.replies == [] and h.replicated == []
    assert h.migrator.on_worker_reply(answer(corr, 0, True))
    assert h.registry.placement(AGENT) == ME
    assert h.replicated == [[AGENT]]
    assert h.replies == [(0, {"agent": AGENT, "node": ME})]
    assert h.migrator.status()["accepted"] == 1


def test_an_accept_without_state_is_placed_at_once() -> None:
    h = Harness()
    h.migrator.on_accept(accept_payload(state=None), h.reply)
    assert h.to_worker == []
    assert h.registry.placement(AGENT) == ME and h.replicated == [[AGENT]]
    assert h.replies == [(0, {"agent": AGENT, "node": ME})]


def test_an_accept_of_an_unpin_removes_the_placement() -> None:
    h = Harness()
    source = Registry(f"{TARGET}#1")
    h.registry.merge(source.prepare_placement(AGENT, TARGET))
    removal = source.prepare_placement(AGENT, None)
    h.migrator.on_accept(pack({"agent": AGENT, "state": None, "place": removal}), h.reply)
    assert h.registry.placement(AGENT) is None and h.replies[0][0] == 0


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1",
        pack(["agent", "state"]),
        accept_payload(agent="no-slash"),
        accept_payload(agent=5),
        accept_payload(place="text"),
        accept_payload(place=None),
        accept_payload(state="text"),
        accept_payload(place=Registry(f"{TARGET}#1").prepare_placement("Other/b", ME)),
        accept_payload(place=b"\x93\x07\x01\xc1"),
    ],
    ids=[
        "not-msgpack",
        "not-a-map",
        "bad-agent",
        "agent-int",
        "place-str",
        "place-missing",
        "state-str",
        "place-for-another-agent",
        "place-not-lww",
    ],
)
def test_a_bad_accept_is_refused(payload: bytes) -> None:
    h = Harness()
    with pytest.raises(ProtocolError):
        h.migrator.on_accept(payload, h.reply)
    assert h.to_worker == [] and h.replies == [] and h.replicated == []
    assert not h.registry.has_placements()


def test_an_accept_whose_worker_is_not_accepting_is_unavailable() -> None:
    h = Harness()
    h.worker_ok = False
    h.migrator.on_accept(accept_payload(), h.reply)
    assert h.replies[0][0] == UNAVAILABLE
    assert h.registry.placement(AGENT) is None and h.migrator.next_deadline() == float("inf")


def test_a_merge_not_answered_in_time_is_unavailable_and_a_late_one_ignored() -> None:
    h = Harness()
    h.migrator.on_accept(accept_payload(), h.reply)
    corr = request(h.to_worker[-1])[1]
    assert h.migrator.next_deadline() == h.clock.now + 5.0
    h.clock.now += 5.0
    h.migrator.tick()
    assert h.replies == [(UNAVAILABLE, "the merge was not answered in time")]
    assert h.migrator.on_worker_reply(answer(corr, 0, True))  # late: consumed
    assert h.registry.placement(AGENT) is None and len(h.replies) == 1
    assert h.replicated == []


def test_a_failed_merge_is_answered_with_its_status() -> None:
    h = Harness()
    h.migrator.on_accept(accept_payload(), h.reply)
    corr = request(h.to_worker[-1])[1]
    failed = int(ErrorCode.STORE_FAILED)
    assert h.migrator.on_worker_reply(answer(corr, failed, {"message": "disk full"}))
    [(status, message)] = h.replies
    assert status == failed and "disk full" in message
    assert h.registry.placement(AGENT) is None and h.replicated == []


# --- frames that are not ours ------------------------------------------------------------


def test_frames_that_answer_nothing_of_ours_are_not_consumed() -> None:
    h = Harness()
    corr = h.start()
    not_ours = [
        answer(5),  # another component's corr
        answer(1 << 62),  # past the migrator's range
        [b"", encode_request(ASK, corr, AGENT, RELEASE_ACTION), b""],  # a request
        [b"", encode_reply_kind(CREDIT, corr), b""],  # not a reply
        [b"junk"],
        [b"", b"\xc1", b""],
    ]
    for frames in not_ours:
        assert h.migrator.on_worker_reply(frames) is False
        assert h.migrator.on_peer_reply(frames) is False
    assert h.migrator.has_moves() and h.to_peer == [] and h.replies == []
    assert h.migrator.on_worker_reply(answer(corr, 0, b"state")) is True
