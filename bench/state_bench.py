"""CRDT update + durable group-commit throughput, against a raw-LMDB baseline.

Run from the repository root::

    .venv/bin/python bench/state_bench.py [--updates N] [--agents K] [--repeat R]
                                          [--seed S] [--dir PATH] [--json] [--check]

Every scenario applies the same N counter increments (agent keys drawn by
``random.Random(seed)`` from K agents) to a fresh LMDB environment in its own
temporary directory, durably (fsync at every commit), 1,000 updates per write
transaction:

- ``baseline``: raw py-lmdb read-modify-write of a msgpack ``{replica: count}``
  map per update (``txn.get`` -> ``unpackb`` -> increment -> ``packb`` -> ``put``).
- ``A``: the worker's real path: :class:`Store` + a ``PNCounter`` field in an
  :class:`AgentState` cached after its first load (``track_deltas=False``); at
  each commit every changed agent is encoded and saved, then marked clean.
- ``B``: no cache (worst case): load -> decode -> increment -> encode -> save per
  update; an agent seen earlier in the same batch reuses its in-memory state.
- ``C``: :class:`workers.host.AgentHost` with the demo ``Counter`` agent:
  ``host.handle(id, "inc", packed_kwargs)`` per update, ``host.commit()`` per
  1,000: the worker's full path minus sockets.

Scenarios run interleaved (baseline, A, B, C, baseline, ...) R times; the table
shows each one's median updates/s and its ratio to the baseline's median. Only
the update loop is timed (opening and closing the environment are not). After
timing, every run checks that the stored counters hold exactly the increments
applied (per agent, summing to N); a mismatch aborts with exit status 2.
``--check`` exits 1 when A / baseline < 0.5 (the target).
"""

from __future__ import annotations

import argparse
import collections
import functools
import gc
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import lmdb
import msgpack

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from phoenix_node.demo import Counter
from phoenix_node.state import CRDT, GCounter, PNCounter, StateSchema
from phoenix_node.state.composite import AgentState
from phoenix_node.state.store import Store
from workers.host import AgentHost

BATCH = 1000
TARGET_SCENARIO = "A-g"
TARGET_RATIO = 0.5
REPLICA = "bench-node#1"
MAP_SIZE = 256 * 2**20  # the Store's default initial map size
SCENARIOS = ("baseline", "A-g", "A", "B", "C")
DESCRIPTIONS = {
    "baseline": "raw LMDB get/unpackb/inc/packb/put",
    "A-g": "as A with a GCounter field: the baseline's data shape",
    "A": "Store + cached AgentState, PNCounter field (worker path)",
    "B": "Store, load/decode/encode per update",
    "C": "AgentHost.handle + commit (demo Counter)",
}

#: ``run(workdir, agent_ids) -> ((wall s, process CPU s), {agent_id: final count})``
Runner = Callable[[str, Sequence[str]], "tuple[tuple[float, float], dict[str, int]]"]


class BenchError(Exception):
    """The bench measured something wrong (a correctness check failed)."""


# ----------------------------------------------------------------- scenarios


def run_baseline(
    workdir: str, agent_ids: Sequence[str]
) -> tuple[tuple[float, float], dict[str, int]]:
    """Raw py-lmdb, opened like the durable Store, one named db."""
    keys = [a.encode() for a in agent_ids]  # the Store encodes ids itself: not timed here
    env = lmdb.open(
        workdir,
        map_size=MAP_SIZE,
        max_dbs=4,
        writemap=False,
        sync=True,
        metasync=True,
        readahead=False,
        lock=True,
        subdir=True,
        max_spare_txns=0,
    )
    try:
        db = env.open_db(b"state", create=True)
        packb, unpackb = msgpack.packb, msgpack.unpackb
        replica = REPLICA
        n = len(keys)
        c0, t0 = time.process_time(), time.perf_counter()
        for start in range(0, n, BATCH):
            with env.begin(write=True, db=db) as txn:
                get, put = txn.get, txn.put
                for key in keys[start : start + BATCH]:
                    raw = get(key)
                    counts = unpackb(raw) if raw is not None else {}
                    counts[replica] = counts.get(replica, 0) + 1
                    put(key, packb(counts))
        elapsed = time.perf_counter() - t0, time.process_time() - c0
        final: dict[str, int] = {}
        with env.begin(db=db) as txn:
            for key, value in txn.cursor():
                final[key.decode()] = sum(unpackb(value).values())
    finally:
        env.close()
    return elapsed, final


def _schema(field: type[CRDT] = PNCounter) -> StateSchema:
    return StateSchema({"count": field}, owner="Bench")


def _stored_counts(store: Store, schema: StateSchema) -> dict[str, int]:
    final: dict[str, int] = {}
    for key, value in store.iter_items("state"):
        final[key.decode()] = schema.decode(value, track_deltas=False)["count"].value
    return final


