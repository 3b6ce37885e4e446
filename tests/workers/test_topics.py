"""Topics (workers/topics.py): AMQP-style patterns, validation, and a trie-backed table
that must agree with the brute-force ``matches`` for any set of subscriptions."""

from __future__ import annotations

import re
import time
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.topics import (
    MAX_TOPIC_BYTES,
    InvalidTopicError,
    TopicTable,
    check_pattern,
    check_topic,
    matches,
)

# --- matching rules -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        ("a.b.c", "a.b.c", True),
        ("a.b.c", "a.b", False),
        ("a.b", "a.b.c", False),
        ("a.*.c", "a.x.c", True),
        ("a.*.c", "a.c", False),  # '*' never matches zero segments
        ("a.*", "a", False),
        ("*", "a", True),
        ("*", "a.b", False),
        ("*.*", "a.b", True),
        ("a.#", "a", True),  # '#' matches zero segments
        ("a.#", "a.b", True),
        ("a.#", "a.b.c.d", True),
        ("a.#", "b", False),
        ("a.#", "ab", False),
        ("#", "a", True),
        ("#", "x.y.z", True),
        ("*.#", "a", True),
        ("*.*.#", "a", False),
        ("a.*.#", "a.b", True),
        ("a.*.#", "a", False),
        ("orders.eu.created", "orders.eu.created", True),
        ("orders.*.created", "orders.us.created", True),
        ("orders.*.created", "orders.us.deleted", False),
    ],
)
def test_matches(pattern: str, topic: str, expected: bool) -> None:
    assert matches(pattern, topic) is expected
    table: TopicTable[int] = TopicTable()
    table.add(pattern, "s", 1)
    assert table.match(topic) == ([("s", 1)] if expected else [])


# --- validation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "topic",
    ["", ".", "a..b", ".a", "a.", "a.*", "*", "#", "a.#", "a*b", "x#", "\ud800", "a" * 256],
)
def test_invalid_topics_are_refused(topic: str) -> None:
    with pytest.raises(InvalidTopicError):
        check_topic(topic)
    with pytest.raises(ValueError):
        TopicTable().match(topic)


@pytest.mark.parametrize(
    "pattern", ["", "a..b", ".a", "a.", "a.#.b", "#.a", "#.#", "a*", "*a.b", "a.b#", "\ud800"]
)
def test_invalid_patterns_are_refused(pattern: str) -> None:
    with pytest.raises(InvalidTopicError):
        check_pattern(pattern)
    with pytest.raises(InvalidTopicError):
        TopicTable[int]().add(pattern, "s", 1)


def test_size_limit_counts_utf8_bytes() -> None:
    check_topic("a" * MAX_TOPIC_BYTES)
    with pytest.raises(InvalidTopicError, match="256 UTF-8 bytes"):
        check_topic("a" * (MAX_TOPIC_BYTES + 1))
    # 128 characters but 256 bytes.
    with pytest.raises(InvalidTopicError, match="UTF-8 bytes"):
        check_topic("é" * 128)
    assert check_topic("é" * 127) == ["é" * 127]


def test_valid_topic_and_pattern_segments() -> None:
    assert check_topic("orders.eu.created") == ["orders", "eu", "created"]
    assert check_pattern("orders.*.#") == ["orders", "*", "#"]
    assert check_pattern("#") == ["#"]


