"""The node's LMDB store: agent state and the other durable tables of a node.

On-disk format (format version 1)
---------------------------------
One LMDB environment per node directory (``data.mdb`` + ``lock.mdb`` inside
``path``), shared by every process of the node, opened with ``writemap=False``
(a full disk then fails a commit instead of killing the process with SIGBUS).
It holds these named databases, all created when the store is first opened;
keys are compared bytewise (LMDB's default order), so fixed-width big-endian
integers sort numerically:

- ``state``: key = the agent id (``"<Type>/<key>"``) in UTF-8; value = the
  agent's encoded state (opaque bytes, e.g. a CRDT's canonical ``encode()``).
- ``registry``, ``outbox``, ``dedup``, ``events``, ``spill``, ``repl``: key and value
  layouts belong to the module that writes them; the store treats them as
  opaque bytes.
- ``meta``: key ``b"store.format_version"`` = the format version as ASCII
  decimal (``b"1"``). Keys starting with ``b"store."`` are reserved for the
  store; other keys are free for the node. A store with another version is
  refused with :class:`StoreError` (no silent migration).

Limits: keys are 1..511 bytes (LMDB's ``MDB_MAXKEYSIZE``); agent ids are
non-empty ``str`` of at most 511 bytes of UTF-8; values are ``bytes`` of any
size the map can hold.

Writes and durability
---------------------
A :class:`WriteBatch` collects operations in memory, holding no transaction;
:meth:`Store.commit` applies them all in ONE write transaction (group commit):
all or nothing, also across a process crash (and a machine crash, within the
limits below). Writers serialize across all processes of the node (LMDB has a
single writer lock, held only inside ``commit``), so keep batches short: every
other writer of the node waits while one commits.

- ``durable``: LMDB fsyncs data and meta pages at each commit. A commit that
  returned survives a process crash and a machine crash or power loss.
  Acknowledge a message only after the commit that recorded it returned.
- ``buffered``: no fsync at commit (``MDB_NOSYNC | MDB_NOMETASYNC``). A commit
  that returned is in the OS page cache, so a process crash, even ``kill -9``,
  loses nothing committed. A machine crash or power loss may lose the commits
  not yet written back by the OS. In LMDB's words (``MDB_NOSYNC``): "if the
  filesystem preserves write order and the MDB_WRITEMAP flag is not used,
  transactions exhibit ACI (atomicity, consistency, isolation) properties and
  only lose D (durability). I.e. database integrity is maintained, but a
  system crash may undo the final transactions." :meth:`Store.sync` forces
  the fsync and so bounds that window; :meth:`Store.close` calls it.

The map grows by itself: on ``MDB_MAP_FULL`` the transaction is aborted, the
map doubled (up to ``max_map_size``) and the batch retried; past the cap the
commit raises :class:`StoreFullError`. A disk full or I/O error raises
:class:`StoreWriteError`. Either way nothing of the batch is visible and the
data committed before stays readable.

Processes and threads
---------------------
Open the store in the process that uses it, after any fork: a Store used in
another process than the one that opened it raises :class:`StoreClosedError`.
When a process forks while it holds a Store, the child releases its copy of
the environment (without touching the shared reader table), so the child may
open its own Store on the same path. One Store per path per process (LMDB's
locks are per process). A Store is not thread-safe: use it from one thread.
After a process that had the store open died, call :meth:`Store.reader_check`
(from any process holding it) to free the reader slots the dead one held.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol

import lmdb

from ._errors import (
    DecodeError,
    InvalidValueError,
    StoreClosedError,
    StoreError,
    StoreFullError,
    StoreWriteError,
)

if TYPE_CHECKING:
    from lmdb import _Database

__all__ = [
    "DB_NAMES",
    "FORMAT_KEY",
    "FORMAT_VERSION",
    "MAX_KEY_SIZE",
    "Durability",
    "Store",
    "WriteBatch",
]

DB_NAMES: Final = ("state", "registry", "outbox", "dedup", "events", "spill", "meta", "repl")
#: Version of the on-disk layout, stored in ``meta`` under :data:`FORMAT_KEY`.
FORMAT_VERSION: Final = 1
FORMAT_KEY: Final = b"store.format_version"
_RESERVED_META_PREFIX: Final = b"store."
#: LMDB's MDB_MAXKEYSIZE with its default build options.
MAX_KEY_SIZE: Final = 511
#: Items read per read transaction by the iterators.
ITER_CHUNK = 1000
#: How often a write retries after another process grew the map.
_MAX_RESIZE_RETRIES: Final = 8

Durability = Literal["durable", "buffered"]
_Op = tuple["_Database", bytes, bytes | None]


class _Encodable(Protocol):
    def encode(self) -> bytes: ...


# --------------------------------------------------------------- validation


def _check_key(key: object) -> bytes:
    if not isinstance(key, bytes):
        raise InvalidValueError(f"key must be bytes, got {type(key).__name__}")
    if not 0 < len(key) <= MAX_KEY_SIZE:
        raise InvalidValueError(f"key must be 1..{MAX_KEY_SIZE} bytes long, got {len(key)}")
    return key


def _agent_key(agent_id: object) -> bytes:
    if not isinstance(agent_id, str) or not agent_id:
        raise InvalidValueError(f"agent id must be a non-empty str, got {agent_id!r}")
    try:
        key = agent_id.encode()
    except UnicodeEncodeError as exc:
        raise InvalidValueError(f"agent id {agent_id!r} is not valid UTF-8 text") from exc
    if len(key) > MAX_KEY_SIZE:
        raise InvalidValueError(
            f"agent id {agent_id[:40]!r}... is {len(key)} bytes of UTF-8, at most "
            f"{MAX_KEY_SIZE} allowed"
        )
    return key


def _state_bytes(state: object) -> bytes:
    if isinstance(state, bytes):
        return state
    encode = getattr(state, "encode", None)
    if isinstance(state, str) or not callable(encode):
        raise InvalidValueError(
            f"state must be bytes or have an encode() -> bytes method, got {type(state).__name__}"
        )
    data = encode()
    if not isinstance(data, bytes):
        raise InvalidValueError(
            f"{type(state).__name__}.encode() returned {type(data).__name__}, not bytes"
        )
    return data


def _unknown_db(db: object) -> InvalidValueError:
    return InvalidValueError(f"unknown db {db!r}; valid names: {', '.join(DB_NAMES)}")


# -------------------------------------------------------------------- batch


class WriteBatch:
    """Writes collected in memory, applied in one transaction by :meth:`Store.commit`.

    Holds no transaction and no lock: build it at leisure. Operations apply in
    the order they were added (a later put of the same key wins). After a
    successful commit the batch is empty and may be reused; after a failed one
    it keeps its operations. ``with store.batch() as b:`` commits on normal
    exit and discards the operations when the block raises.
    """

    __slots__ = ("_handles", "_ops", "_store")

    def __init__(self, store: Store, handles: dict[str, _Database]) -> None:
        self._store = store
        self._handles = handles
        self._ops: list[_Op] = []

    def _handle(self, db: str) -> _Database:
        try:
            return self._handles[db]
        except (KeyError, TypeError):
            raise _unknown_db(db) from None

    def put(self, db: str, key: bytes, value: bytes) -> None:
        """Set ``key`` to ``value`` in the named db."""
        handle = self._handle(db)
        _check_key(key)
        if not isinstance(value, bytes):
            raise InvalidValueError(f"value must be bytes, got {type(value).__name__}")
        if db == "meta" and key.startswith(_RESERVED_META_PREFIX):
            raise InvalidValueError(
                f"meta keys starting with {_RESERVED_META_PREFIX!r} are reserved"
            )
        self._ops.append((handle, key, value))

    def delete(self, db: str, key: bytes) -> None:
        """Remove ``key`` from the named db (no error if it is absent)."""
        handle = self._handle(db)
        _check_key(key)
        if db == "meta" and key.startswith(_RESERVED_META_PREFIX):
            raise InvalidValueError(
                f"meta keys starting with {_RESERVED_META_PREFIX!r} are reserved"
            )
        self._ops.append((handle, key, None))

    def save_state(self, agent_id: str, state: bytes | _Encodable) -> None:
        """Store an agent's state: bytes, or an object whose ``encode()`` gives bytes.

        ``encode()`` is called now, so later changes to ``state`` are not written.
        """
        self._ops.append((self._handles["state"], _agent_key(agent_id), _state_bytes(state)))

    def delete_state(self, agent_id: str) -> None:
        """Forget an agent's state."""
        self._ops.append((self._handles["state"], _agent_key(agent_id), None))

    def clear(self) -> None:
        """Drop every collected operation."""
        self._ops.clear()

    def __len__(self) -> int:
        return len(self._ops)

    def __enter__(self) -> WriteBatch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self._store.commit(self)
        else:
            self._ops.clear()