def run_hot(
    workdir: str, agent_ids: Sequence[str], field: type[CRDT] = PNCounter
) -> tuple[tuple[float, float], dict[str, int]]:
    """A: states cached after the first load; save each changed agent once per commit."""
    schema = _schema(field)
    with Store(workdir, durability="durable") as store:
        cache: dict[str, AgentState] = {}
        changed: dict[str, AgentState] = {}
        replica = REPLICA
        n = len(agent_ids)
        c0, t0 = time.process_time(), time.perf_counter()
        for start in range(0, n, BATCH):
            for agent_id in agent_ids[start : start + BATCH]:
                state = cache.get(agent_id)
                if state is None:
                    state = schema.load(store.load_state(agent_id), track_deltas=False)
                    cache[agent_id] = state
                state["count"].increment(replica, 1)  # type: ignore[attr-defined]
                changed[agent_id] = state
            batch = store.batch()
            for agent_id, state in changed.items():
                batch.save_state(agent_id, state.encode())
            store.commit(batch)
            for state in changed.values():
                state.mark_clean()
            changed.clear()
        elapsed = time.perf_counter() - t0, time.process_time() - c0
        final = _stored_counts(store, schema)
    return elapsed, final


def run_cold(workdir: str, agent_ids: Sequence[str]) -> tuple[tuple[float, float], dict[str, int]]:
    """B: no cache: load, decode, increment, encode and save at every update."""
    schema = _schema()
    with Store(workdir, durability="durable") as store:
        pending: dict[str, AgentState] = {}  # states already in this batch (not yet committed)
        replica = REPLICA
        n = len(agent_ids)
        c0, t0 = time.process_time(), time.perf_counter()
        for start in range(0, n, BATCH):
            batch = store.batch()
            for agent_id in agent_ids[start : start + BATCH]:
                state = pending.get(agent_id)
                if state is None:
                    state = schema.load(store.load_state(agent_id), track_deltas=False)
                    pending[agent_id] = state
                state["count"].increment(replica, 1)  # type: ignore[attr-defined]
                batch.save_state(agent_id, state.encode())  # a later put of the key wins
            store.commit(batch)
            pending.clear()
        elapsed = time.perf_counter() - t0, time.process_time() - c0
        final = _stored_counts(store, schema)
    return elapsed, final


def run_host(workdir: str, agent_ids: Sequence[str]) -> tuple[tuple[float, float], dict[str, int]]:
    """C: AgentHost with the demo Counter: handle() per update, commit() per batch."""
    with Store(workdir, durability="durable") as store:
        host = AgentHost({Counter.type_name: Counter}, store, REPLICA)
        handle, commit = host.handle, host.commit
        payload = msgpack.packb({})
        commits_ok = True
        n = len(agent_ids)
        c0, t0 = time.process_time(), time.perf_counter()
        for start in range(0, n, BATCH):
            for agent_id in agent_ids[start : start + BATCH]:
                handle(agent_id, "inc", payload)
            commits_ok = commit() and commits_ok
        elapsed = time.perf_counter() - t0, time.process_time() - c0
        if host.failed or not commits_ok or host.handled != n:
            raise BenchError(
                f"C: {host.failed} failed messages, commits ok: {commits_ok}, "
                f"handled {host.handled} of {n}"
            )
        final = _stored_counts(store, Counter.__phoenix_schema__)
    return elapsed, final


RUNNERS: dict[str, Runner] = {
    "baseline": run_baseline,
    "A-g": functools.partial(run_hot, field=GCounter),
    "A": run_hot,
    "B": run_cold,
    "C": run_host,
}


# --------------------------------------------------------------------- driver


def agent_sequence(updates: int, agents: int, seed: int, type_name: str) -> list[str]:
    """The agent id of every update, the same for every scenario."""
    rng = random.Random(seed)
    ids = [f"{type_name}/a{i}" for i in range(agents)]
    return [ids[rng.randrange(agents)] for _ in range(updates)]


def verify(name: str, final: dict[str, int], expected: collections.Counter[str]) -> None:
    """The store must hold exactly the increments applied, per agent."""
    total = sum(final.values())
    want = sum(expected.values())
    if total != want:
        raise BenchError(f"{name}: stored counters sum to {total}, expected {want}")
    if final != dict(expected):
        wrong = sorted(k for k in expected.keys() | final.keys() if final.get(k) != expected[k])
        raise BenchError(f"{name}: {len(wrong)} agents hold wrong counts, e.g. {wrong[:3]}")


def run_once(
    name: str,
    agent_ids: Sequence[str],
    expected: collections.Counter[str],
    parent: str | None,
) -> tuple[float, float]:
    """One run of ``name`` in a fresh directory: (updates/s, CPU us/update), once verified."""
    workdir = tempfile.mkdtemp(prefix=f"phoenix-bench-{name}-", dir=parent)
    try:
        gc.collect()
        (wall, cpu), final = RUNNERS[name](workdir, agent_ids)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    verify(name, final, expected)
    return len(agent_ids) / wall, cpu / len(agent_ids) * 1e6


def environment() -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "lmdb": lmdb.__version__,
        "liblmdb": ".".join(str(p) for p in lmdb.version()),
        "msgpack": ".".join(str(p) for p in msgpack.version),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "platform": platform.platform(),
    }


