"""Tests of the LMDB store: API, validation, map growth, fork, full disk."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import lmdb
import pytest

from phoenix_node.state import store as store_mod
from phoenix_node.state._errors import (
    DecodeError,
    InvalidValueError,
    StoreClosedError,
    StoreError,
    StoreFullError,
    StoreWriteError,
)
from phoenix_node.state.gcounter import GCounter
from phoenix_node.state.store import DB_NAMES, FORMAT_KEY, FORMAT_VERSION, Store

from ._store_child import EXIT_WRITE_ERROR

REPO = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).with_name("_store_child.py")
KiB = 1024
MiB = 1024 * KiB


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "db")
    try:
        yield s
    finally:
        s.close()


def spawn(*args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [sys.executable, str(CHILD), *args], stdout=subprocess.PIPE, text=True, env=env
    )


def kill(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    if proc.stdout:
        proc.stdout.close()


def put_many(s: Store, db: str, keys: range, size: int = 100) -> None:
    with s.batch() as b:
        for i in keys:
            b.put(db, b"k%07d" % i, b"%07d" % i + b"v" * size)


# ----------------------------------------------------------------- basics


def test_put_get_delete_round_trip(store: Store) -> None:
    with store.batch() as b:
        b.put("registry", b"a", b"1")
        b.put("outbox", b"a", b"other db")
    assert store.get("registry", b"a") == b"1"
    assert store.get("outbox", b"a") == b"other db"
    assert store.get("dedup", b"a") is None
    with store.batch() as b:
        b.delete("registry", b"a")
        b.delete("registry", b"never-there")
    assert store.get("registry", b"a") is None
    assert store.get("outbox", b"a") == b"other db"


def test_batch_applies_in_order_and_is_reusable(store: Store) -> None:
    b = store.batch()
    b.put("meta", b"k", b"first")
    b.put("meta", b"k", b"second")
    b.put("meta", b"gone", b"x")
    b.delete("meta", b"gone")
    assert len(b) == 4
    assert store.get("meta", b"k") is None  # nothing written before commit
    store.commit(b)
    assert len(b) == 0
    assert store.get("meta", b"k") == b"second"
    assert store.get("meta", b"gone") is None
    b.put("meta", b"k", b"third")
    store.commit(b)
    assert store.get("meta", b"k") == b"third"
    store.commit(store.batch())  # empty batch: no-op


def test_batch_block_discards_on_exception(store: Store) -> None:
    with pytest.raises(RuntimeError), store.batch() as b:
        b.put("state", b"x", b"1")
        raise RuntimeError("boom")
    assert len(b) == 0
    assert store.get("state", b"x") is None


def test_states_round_trip(store: Store) -> None:
    counter = GCounter()
    counter.increment("node-a#1", 5)
    with store.batch() as b:
        b.save_state("Counter/1", counter)
        b.save_state("Counter/2", b"raw")
        b.save_state("Zähler/ü", b"unicode id")
    loaded = store.load_state("Counter/1")
    assert loaded is not None
    assert GCounter.decode(loaded).value == 5
    assert store.load_state("Zähler/ü") == b"unicode id"
    assert store.load_state("Counter/404") is None
    found = store.load_states(["Counter/1", "Counter/404", "Counter/2"])
    assert found == {"Counter/1": counter.encode(), "Counter/2": b"raw"}
    with store.batch() as b:
        b.delete_state("Counter/2")
    assert store.load_state("Counter/2") is None


def test_iter_agents_with_prefix(store: Store) -> None:
    ids = ["Counter/1", "Counter/10", "Counter/2", "Cart/x", "Countdown/1"]
    with store.batch() as b:
        for agent_id in ids:
            b.save_state(agent_id, b"s")
    assert list(store.iter_agents()) == sorted(ids)
    assert list(store.iter_agents("Counter/")) == ["Counter/1", "Counter/10", "Counter/2"]
    assert list(store.iter_agents("Nope/")) == []


def test_iter_agents_refuses_a_non_utf8_key(store: Store) -> None:
    with store.batch() as b:
        b.put("state", b"\xff\xfe", b"x")
    with pytest.raises(DecodeError, match="not UTF-8"):
        list(store.iter_agents())


def test_iteration_crosses_chunks_in_order(store: Store) -> None:
    put_many(store, "events", range(2500), size=10)
    keys = [k for k, _v in store.iter_items("events")]
    assert keys == [b"k%07d" % i for i in range(2500)]
    assert dict(store.iter_items("events"))[b"k0001234"] == b"0001234" + b"v" * 10


@pytest.mark.parametrize("chunk", [1, 2, 3, 1000])
def test_prefix_iteration_at_chunk_boundaries(
    store: Store, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    monkeypatch.setattr(store_mod, "ITER_CHUNK", chunk)
    keys = [b"a", b"a\x00", b"ab", b"ab\xff", b"a\xff\xff", b"b", b"\x00", b"`z"]
    with store.batch() as b:
        for key in keys:
            b.put("spill", key, key * 2)
    assert [k for k, _ in store.iter_items("spill", b"a")] == sorted(
        k for k in keys if k[:1] == b"a"
    )
    assert list(store.iter_items("spill", b"ab")) == [
        (b"ab", b"abab"),
        (b"ab\xff", b"ab\xffab\xff"),
    ]
    assert [k for k, _ in store.iter_items("spill")] == sorted(keys)
    assert list(store.iter_items("spill", b"c")) == []
    assert list(store.iter_items("registry")) == []


def test_iteration_holds_no_read_txn_between_chunks(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_mod, "ITER_CHUNK", 10)
    put_many(store, "events", range(100), size=10)
    it = store.iter_items("events")
    assert next(it)[0] == b"k0000000"
    assert store.stats()["active_readers"] == 0
    # A fresh txn per chunk: later chunks see commits made meanwhile.
    with store.batch() as b:
        b.put("events", b"k0000500", b"late")
        b.delete("events", b"k0000050")
    rest = dict(it)
    assert rest[b"k0000500"] == b"late"
    assert b"k0000050" not in rest
    assert len(rest) == 99


def test_map_grows_while_an_iterator_is_paused(tmp_path: Path) -> None:
    with Store(tmp_path / "db", map_size=64 * KiB) as s:
        put_many(s, "events", range(1500), size=10)
        it = s.iter_items("events")
        next(it)
        put_many(s, "spill", range(3000), size=1000)  # needs several map doublings
        assert sum(1 for _ in it) == 1499


def test_stats_and_reader_check(store: Store) -> None:
    put_many(store, "events", range(30))
    with store.batch() as b:
        b.save_state("A/1", b"x")
    stats = store.stats()
    assert stats["entries"] == {
        "state": 1,
        "registry": 0,
        "outbox": 0,
        "dedup": 0,
        "events": 30,
        "spill": 0,
        "meta": 1,  # the format version
        "repl": 0,
    }
    assert stats["map_size"] == 256 * MiB
    assert 0 < stats["used_bytes"] < stats["map_size"]
    assert stats["durability"] == "durable"
    assert stats["max_readers"] == 1024
    assert stats["readers"] == 0 and stats["active_readers"] == 0
    assert store.reader_check() == 0


def test_buffered_mode_and_sync(tmp_path: Path) -> None:
    with Store(tmp_path / "db", durability="buffered") as s:
        assert s.durability == "buffered"
        assert s.path == str(tmp_path / "db")
        put_many(s, "events", range(10))
        s.sync()
        assert s.stats()["durability"] == "buffered"
    with Store(tmp_path / "db") as s:
        assert s.get("events", b"k0000009") is not None


def test_close_is_idempotent_and_refuses_later_use(tmp_path: Path) -> None:
    s = Store(tmp_path / "db")
    b = s.batch()
    b.put("meta", b"k", b"v")
    s.close()
    s.close()
    for call in (
        lambda: s.get("meta", b"k"),
        lambda: s.commit(b),
        s.batch,
        s.stats,
        s.reader_check,
        s.sync,
        lambda: list(s.iter_items("meta")),
    ):
        with pytest.raises(StoreClosedError, match="is closed"):
            call()
    with Store(tmp_path / "db") as again:  # reopening after close works
        assert again.get("meta", b"k") is None


def test_nested_directories_are_created(tmp_path: Path) -> None:
    with Store(tmp_path / "a" / "b" / "c") as s:
        assert s.get("meta", FORMAT_KEY) == str(FORMAT_VERSION).encode()


def test_second_open_in_one_process_is_a_store_error(store: Store) -> None:
    with pytest.raises(StoreError, match="cannot open"):
        Store(store.path)


# ---------------------------------------------------------------- bad input


def test_unknown_db_lists_the_valid_ones(store: Store) -> None:
    b = store.batch()
    for call in (
        lambda: b.put("nope", b"k", b"v"),
        lambda: b.delete("nope", b"k"),
        lambda: store.get("nope", b"k"),
        lambda: store.iter_items("nope"),
        lambda: store.get(["state"], b"k"),  # type: ignore[arg-type]
    ):
        with pytest.raises(InvalidValueError, match="valid names: " + ", ".join(DB_NAMES)):
            call()


@pytest.mark.parametrize(
    ("key", "match"),
    [
        ("str", "must be bytes, got str"),
        (bytearray(b"x"), "must be bytes, got bytearray"),
        (b"", "1..511 bytes long, got 0"),
        (b"x" * 512, "1..511 bytes long, got 512"),
    ],
)
def test_bad_keys(store: Store, key: object, match: str) -> None:
    b = store.batch()
    with pytest.raises(InvalidValueError, match=match):
        b.put("state", key, b"v")  # type: ignore[arg-type]
    with pytest.raises(InvalidValueError, match=match):
        b.delete("state", key)  # type: ignore[arg-type]
    with pytest.raises(InvalidValueError, match=match):
        store.get("state", key)  # type: ignore[arg-type]
    assert len(b) == 0


def test_longest_key_works(store: Store) -> None:
    with store.batch() as b:
        b.put("dedup", b"x" * 511, b"v")
    assert store.get("dedup", b"x" * 511) == b"v"


@pytest.mark.parametrize(
    ("agent_id", "match"),
    [
        ("", "non-empty str"),
        (b"A/1", "non-empty str"),
        (None, "non-empty str"),
        ("A/" + "é" * 255, "512 bytes of UTF-8, at most 511"),
        ("A/\udcff", "not valid UTF-8"),
    ],
)
def test_bad_agent_ids(store: Store, agent_id: object, match: str) -> None:
    b = store.batch()
    with pytest.raises(InvalidValueError, match=match):
        b.save_state(agent_id, b"s")  # type: ignore[arg-type]
    with pytest.raises(InvalidValueError, match=match):
        b.delete_state(agent_id)  # type: ignore[arg-type]
    with pytest.raises(InvalidValueError, match=match):
        store.load_state(agent_id)  # type: ignore[arg-type]
    with pytest.raises(InvalidValueError, match=match):
        store.load_states(["A/1", agent_id])  # type: ignore[list-item]


def test_agent_id_of_511_utf8_bytes_works(store: Store) -> None:
    agent_id = "A/" + "é" * 254 + "x"
    assert len(agent_id.encode()) == 511
    with store.batch() as b:
        b.save_state(agent_id, b"s")
    assert list(store.iter_agents()) == [agent_id]


def test_bad_values_and_states(store: Store) -> None:
    class BadEncode:
        def encode(self) -> str:
            return "not bytes"

    b = store.batch()
    with pytest.raises(InvalidValueError, match="value must be bytes, got str"):
        b.put("state", b"k", "v")  # type: ignore[arg-type]
    with pytest.raises(InvalidValueError, match="state must be bytes or have an encode"):
        b.save_state("A/1", "a str")  # str has encode(), refused anyway
    with pytest.raises(InvalidValueError, match="state must be bytes or have an encode"):
        b.save_state("A/1", 42)  # type: ignore[arg-type]
    with pytest.raises(InvalidValueError, match=r"BadEncode.encode\(\) returned str"):
        b.save_state("A/1", BadEncode())  # type: ignore[arg-type]
    with pytest.raises(InvalidValueError, match="prefix must be bytes"):
        store.iter_items("state", "A/")  # type: ignore[arg-type]
    with pytest.raises(InvalidValueError, match="prefix must be a str"):
        store.iter_agents(b"A/")  # type: ignore[arg-type]
    assert len(b) == 0


def test_reserved_meta_keys_are_refused(store: Store) -> None:
    b = store.batch()
    with pytest.raises(InvalidValueError, match="reserved"):
        b.put("meta", FORMAT_KEY, b"2")
    with pytest.raises(InvalidValueError, match="reserved"):
        b.delete("meta", FORMAT_KEY)
    b.put("meta", b"incarnation", b"7")  # other meta keys are free
    store.commit(b)


def test_commit_refuses_a_foreign_batch(tmp_path: Path, store: Store) -> None:
    with Store(tmp_path / "other") as other:
        b = other.batch()
        b.put("meta", b"k", b"v")
        with pytest.raises(InvalidValueError, match="this store's batch"):
            store.commit(b)
        with pytest.raises(InvalidValueError, match="this store's batch"):
            store.commit([])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"durability": "fast"}, "durability must be"),
        ({"map_size": 0}, "map_size must be a positive int"),
        ({"map_size": 1.5}, "map_size must be a positive int"),
        ({"max_readers": -1}, "max_readers must be a positive int"),
        ({"map_size": 2 * MiB, "max_map_size": MiB}, "max_map_size must be an int >= map_size"),
    ],
)
def test_bad_options(tmp_path: Path, kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(InvalidValueError, match=match):
        Store(tmp_path / "db", **kwargs)  # type: ignore[arg-type]


# ------------------------------------------------------------ format version


def test_other_format_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "db"
    Store(path).close()
    env = lmdb.open(str(path), max_dbs=len(DB_NAMES) + 4)
    with env.begin(write=True) as txn:
        txn.put(FORMAT_KEY, b"999", db=env.open_db(b"meta", txn=txn))
    env.close()
    with pytest.raises(StoreError) as info:
        Store(path)
    message = str(info.value)
    assert str(path) in message
    assert "'999'" in message
    assert f"version {FORMAT_VERSION} only" in message
    # The refused open left the environment closed: a raw open still works.
    lmdb.open(str(path), max_dbs=len(DB_NAMES) + 4).close()


# --------------------------------------------------------------- map growth


def test_tiny_map_grows_transparently(tmp_path: Path) -> None:
    with Store(tmp_path / "db", map_size=64 * KiB) as s:
        for start in range(0, 4000, 500):
            put_many(s, "events", range(start, start + 500), size=1000)  # ~4 MB in all
        with s.batch() as b:  # one batch far larger than one doubling
            for i in range(2000):
                b.put("spill", b"%06d" % i, bytes(1000))
        stats = s.stats()
        assert stats["map_size"] >= 4 * MiB
        assert stats["entries"]["events"] == 4000
        assert stats["entries"]["spill"] == 2000
        assert s.get("events", b"k0003999") == b"0003999" + b"v" * 1000


def test_max_map_size_cap_raises_store_full(tmp_path: Path) -> None:
    with Store(tmp_path / "db", map_size=64 * KiB, max_map_size=MiB) as s:
        put_many(s, "events", range(100), size=100)
        big = s.batch()
        for i in range(2000):
            big.put("spill", b"%06d" % i, bytes(1000))
        with pytest.raises(StoreFullError, match=r"max_map_size \(1048576 bytes\)"):
            s.commit(big)
        assert len(big) == 2000  # a failed batch keeps its operations
        assert s.stats()["map_size"] == MiB
        assert s.get("spill", b"000000") is None  # nothing of the failed batch
        assert s.get("events", b"k0000099") == b"0000099" + b"v" * 100
        put_many(s, "registry", range(10), size=100)  # small writes still fit
        assert s.get("registry", b"k0000009") is not None
    with Store(tmp_path / "db") as s:
        assert s.stats()["entries"]["registry"] == 10


def test_map_grown_by_another_process_is_adopted(tmp_path: Path) -> None:
    path = tmp_path / "db"
    with Store(path, map_size=64 * KiB) as s:
        put_many(s, "registry", range(10))
        proc = spawn("writer", str(path), "0", "300", "durable", str(64 * KiB))
        try:
            out, _ = proc.communicate(timeout=30)
        finally:
            kill(proc)
        assert proc.returncode == 0, out
        # The child grew the map past ours: reads and writes here adopt its size.
        assert s.get("events", b"00000299-48") is not None
        assert s.stats()["map_size"] > 64 * KiB
        put_many(s, "registry", range(10, 20))
        assert s.stats()["entries"]["registry"] == 20


# --------------------------------------------------------------------- fork


def run_in_fork(child: Callable[[], dict[str, object]]) -> dict[str, object]:
    """Run ``child`` in a forked process; returns its report (or its error)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report through the pipe, never return into pytest
        try:
            os.close(read_fd)
            try:
                report = child()
            except BaseException as exc:
                report = {"error": repr(exc)}
            os.write(write_fd, json.dumps(report).encode())
        finally:
            os._exit(0)
    try:
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            data = pipe.read()
        _, status = os.waitpid(pid, 0)
        pid = 0
        assert os.waitstatus_to_exitcode(status) == 0
        result: dict[str, object] = json.loads(data)
        return result
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def test_use_after_fork_is_refused_and_the_child_can_reopen(store: Store) -> None:
    with store.batch() as b:
        b.put("meta", b"parent", b"1")

    def child() -> dict[str, object]:
        report: dict[str, object] = {}
        for name, call in (
            ("get", lambda: store.get("meta", b"parent")),
            ("batch", store.batch),
            ("stats", store.stats),
        ):
            try:
                call()
                report[name] = "no error"
            except StoreClosedError as exc:
                report[name] = str(exc)
        # The inherited Store is still referenced here, yet the child may open its own.
        with Store(store.path) as own:
            report["reopened"] = (own.get("meta", b"parent") or b"").decode()
            with own.batch() as b:
                b.put("meta", b"child", b"2")
        store.close()  # allowed, and leaves the parent's handle alone
        return report

    report = run_in_fork(child)
    assert "error" not in report, report
    expected = f"opened in pid {os.getpid()}, used in pid "
    for name in ("get", "batch", "stats"):
        assert expected in str(report[name]), report
        assert str(report[name]).endswith("open the store after fork")
    assert report["reopened"] == "1"
    # The parent's handle is intact and sees the child's commit.
    assert store.get("meta", b"child") == b"2"
    with store.batch() as b:
        b.put("meta", b"after", b"3")
    assert store.get("meta", b"after") == b"3"


