"""Placement (workers/placement.py): Lamport & Veach's jump consistent hash over a
BLAKE2b digest of the agent id; every process must compute the same owner."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections import Counter as Tally

import pytest
from hypothesis import given
from hypothesis import strategies as st

from workers.placement import jump_hash, owner_index

from ..conftest import REPO_ROOT

N_IDS = 100_000
MAX_N = 16


def reference_jump(key: int, buckets: int) -> int:
    """The paper's C++ code, with its uint64 wrap-around and double arithmetic spelled out."""
    b, j = -1, 0
    while j < buckets:
        b = j
        key = (key * 2862933555777941757 + 1) % 2**64
        j = int((b + 1) * (2.0**31 / ((key >> 33) + 1)))
    return b


def digest(agent_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(agent_id.encode(), digest_size=8).digest(), "little")


@pytest.mark.parametrize(
    ("key", "buckets", "expected"),
    [
        # published vectors (ClickHouse's jumpConsistentHash tests, Go/Rust ports)
        (1, 1, 0),
        (42, 57, 43),
        (256, 1024, 520),
        (0xDEAD10CC, 1, 0),
        (0xDEAD10CC, 666, 361),
        (16045690984833335023, 255, 237),
        (0, 60, 0),
        (1, 60, 55),
        (2, 60, 46),
    ],
)
def test_known_vectors(key: int, buckets: int, expected: int) -> None:
    assert jump_hash(key, buckets) == expected


@given(st.integers(0, 2**64 - 1), st.integers(1, 10_000))
def test_matches_the_reference_and_stays_in_range(key: int, buckets: int) -> None:
    bucket = jump_hash(key, buckets)
    assert 0 <= bucket < buckets
    assert bucket == reference_jump(key, buckets) == jump_hash(key, buckets)


def test_keys_are_taken_modulo_2_64() -> None:
    for buckets in (2, 7, 100):
        assert jump_hash(-1, buckets) == jump_hash(2**64 - 1, buckets)
        assert jump_hash(2**64 + 5, buckets) == jump_hash(5, buckets)


@pytest.mark.parametrize("buckets", [0, -1])
def test_no_buckets_is_an_error(buckets: int) -> None:
    with pytest.raises(ValueError, match="buckets"):
        jump_hash(1, buckets)
    with pytest.raises(ValueError, match="buckets"):
        owner_index("Counter/a", buckets)


@given(st.text(max_size=40), st.integers(1, 64))
def test_owner_index_is_the_jump_hash_of_the_blake2b_digest(key: str, workers: int) -> None:
    agent_id = f"T/{key}"
    assert owner_index(agent_id, workers) == reference_jump(digest(agent_id), workers)
    assert owner_index(agent_id, 1) == 0


@pytest.mark.timeout(30)
def test_every_process_computes_the_same_owner() -> None:
    """No dependence on PYTHONHASHSEED or process state: clients and workers agree."""
    ids = [f"Counter/{i}" for i in range(200)] + ["KV/é", "T/" + "k" * 500]
    code = (
        "import sys; from workers.placement import owner_index\n"
        "ids = sys.stdin.read().split('\\n')\n"
        "print(','.join(str(owner_index(a, n)) for a in ids for n in (2, 3, 8)))\n"
    )
    expected = ",".join(str(owner_index(a, n)) for a in ids for n in (2, 3, 8))
    for seed in ("0", "12345"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            input="\n".join(ids),
            capture_output=True,
            text=True,
            timeout=20,
            env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": REPO_ROOT},
            check=True,
        )
        assert out.stdout.strip() == expected


@pytest.fixture(scope="module")
def table() -> dict[int, list[int]]:
    """Owner of each of 100k agent ids, for 1..17 workers."""
    keys = [digest(f"Counter/{i}") for i in range(N_IDS)]
    return {n: [jump_hash(k, n) for k in keys] for n in range(1, MAX_N + 2)}


@pytest.mark.parametrize("n", range(2, MAX_N + 1))
def test_spread_is_even(table: dict[int, list[int]], n: int) -> None:
    counts = Tally(table[n])
    assert set(counts) == set(range(n))
    expected = N_IDS / n
    worst = max(abs(c - expected) / expected for c in counts.values())
    assert worst < 0.05, f"{n} workers: a bucket is {worst:.1%} off the mean"


@pytest.mark.parametrize("n", range(1, MAX_N + 1))
def test_growing_by_one_moves_a_fair_share_and_only_to_the_new_bucket(
    table: dict[int, list[int]], n: int
) -> None:
    before, after = table[n], table[n + 1]
    moved = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    assert all(b == n for _, b in moved), "an id moved between existing buckets"
    share = len(moved) / N_IDS
    assert abs(share - 1 / (n + 1)) < 0.01, f"{n}->{n + 1}: moved {share:.3f}"
