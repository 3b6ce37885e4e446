"""Which worker of a node owns an agent: computed, never looked up.

``owner_index(agent_id, n)`` is Lamport and Veach's jump consistent hash of a
64-bit BLAKE2b digest of the id over ``n`` workers: any process (client,
worker, control process) computes the same answer without a directory, the
spread is even, and going from ``n`` to ``n + 1`` workers moves only ``1/(n+1)``
of the agents.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

__all__ = ["jump_hash", "owner_index"]


def jump_hash(key: int, buckets: int) -> int:
    """Jump consistent hash: a bucket in ``range(buckets)`` for a 64-bit key."""
    if buckets < 1:
        raise ValueError(f"buckets must be >= 1, got {buckets}")
    b, j = -1, 0
    key &= 0xFFFFFFFFFFFFFFFF
    while j < buckets:
        b = j
        key = (key * 2862933555777941757 + 1) & 0xFFFFFFFFFFFFFFFF
        j = int((b + 1) * (float(1 << 31) / float((key >> 33) + 1)))
    return b


@lru_cache(maxsize=65536)
def _digest(agent_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(agent_id.encode(), digest_size=8).digest(), "little")


def owner_index(agent_id: str, workers: int) -> int:
    """The index of the worker that owns ``agent_id`` on a node of ``workers`` workers."""
    if workers == 1:
        return 0
    return jump_hash(_digest(agent_id), workers)