def test_forked_child_does_not_free_reader_slots_of_others(store: Store) -> None:
    # The at-fork hook closes the inherited environment in the child.
    assert run_in_fork(lambda: {}) == {}
    holder = spawn("hold", store.path)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "ready"
        for _ in range(3):
            store.get("meta", b"x")
        assert holder.pid in store.stats()["reader_pids"]
    finally:
        kill(holder)


def test_reader_check_frees_the_slot_of_a_killed_process(store: Store) -> None:
    holder = spawn("hold", store.path)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "ready"
        assert store.stats()["reader_pids"] == [holder.pid]
        assert store.stats()["active_readers"] == 1
    finally:
        kill(holder)
    assert store.reader_check() == 1
    assert store.stats()["reader_pids"] == []
    assert store.reader_check() == 0


# ---------------------------------------------------------------- full disk


def test_disk_full_is_a_store_write_error_and_loses_nothing_committed(tmp_path: Path) -> None:
    path = tmp_path / "db"
    Store(path).close()
    proc = spawn("fill", str(path))
    try:
        out, _ = proc.communicate(timeout=30)
    finally:
        kill(proc)
    lines = out.splitlines()
    assert proc.returncode == EXIT_WRITE_ERROR, out
    committed = [int(line.split()[1]) for line in lines if line.startswith("committed ")]
    assert committed == list(range(len(committed))) and committed, out
    failed = [line for line in lines if line.startswith("write-error ")]
    assert len(failed) == 1 and int(failed[0].split()[1]) == len(committed), out
    assert lines[-2:] == ["earlier-readable", "failed-absent"], out
    with Store(path) as s:
        assert s.reader_check() == 0
        for n in committed:
            for i in range(20):
                assert s.get("spill", b"%06d-%02d" % (n, i)) is not None, (n, i)
        assert s.get("spill", b"%06d-00" % len(committed)) is None
        assert s.stats()["entries"]["spill"] == 20 * len(committed)
        put_many(s, "spill", range(5))  # without the limit, writing works again


