"""Child process for the store's process tests (run as a script, never imported by pytest).

    python _store_child.py writer PATH FIRST COUNT DURABILITY [MAP_SIZE]
        commit batches FIRST.. (COUNT of them, 0 = forever); print each batch
        number once its commit returned.
    python _store_child.py fill PATH
        lower RLIMIT_FSIZE, commit batches until a commit fails; print
        "committed N" per batch, then the failure, then what it checked.
    python _store_child.py hold PATH
        open a read transaction, print "ready", sleep until killed.

A batch (see :func:`batch_items`) writes BATCH_KEYS keys across two dbs in one
commit, so a reader can tell a whole batch from a partial one.
"""

from __future__ import annotations

import os
import resource
import signal
import sys
import time

from phoenix_node.state._errors import StoreWriteError
from phoenix_node.state.store import Store

BATCH_KEYS = 50
EXIT_WRITE_ERROR = 3
EXIT_OTHER_ERROR = 4
EXIT_NEVER_FAILED = 5


def batch_items(n: int) -> list[tuple[str, bytes, bytes]]:
    """The (db, key, value) triples of batch ``n``: half events, half agent states."""
    items = []
    for i in range(BATCH_KEYS):
        value = b"%08d:%02d:" % (n, i) + bytes([n % 251]) * 64
        if i % 2:
            items.append(("state", b"Crash/%08d-%02d" % (n, i), value))
        else:
            items.append(("events", b"%08d-%02d" % (n, i), value))
    return items


def write_batch(store: Store, n: int) -> None:
    with store.batch() as b:
        for db, key, value in batch_items(n):
            if db == "state":
                b.save_state(key.decode(), value)
            else:
                b.put(db, key, value)


def writer(path: str, first: int, count: int, durability: str, map_size: int) -> int:
    assert durability in ("durable", "buffered")
    store = Store(path, durability=durability, map_size=map_size)  # type: ignore[arg-type]
    n = first
    while count == 0 or n < first + count:
        write_batch(store, n)
        print(n, flush=True)
        n += 1
    store.close()
    return 0


def fill(path: str) -> int:
    store = Store(path)
    # The file-size limit makes write() fail with EFBIG instead of killing us.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    size = os.path.getsize(os.path.join(path, "data.mdb"))
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 256 * 1024, resource.RLIM_INFINITY))
    blob = os.urandom(1024)
    for n in range(10_000):
        try:
            with store.batch() as b:
                for i in range(20):
                    b.put("spill", b"%06d-%02d" % (n, i), blob)
        except StoreWriteError as exc:
            print(f"write-error {n} {exc}", flush=True)
            earlier = n > 0 and store.get("spill", b"%06d-19" % (n - 1)) == blob
            print("earlier-readable" if earlier else "earlier-LOST", flush=True)
            failed = store.get("spill", b"%06d-00" % n)
            print("failed-absent" if failed is None else "failed-VISIBLE", flush=True)
            return EXIT_WRITE_ERROR
        print(f"committed {n}", flush=True)
    return EXIT_NEVER_FAILED


def hold(path: str) -> int:
    store = Store(path)
    txn = store._begin_read()  # a reader slot that a kill -9 leaves stale
    txn.get(b"x")
    print("ready", flush=True)
    time.sleep(60)
    return 0


def main(argv: list[str]) -> int:
    mode, path = argv[0], argv[1]
    try:
        if mode == "writer":
            map_size = int(argv[5]) if len(argv) > 5 else 256 * 2**20
            return writer(path, int(argv[2]), int(argv[3]), argv[4], map_size)
        if mode == "fill":
            return fill(path)
        if mode == "hold":
            return hold(path)
    except Exception as exc:
        print(f"error {type(exc).__name__}: {exc}", flush=True)
        return EXIT_OTHER_ERROR
    print(f"unknown mode {mode!r}", flush=True)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