# -------------------------------------------------------------------- store


class Store:
    """One process's handle on the node's LMDB environment (see the module docs)."""

    __slots__ = (
        "__weakref__",
        "_durability",
        "_env",
        "_handles",
        "_max_map_size",
        "_path",
        "_pid",
    )

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        durability: Durability = "durable",
        map_size: int = 256 * 2**20,
        max_map_size: int = 2**40,
        max_readers: int = 1024,
    ) -> None:
        if durability not in ("durable", "buffered"):
            raise InvalidValueError(
                f"durability must be 'durable' or 'buffered', got {durability!r}"
            )
        for name, n in (("map_size", map_size), ("max_readers", max_readers)):
            if type(n) is not int or n <= 0:
                raise InvalidValueError(f"{name} must be a positive int, got {n!r}")
        if type(max_map_size) is not int or max_map_size < map_size:
            raise InvalidValueError(
                f"max_map_size must be an int >= map_size, got {max_map_size!r}"
            )
        self._path = os.fspath(path)
        self._durability: Durability = durability
        self._max_map_size = max_map_size
        self._pid = os.getpid()
        self._env: lmdb.Environment | None = self._open_env(map_size, max_readers)
        self._handles: dict[str, _Database] = {}
        try:
            self._write(self._init_dbs)
        except BaseException:
            self._env.close()
            self._env = None
            raise
        _track(self)

    def _open_env(self, map_size: int, max_readers: int) -> lmdb.Environment:
        durable = self._durability == "durable"
        try:
            os.makedirs(self._path, exist_ok=True)
            return lmdb.open(
                self._path,
                map_size=map_size,
                max_dbs=len(DB_NAMES) + 4,
                max_readers=max_readers,
                writemap=False,
                sync=durable,
                metasync=durable,
                readahead=False,
                lock=True,
                subdir=True,
                # A cached idle read txn would keep a reader slot that a forked
                # child closing its copy of the environment would free under the
                # parent's feet (py-lmdb < 3 cached one by default).
                max_spare_txns=0,
            )
        except (OSError, lmdb.Error) as exc:
            raise StoreError(f"cannot open the store at {self._path}: {exc}") from exc

    def _init_dbs(self, txn: lmdb.Transaction[bytes]) -> None:
        env = self._live_env()
        handles = {name: env.open_db(name.encode(), txn=txn, create=True) for name in DB_NAMES}
        found = txn.get(FORMAT_KEY, db=handles["meta"])
        if found is None:
            txn.put(FORMAT_KEY, str(FORMAT_VERSION).encode(), db=handles["meta"])
        elif found != str(FORMAT_VERSION).encode():
            raise StoreError(
                f"the store at {self._path} has format version {found.decode(errors='replace')!r};"
                f" this build reads version {FORMAT_VERSION} only"
            )
        self._handles = handles

    # ------------------------------------------------------------ lifecycle

    @property
    def path(self) -> str:
        """The environment's directory."""
        return self._path

    @property
    def durability(self) -> Durability:
        """``"durable"`` or ``"buffered"`` (see the module docs)."""
        return self._durability

    def close(self) -> None:
        """Release the environment (idempotent); a buffered store syncs first.

        In a forked child it only forgets the parent's environment.
        """
        env, self._env = self._env, None
        _OPEN_STORES.discard(self)
        if env is None or self._pid != os.getpid():
            return
        try:
            if self._durability == "buffered":
                env.sync(True)
        except lmdb.Error as exc:
            raise StoreWriteError(f"final sync of the store at {self._path} failed: {exc}") from exc
        finally:
            env.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "open" if self._env is not None else "closed"
        return f"<Store {self._path!r} {self._durability} {state}>"

    def _live_env(self) -> lmdb.Environment:
        if self._pid != os.getpid():
            raise StoreClosedError(
                f"the store at {self._path} was opened in pid {self._pid}, used in pid "
                f"{os.getpid()}: open the store after fork"
            )
        if self._env is None:
            raise StoreClosedError(f"the store at {self._path} is closed")
        return self._env

    # ---------------------------------------------------------------- writes

    def batch(self) -> WriteBatch:
        """A new, empty batch for this store."""
        self._live_env()
        return WriteBatch(self, self._handles)

    def commit(self, batch: WriteBatch) -> None:
        """Apply every operation of ``batch`` in one write transaction.

        Waits for LMDB's writer lock, which writers of every process share.

        Raises StoreFullError (map at ``max_map_size``) or StoreWriteError (disk
        full, I/O error); then nothing of the batch is written and it keeps its
        operations. On success the batch is emptied.
        """
        if not isinstance(batch, WriteBatch) or batch._store is not self:
            raise InvalidValueError("commit() needs a WriteBatch made by this store's batch()")
        ops = batch._ops
        if not ops:
            self._live_env()
            return

        def apply(txn: lmdb.Transaction[bytes]) -> None:
            put, delete = txn.put, txn.delete
            for handle, key, value in ops:
                if value is None:
                    delete(key, db=handle)
                else:
                    put(key, value, db=handle)

        self._write(apply)
        ops.clear()

    def delete_if(self, db: str, items: Iterable[tuple[bytes, bytes]]) -> int:
        """Delete each ``key`` whose value is still ``value``, in one write transaction
        (a compare-and-delete: a key rewritten since it was read stays); returns how
        many were deleted."""
        handle = self._handle(db)
        pairs = [(_check_key(k), v) for k, v in items]
        deleted = 0

        def apply(txn: lmdb.Transaction[bytes]) -> None:
            nonlocal deleted
            deleted = 0
            for key, value in pairs:
                if txn.get(key, db=handle) == value:
                    txn.delete(key, db=handle)
                    deleted += 1

        if pairs:
            self._write(apply)
        return deleted

    def update_prefix(
        self,
        db: str,
        prefix: bytes,
        change: Callable[[dict[bytes, bytes]], dict[bytes, bytes | None]],
    ) -> dict[bytes, bytes | None]:
        """Read every item of ``db`` under ``prefix`` and write what ``change`` makes of
        them (key -> new value, None: delete), in one write transaction: no other
        writer's commit falls between the read and the write. ``change`` may run more
        than once (a retry after the map grew); returns its last answer."""
        handle = self._handle(db)
        if not isinstance(prefix, bytes) or len(prefix) > MAX_KEY_SIZE:
            raise InvalidValueError(
                f"prefix must be bytes of at most {MAX_KEY_SIZE}, got {prefix!r}"
            )
        writes: dict[bytes, bytes | None] = {}

        def apply(txn: lmdb.Transaction[bytes]) -> None:
            nonlocal writes
            items: dict[bytes, bytes] = {}
            cursor = txn.cursor(db=handle)
            found = cursor.set_range(prefix) if prefix else cursor.first()
            while found:
                key = cursor.key()
                if not key.startswith(prefix):
                    break
                items[key] = cursor.value()
                found = cursor.next()
            writes = change(items)
            for key, value in writes.items():
                if value is None:
                    txn.delete(_check_key(key), db=handle)
                else:
                    txn.put(_check_key(key), value, db=handle)

        self._write(apply)
        return writes

    def _write(self, apply: Callable[[lmdb.Transaction[bytes]], None]) -> None:
        """Run ``apply`` in a write txn; grow or adopt the map and retry as needed."""
        env = self._live_env()
        resizes = 0
        while True:
            try:
                with env.begin(write=True) as txn:
                    apply(txn)
                return
            except lmdb.MapFullError:
                self._grow(env)  # the failed txn is already aborted
            except lmdb.MapResizedError:
                # Another process grew the map past ours: adopt the size it committed.
                resizes += 1
                if resizes > _MAX_RESIZE_RETRIES:
                    raise StoreWriteError(f"the map of {self._path} keeps changing") from None
                self._set_map_size(env, 0)
            except lmdb.Error as exc:
                raise StoreWriteError(f"commit to the store at {self._path} failed: {exc}") from exc

    def _grow(self, env: lmdb.Environment) -> None:
        size = env.info()["map_size"]
        if size >= self._max_map_size:
            raise StoreFullError(
                f"the store at {self._path} is full: its map reached max_map_size "
                f"({self._max_map_size} bytes); nothing of the batch was written"
            )
        self._set_map_size(env, min(size * 2, self._max_map_size))

    def _set_map_size(self, env: lmdb.Environment, size: int) -> None:
        # Legal only with no transaction of this process live: the store never keeps
        # one between calls (iterators read in chunks) and is used from one thread.
        try:
            env.set_mapsize(size)
        except lmdb.Error as exc:
            raise StoreWriteError(f"cannot resize the map of {self._path}: {exc}") from exc

    def sync(self) -> None:
        """Force the data committed so far to disk (fsync); useful in buffered mode."""
        try:
            self._live_env().sync(True)
        except lmdb.Error as exc:
            raise StoreWriteError(f"sync of the store at {self._path} failed: {exc}") from exc

    # ----------------------------------------------------------------- reads

    def _begin_read(self) -> lmdb.Transaction[bytes]:
        env = self._live_env()
        try:
            try:
                return env.begin()
            except lmdb.MapResizedError:
                env.set_mapsize(0)  # adopt the size another process committed
                return env.begin()
        except lmdb.Error as exc:
            raise StoreError(f"cannot read the store at {self._path}: {exc}") from exc

    def _handle(self, db: str) -> _Database:
        try:
            return self._handles[db]
        except (KeyError, TypeError):
            raise _unknown_db(db) from None

    def get(self, db: str, key: bytes) -> bytes | None:
        """The value of ``key`` in the named db, or None."""
        handle = self._handle(db)
        _check_key(key)
        with self._begin_read() as txn:
            return txn.get(key, db=handle)

    def load_state(self, agent_id: str) -> bytes | None:
        """The state bytes saved for ``agent_id``, or None."""
        key = _agent_key(agent_id)
        with self._begin_read() as txn:
            return txn.get(key, db=self._handles["state"])

    def load_states(self, agent_ids: Iterable[str]) -> dict[str, bytes]:
        """The saved states of those of ``agent_ids`` that have one, read in one txn."""
        keys = [(agent_id, _agent_key(agent_id)) for agent_id in agent_ids]
        found: dict[str, bytes] = {}
        handle = self._handles["state"]
        with self._begin_read() as txn:
            for agent_id, key in keys:
                value = txn.get(key, db=handle)
                if value is not None:
                    found[agent_id] = value
        return found

    def iter_items(self, db: str, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        """``(key, value)`` pairs of the named db whose key starts with ``prefix``, in key order.

        Reads :data:`ITER_CHUNK` items per short read txn and holds none while the
        caller works, so this is not a snapshot: each chunk sees the latest
        commits. Every key comes at most once, in increasing order.
        """
        handle = self._handle(db)
        if not isinstance(prefix, bytes) or len(prefix) > MAX_KEY_SIZE:
            raise InvalidValueError(
                f"prefix must be bytes of at most {MAX_KEY_SIZE}, got {prefix!r}"
            )
        return self._scan(handle, prefix)

    def _scan(self, handle: _Database, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        after: bytes | None = None
        while True:
            chunk, more = self._read_chunk(handle, prefix, after)
            yield from chunk
            if not more:
                return
            after = chunk[-1][0]

    def _read_chunk(
        self, handle: _Database, prefix: bytes, after: bytes | None
    ) -> tuple[list[tuple[bytes, bytes]], bool]:
        """Up to ITER_CHUNK items with ``prefix`` past ``after``; True if more may follow."""
        items: list[tuple[bytes, bytes]] = []
        limit = ITER_CHUNK
        with self._begin_read() as txn:
            cursor = txn.cursor(db=handle)
            start = prefix if after is None else after
            found = cursor.set_range(start) if start else cursor.first()
            if found and after is not None and cursor.key() == after:
                found = cursor.next()
            if not found:
                return items, False
            for key, value in cursor.iternext():
                if not key.startswith(prefix):
                    return items, False
                items.append((key, value))
                if len(items) >= limit:
                    return items, True
        return items, False

    def iter_agents(self, prefix: str = "") -> Iterator[str]:
        """Ids of the agents with a saved state whose id starts with ``prefix``, in order.

        Chunked like :meth:`iter_items`; a key that is not UTF-8 raises DecodeError.
        """
        if not isinstance(prefix, str):
            raise InvalidValueError(f"prefix must be a str, got {type(prefix).__name__}")
        try:
            raw = prefix.encode()
        except UnicodeEncodeError as exc:
            raise InvalidValueError(f"prefix {prefix!r} is not valid UTF-8 text") from exc
        return self._agent_ids(self.iter_items("state", raw))

    def _agent_ids(self, items: Iterator[tuple[bytes, bytes]]) -> Iterator[str]:
        for key, _value in items:
            try:
                yield key.decode()
            except UnicodeDecodeError as exc:
                raise DecodeError(f"state key {key!r} in {self._path} is not UTF-8") from exc

    # ------------------------------------------------------------ operations

    def reader_check(self) -> int:
        """Free the reader slots of dead processes; returns how many were freed.

        Call it after reaping a process that had the store open.
        """
        try:
            return self._live_env().reader_check()
        except lmdb.Error as exc:
            raise StoreError(f"reader check of {self._path} failed: {exc}") from exc

    def stats(self) -> dict[str, Any]:
        """Sizes and counts: ``map_size``, ``max_map_size``, ``used_bytes``,
        ``entries`` (per db), ``readers`` (reader slots claimed, the quota is
        ``max_readers``), ``active_readers`` (slots holding a snapshot),
        ``reader_pids``, ``durability``, ``path``.
        """
        env = self._live_env()
        slots = _reader_slots(env.readers())
        with self._begin_read() as txn:
            entries = {name: txn.stat(h)["entries"] for name, h in self._handles.items()}
        info = env.info()
        return {
            "path": self._path,
            "durability": self._durability,
            "map_size": info["map_size"],
            "max_map_size": self._max_map_size,
            "used_bytes": (info["last_pgno"] + 1) * env.stat()["psize"],
            "entries": entries,
            "readers": len(slots),
            "active_readers": sum(1 for _pid, txnid in slots if txnid != "-"),
            "reader_pids": sorted({pid for pid, _txnid in slots}),
            "max_readers": info["max_readers"],
        }

    # ------------------------------------------------------------------ fork

    def _forget_after_fork(self) -> None:
        """In the child: release the inherited environment without touching the parent's.

        The store holds no transaction between calls and py-lmdb caches no idle
        read txn (``max_spare_txns=0``), so the copy owns no reader slot: closing
        it frees only this process's mappings and descriptors (the fcntl locks
        stay the parent's). py-lmdb refuses to open an environment twice in a
        process, so this is also what lets the child open its own Store.
        """
        env, self._env = self._env, None
        if env is not None:
            try:
                env.close()
            except lmdb.Error:
                pass


def _reader_slots(text: str) -> list[tuple[int, str]]:
    """Parse ``mdb_reader_list`` output into ``(pid, txnid or "-")`` pairs."""
    slots = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) == 3 and fields[0].isdigit():
            slots.append((int(fields[0]), fields[2]))
    return slots


# ----------------------------------------------------- fork bookkeeping

_OPEN_STORES: weakref.WeakSet[Store] = weakref.WeakSet()
_fork_hooks_installed = False


def _track(store: Store) -> None:
    global _fork_hooks_installed
    if not _fork_hooks_installed:
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _fork_hooks_installed = True
    _OPEN_STORES.add(store)


def _after_fork_in_child() -> None:
    stores = list(_OPEN_STORES)
    _OPEN_STORES.clear()
    for store in stores:
        store._forget_after_fork()