def test_write_errors_are_store_write_errors(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    class FailingEnv:
        def __init__(self, env: lmdb.Environment) -> None:
            self.env = env

        def begin(self, write: bool = False) -> lmdb.Transaction:
            if write:
                raise lmdb.DiskError("mdb_txn_commit: No space left on device")
            return self.env.begin()

        def sync(self, force: bool = False) -> None:
            raise lmdb.Error("mdb_env_sync: Input/output error")

    real = store._env
    assert real is not None
    monkeypatch.setattr(store, "_env", FailingEnv(real))
    b = store.batch()
    b.put("meta", b"k", b"v")
    with pytest.raises(StoreWriteError, match="No space left") as info:
        store.commit(b)
    assert isinstance(info.value.__cause__, lmdb.DiskError)
    with pytest.raises(StoreWriteError, match="Input/output error"):
        store.sync()
    monkeypatch.setattr(store, "_env", real)
    store.commit(b)
    assert store.get("meta", b"k") == b"v"


def test_delete_if_deletes_only_keys_still_holding_the_value_read(store: Store) -> None:
    with store.batch() as b:
        b.put("repl", b"a", b"1")
        b.put("repl", b"b", b"1")
    with store.batch() as b:
        b.put("repl", b"b", b"2")  # rewritten after it was read: must stay
    assert store.delete_if("repl", [(b"a", b"1"), (b"b", b"1"), (b"c", b"1")]) == 1
    assert dict(store.iter_items("repl")) == {b"b": b"2"}
    assert store.delete_if("repl", []) == 0
    with pytest.raises(InvalidValueError):
        store.delete_if("repl", [(b"", b"1")])


@pytest.mark.timeout(30)
def test_update_prefix_reads_and_writes_one_prefix_in_one_transaction(store: Store) -> None:
    with store.batch() as b:
        b.put("registry", b"sub/a", b"1")
        b.put("registry", b"sub/b", b"2")
        b.put("registry", b"other", b"3")
    seen: list[dict[bytes, bytes]] = []

    def change(items: dict[bytes, bytes]) -> dict[bytes, bytes | None]:
        seen.append(dict(items))
        return {b"sub/a": None, b"sub/c": b"4", b"version": b"v2"}

    writes = store.update_prefix("registry", b"sub/", change)
    assert seen == [{b"sub/a": b"1", b"sub/b": b"2"}]  # the prefix only
    assert writes == {b"sub/a": None, b"sub/c": b"4", b"version": b"v2"}
    assert dict(store.iter_items("registry", b"sub/")) == {b"sub/b": b"2", b"sub/c": b"4"}
    assert store.get("registry", b"version") == b"v2" and store.get("registry", b"other") == b"3"
    with pytest.raises(InvalidValueError):
        store.update_prefix("registry", b"x" * 600, change)
    with pytest.raises(InvalidValueError):
        store.update_prefix("nope", b"sub/", change)