def run_bench(
    updates: int,
    agents: int,
    repeat: int,
    seed: int = 1,
    parent: str | None = None,
    warmup: bool = True,
) -> dict[str, Any]:
    """Run every scenario ``repeat`` times, interleaved; return the figures."""
    # Every scenario names agents "Counter/a<i>" so the keys (and their lengths) match.
    agent_ids = agent_sequence(updates, agents, seed, Counter.type_name)
    expected = collections.Counter(agent_ids)
    if warmup:
        # The first durable run of a process is often several times slower (fresh
        # files, cold caches): one short untimed (but verified) pass of each scenario.
        head = agent_ids[: max(BATCH, updates // 10)]
        head_expected = collections.Counter(head)
        for name in SCENARIOS:
            run_once(name, head, head_expected, parent)
    rates: dict[str, list[float]] = {name: [] for name in SCENARIOS}
    cpu: dict[str, list[float]] = {name: [] for name in SCENARIOS}
    verified: dict[str, int] = {name: 0 for name in SCENARIOS}
    for _ in range(repeat):
        for name in SCENARIOS:  # interleaved, so drift hits every scenario alike
            rate, cpu_us = run_once(name, agent_ids, expected, parent)
            rates[name].append(rate)
            cpu[name].append(cpu_us)
            verified[name] += 1  # run_once raised BenchError otherwise
    base = statistics.median(rates["baseline"])
    base_cpu = statistics.median(cpu["baseline"])
    scenarios: dict[str, Any] = {}
    for name in SCENARIOS:
        median = statistics.median(rates[name])
        median_cpu = statistics.median(cpu[name])
        scenarios[name] = {
            "description": DESCRIPTIONS[name],
            "updates_per_s": median,
            "ratio": median / base,
            "cpu_us_per_update": median_cpu,
            "cpu_ratio": base_cpu / median_cpu,
            "runs_updates_per_s": rates[name],
            "runs_cpu_us_per_update": cpu[name],
            "verified_runs": verified[name],
        }
    ratio = scenarios[TARGET_SCENARIO]["ratio"]
    return {
        "environment": environment(),
        "params": {
            "updates": updates,
            "agents": agents,
            "repeat": repeat,
            "seed": seed,
            "batch": BATCH,
            "warmup": warmup,
            "durability": "durable (fsync at every commit)",
        },
        "scenarios": scenarios,
        "target": {
            "scenario": TARGET_SCENARIO,
            "min_ratio": TARGET_RATIO,
            "ratio": ratio,
            "pass": ratio >= TARGET_RATIO,
        },
        "correctness_checked": all(v == repeat for v in verified.values()),
    }


def format_table(result: dict[str, Any]) -> str:
    env = result["environment"]
    p = result["params"]
    lines = [
        f"Python {env['python']} ({env['implementation']}), lmdb {env['lmdb']} "
        f"(LMDB {env['liblmdb']}), msgpack {env['msgpack']}, "
        f"{env['cpu_count']} CPUs ({env['cpus_usable']} usable)",
        f"{p['updates']:,} updates over {p['agents']:,} agents, {p['batch']:,} per durable "
        f"commit, median of {p['repeat']} interleaved runs, seed {p['seed']}",
        "",
        f"{'scenario':<9} {'updates/s':>10} {'ratio':>6} {'cpu us/upd':>10} {'cpu ratio':>9}"
        f"  {'runs (updates/s)':<22} what",
    ]
    for name, s in result["scenarios"].items():
        runs = " ".join(f"{r / 1000:.0f}k" for r in s["runs_updates_per_s"])
        lines.append(
            f"{name:<9} {s['updates_per_s']:>10,.0f} {s['ratio']:>6.3f} "
            f"{s['cpu_us_per_update']:>10.2f} {s['cpu_ratio']:>9.3f}  {runs:<22} "
            f"{s['description']}"
        )
    t = result["target"]
    verdict = "PASS" if t["pass"] else "FAIL"
    lines += [
        "",
        "ratio = median updates/s / baseline's (wall clock, the target's measure); "
        "cpu ratio = baseline's CPU time per update / the scenario's",
        f"correctness: stored counters match the {p['updates']:,} increments in every run: "
        f"{'yes' if result['correctness_checked'] else 'NO'}",
        f"{t['scenario']} / baseline >= {t['min_ratio']}: {verdict} ({t['ratio']:.3f})",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--updates", type=int, default=200_000, help="updates per run")
    parser.add_argument("--agents", type=int, default=10_000, help="distinct agents")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each scenario")
    parser.add_argument("--seed", type=int, default=1, help="seed of the agent sequence")
    parser.add_argument("--dir", default=None, help="parent of the temporary directories")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument(
        "--check", action="store_true", help=f"exit 1 if A / baseline < {TARGET_RATIO}"
    )
    args = parser.parse_args(argv)
    for name in ("updates", "agents", "repeat"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run_bench(
            args.updates, args.agents, args.repeat, args.seed, args.dir, not args.no_warmup
        )
    except BenchError as exc:
        print(f"bench error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    if args.check and not result["target"]["pass"]:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