@pytest.mark.parametrize("bad", [None, 3, b"a.b", ["a"]])
def test_non_str_is_a_type_error(bad: object) -> None:
    with pytest.raises(TypeError, match="must be a str"):
        check_topic(bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be a str"):
        check_pattern(bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        TopicTable[int]().add("a", bad, 1)  # type: ignore[arg-type]


def test_empty_sub_id_is_refused() -> None:
    with pytest.raises(InvalidTopicError, match="sub_id"):
        TopicTable[int]().add("a", "", 1)


def test_cache_size_validated() -> None:
    with pytest.raises(ValueError, match="cache_size"):
        TopicTable(cache_size=-1)


# --- table operations ---------------------------------------------------------------


def test_add_remove_len_iter() -> None:
    table: TopicTable[str] = TopicTable()
    table.add("a.*", "s1", "v1")
    table.add("a.#", "s1", "v2")
    table.add("a.b", "s2", "v3")
    assert len(table) == 3
    assert sorted(table) == [("a.#", "s1", "v2"), ("a.*", "s1", "v1"), ("a.b", "s2", "v3")]
    # A subscriber with two matching patterns is reported once per pattern.
    assert sorted(table.match("a.b")) == [("s1", "v1"), ("s1", "v2"), ("s2", "v3")]

    table.add("a.*", "s1", "v1b")  # same pair: replaces the value
    assert len(table) == 3
    assert sorted(table.match("a.b")) == [("s1", "v1b"), ("s1", "v2"), ("s2", "v3")]

    assert table.remove("a.*", "s1") is True
    assert table.remove("a.*", "s1") is False
    assert table.remove("a.*", "nobody") is False
    assert sorted(table.match("a.b")) == [("s1", "v2"), ("s2", "v3")]
    assert table.remove_all("s1") == 1
    assert table.remove_all("s1") == 0
    assert table.match("a.b") == [("s2", "v3")]
    assert table.match("a") == []
    assert len(table) == 1


def test_iteration_is_a_snapshot() -> None:
    table: TopicTable[int] = TopicTable()
    for i in range(5):
        table.add(f"t.{i}", f"s{i}", i)
    for pattern, sub_id, _ in table:
        table.remove(pattern, sub_id)
    assert len(table) == 0
    assert list(table) == []


def test_removal_frees_trie_nodes() -> None:
    table: TopicTable[int] = TopicTable()
    for i in range(100):
        table.add(f"x.{i}.y.#", "s", i)
        table.add(f"x.{i}.*", "s", i)
    table.remove_all("s")
    assert table._root.empty()


def test_cache_is_invalidated_on_every_change() -> None:
    table: TopicTable[int] = TopicTable(cache_size=4)
    assert table.match("a.b") == []
    table.add("a.*", "s", 1)
    assert table.match("a.b") == [("s", 1)]
    result = table.match("a.b")
    result.append(("intruder", 0))  # the caller owns the list, not the cache
    assert table.match("a.b") == [("s", 1)]
    table.add("#", "t", 2)
    assert sorted(table.match("a.b")) == [("s", 1), ("t", 2)]
    table.remove("a.*", "s")
    assert table.match("a.b") == [("t", 2)]
    table.remove_all("t")
    assert table.match("a.b") == []


def test_cache_is_bounded_and_lru() -> None:
    table: TopicTable[int] = TopicTable(cache_size=2)
    table.add("#", "s", 1)
    for topic in ("a", "b", "a", "c"):
        table.match(topic)
    assert list(table._cache) == ["a", "c"]  # "b" was least recently used


def test_uncached_table_still_matches() -> None:
    table: TopicTable[int] = TopicTable(cache_size=0)
    table.add("a.#", "s", 1)
    assert table.match("a.b") == [("s", 1)]
    assert table.match("a.b") == [("s", 1)]


def test_many_subscriptions_match_without_scanning_them() -> None:
    """10k literal subscriptions, 10k distinct topics (no cache hit): a scan of every
    subscription per topic would be 10**8 comparisons and take minutes."""
    table: TopicTable[int] = TopicTable()
    for i in range(10_000):
        table.add(f"orders.region{i % 100}.n{i}", f"s{i}", i)
    table.add("orders.*.#", "all", -1)
    start = time.perf_counter()
    for i in range(10_000):
        found = table.match(f"orders.region{i % 100}.n{i}")
        assert sorted(found) == sorted([(f"s{i}", i), ("all", -1)])
    assert time.perf_counter() - start < 1.5


# --- trie == brute force ------------------------------------------------------------

_LITERALS = ["a", "b", "c"]
topics = st.lists(st.sampled_from(_LITERALS), min_size=1, max_size=5).map(".".join)
patterns = st.one_of(
    st.just("#"),
    st.tuples(
        st.lists(st.sampled_from([*_LITERALS, "*"]), min_size=1, max_size=4),
        st.booleans(),
    ).map(lambda t: ".".join(t[0] + (["#"] if t[1] else []))),
)
subscriptions = st.lists(
    st.tuples(patterns, st.sampled_from(["s1", "s2", "s3", "s4"]), st.integers(0, 9)),
    max_size=40,
)


def regex_matches(pattern: str, topic: str) -> bool:
    """An independent reference: the pattern translated to a regular expression."""
    if pattern == "#":
        return True
    body, rest = (pattern[:-2], True) if pattern.endswith(".#") else (pattern, False)
    regex = r"\.".join("[^.]+" if seg == "*" else re.escape(seg) for seg in body.split("."))
    return re.fullmatch(regex + (r"(\.[^.]+)*" if rest else ""), topic) is not None


@settings(max_examples=300, deadline=None)
@given(pattern=patterns, topic=topics)
def test_matches_agrees_with_regex(pattern: str, topic: str) -> None:
    assert matches(pattern, topic) is regex_matches(pattern, topic)


@settings(max_examples=300, deadline=None)
@given(
    subs=subscriptions,
    removals=st.lists(st.integers(0, 39), max_size=10),
    probes=st.lists(topics, min_size=1, max_size=10),
)
def test_trie_agrees_with_brute_force(
    subs: list[tuple[str, str, int]], removals: list[int], probes: list[str]
) -> None:
    table: TopicTable[int] = TopicTable(cache_size=3)
    reference: dict[tuple[str, str], int] = {}
    for pattern, sub_id, value in subs:
        table.add(pattern, sub_id, value)
        reference[pattern, sub_id] = value
        table.match(probes[0])  # warm the cache between changes: it must be invalidated
    keys = list(reference)
    for r in removals:
        if keys and r < len(keys):
            pattern, sub_id = keys[r]
            assert table.remove(pattern, sub_id) is ((pattern, sub_id) in reference)
            reference.pop((pattern, sub_id), None)
    assert len(table) == len(reference)
    assert sorted(table) == sorted((p, s, v) for (p, s), v in reference.items())
    for topic in probes:
        expected = Counter(
            (sub_id, value)
            for (pattern, sub_id), value in reference.items()
            if matches(pattern, topic)
        )
        assert Counter(table.match(topic)) == expected
        assert Counter(table.match(topic)) == expected  # the cached answer too
