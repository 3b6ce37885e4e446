"""The corr id ranges of the control process's own requesters."""

from __future__ import annotations

import itertools

from ipc.protocol import encode_reply, encode_request
from phoenix_node.cluster._corr import (
    HANDOFF,
    MIGRATION,
    REGISTRY,
    REPLICATOR,
    CorrIds,
    reply_corr,
)


def test_ranges_are_disjoint_and_ids_wrap_within_their_range() -> None:
    spans = [REPLICATOR, REGISTRY, MIGRATION, HANDOFF]
    for (_, end), (base, _) in itertools.pairwise(spans):
        assert end <= base
    ids = CorrIds((10, 13))
    assert [ids.next() for _ in range(5)] == [10, 11, 12, 10, 11]
    assert ids.owns(12) and not ids.owns(13) and not ids.owns(9)


def test_reply_corr_reads_replies_to_this_process_only() -> None:
    assert reply_corr([b"", encode_reply(1 << 61, 0), b""]) == 1 << 61
    assert reply_corr([b"", b"junk", b""]) is None
    assert reply_corr([b"", encode_request(5, 7, "A/b", "x"), b""]) is None
    assert reply_corr([b"client", b"", encode_reply(3, 0), b""]) is None
