"""Publish/subscribe topics: names, patterns and a subscription table.

A *topic* is a dot-separated name such as ``orders.eu.created``: a non-empty
``str`` of at most :data:`MAX_TOPIC_BYTES` UTF-8 bytes, no empty segment
(``a..b``, ``.a`` and ``a.`` are refused), and no ``*`` or ``#`` anywhere, so a
published topic can never be mistaken for a pattern.

A *pattern* follows the AMQP topic-exchange rules, restricted so that matching
stays linear: a segment may be exactly ``*`` (one segment, never zero) or, as
the last segment only, ``#`` (zero or more segments). ``a.#`` therefore matches
``a``, ``a.b`` and ``a.b.c``; ``a.*`` matches ``a.b`` but not ``a``; ``#`` alone
matches every topic. ``*`` and ``#`` inside a longer segment (``a*``, ``#b``)
are refused rather than taken literally, as are ``#`` segments before the last.

Validation errors are :class:`InvalidTopicError` (a ``ValueError``); a topic or
pattern that is not a ``str`` gets a ``TypeError``.

:class:`TopicTable` stores subscriptions in a trie over segments, so matching a
topic costs O(number of segments x branching on ``*``) whatever the number of
subscriptions, plus a small LRU cache of recent topics (publishers reuse the
same topics) that any change to the table clears.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Generic, TypeVar

from ._errors import AgentError

__all__ = [
    "MAX_TOPIC_BYTES",
    "InvalidTopicError",
    "TopicTable",
    "check_pattern",
    "check_topic",
    "matches",
]

MAX_TOPIC_BYTES = 255
_WILD = ("*", "#")

V = TypeVar("V")


class InvalidTopicError(AgentError, ValueError):
    """A topic, pattern or subscription id is malformed; the message says why."""


def _segments(text: object, what: str) -> list[str]:
    """Split ``text`` after the checks shared by topics and patterns."""
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, got {type(text).__name__}")
    if not text:
        raise InvalidTopicError(f"{what} must not be empty")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidTopicError(f"{what} {text!r} is not valid UTF-8 text") from None
    if size > MAX_TOPIC_BYTES:
        raise InvalidTopicError(f"{what} is {size} UTF-8 bytes, more than {MAX_TOPIC_BYTES}")
    segments = text.split(".")
    if "" in segments:
        raise InvalidTopicError(f"{what} {text!r} has an empty segment")
    return segments


def check_topic(topic: str) -> list[str]:
    """Validate a published topic; returns its segments."""
    segments = _segments(topic, "topic")
    if "*" in topic or "#" in topic:
        raise InvalidTopicError(f"topic {topic!r} contains a wildcard ('*' or '#')")
    return segments


def check_pattern(pattern: str) -> list[str]:
    """Validate a subscription pattern; returns its segments."""
    segments = _segments(pattern, "pattern")
    last = len(segments) - 1
    for i, seg in enumerate(segments):
        if seg in _WILD:
            if seg == "#" and i != last:
                raise InvalidTopicError(
                    f"pattern {pattern!r}: '#' is only allowed as the last segment"
                )
        elif "*" in seg or "#" in seg:
            raise InvalidTopicError(
                f"pattern {pattern!r}: segment {seg!r} mixes a wildcard with other characters"
            )
    return segments


def _segments_match(pattern: list[str], topic: list[str]) -> bool:
    if pattern[-1] == "#":
        pattern = pattern[:-1]
        if len(topic) < len(pattern):
            return False
        topic = topic[: len(pattern)]
    elif len(topic) != len(pattern):
        return False
    return all(p in ("*", t) for p, t in zip(pattern, topic, strict=True))


def matches(pattern: str, topic: str) -> bool:
    """Whether ``topic`` matches ``pattern`` (both validated)."""
    return _segments_match(check_pattern(pattern), check_topic(topic))


def _check_sub_id(sub_id: object) -> str:
    if not isinstance(sub_id, str):
        raise TypeError(f"sub_id must be a str, got {type(sub_id).__name__}")
    if not sub_id:
        raise InvalidTopicError("sub_id must not be empty")
    return sub_id


class _Node(Generic[V]):
    """One trie node: the pattern prefix spelled by the path from the root."""

    __slots__ = ("children", "exact", "rest")

    def __init__(self) -> None:
        self.children: dict[str, _Node[V]] = {}  # literal segments and "*"
        self.exact: dict[str, V] = {}  # sub_id -> value, pattern ends here
        self.rest: dict[str, V] = {}  # sub_id -> value, pattern is this prefix + "#"

    def empty(self) -> bool:
        return not (self.children or self.exact or self.rest)


class TopicTable(Generic[V]):
    """Subscriptions ``(pattern, sub_id) -> value``, matched against published topics.

    A subscription is the pair ``(pattern, sub_id)``: one subscriber may hold
    several patterns, and :meth:`match` returns its ``(sub_id, value)`` once per
    matching pattern (the caller dedups if it wants one delivery per
    subscriber). Adding an existing pair replaces its value. Not thread-safe:
    each worker owns its table.
    """

    __slots__ = ("_by_sub", "_cache", "_cache_size", "_root")

    def __init__(self, cache_size: int = 1024) -> None:
        if not isinstance(cache_size, int) or cache_size < 0:
            raise ValueError(f"cache_size must be an int >= 0, got {cache_size!r}")
        self._root: _Node[V] = _Node()
        self._by_sub: dict[str, dict[str, V]] = {}  # sub_id -> {pattern: value}
        self._cache: OrderedDict[str, tuple[tuple[str, V], ...]] = OrderedDict()
        self._cache_size = cache_size

    def __len__(self) -> int:
        return sum(len(patterns) for patterns in self._by_sub.values())

    def __iter__(self) -> Iterator[tuple[str, str, V]]:
        """``(pattern, sub_id, value)`` of a snapshot: the table may change meanwhile."""
        snapshot = [
            (pattern, sub_id, value)
            for sub_id, patterns in self._by_sub.items()
            for pattern, value in patterns.items()
        ]
        return iter(snapshot)

    def add(self, pattern: str, sub_id: str, value: V) -> None:
        """Subscribe ``sub_id`` to ``pattern`` (replacing the value of an existing pair)."""
        segments = check_pattern(pattern)
        _check_sub_id(sub_id)
        node = self._root
        rest = segments[-1] == "#"
        for seg in segments[:-1] if rest else segments:
            node = node.children.setdefault(seg, _Node())
        (node.rest if rest else node.exact)[sub_id] = value
        self._by_sub.setdefault(sub_id, {})[pattern] = value
        self._cache.clear()

    def remove(self, pattern: str, sub_id: str) -> bool:
        """Unsubscribe one pair; False if it was not subscribed."""
        segments = check_pattern(pattern)
        _check_sub_id(sub_id)
        patterns = self._by_sub.get(sub_id)
        if patterns is None or pattern not in patterns:
            return False
        del patterns[pattern]
        if not patterns:
            del self._by_sub[sub_id]
        self._unlink(segments, sub_id)
        self._cache.clear()
        return True

    def remove_all(self, sub_id: str) -> int:
        """Unsubscribe every pattern of ``sub_id``; returns how many were removed."""
        _check_sub_id(sub_id)
        patterns = self._by_sub.pop(sub_id, {})
        for pattern in patterns:
            self._unlink(pattern.split("."), sub_id)
        if patterns:
            self._cache.clear()
        return len(patterns)

    def _unlink(self, segments: list[str], sub_id: str) -> None:
        """Delete the entry and then every node left empty, so churn does not leak nodes."""
        rest = segments[-1] == "#"
        path = segments[:-1] if rest else segments
        nodes = [self._root]
        for seg in path:
            nodes.append(nodes[-1].children[seg])
        del (nodes[-1].rest if rest else nodes[-1].exact)[sub_id]
        for depth in range(len(path), 0, -1):
            if not nodes[depth].empty():
                break
            del nodes[depth - 1].children[path[depth - 1]]

    def match(self, topic: str) -> list[tuple[str, V]]:
        """``(sub_id, value)`` of every subscription whose pattern matches ``topic``.

        Order is unspecified. The list is the caller's to keep or change.
        """
        cached = self._cache.get(topic)
        if cached is not None:
            self._cache.move_to_end(topic)
            return list(cached)
        found = self._walk(check_topic(topic))
        if self._cache_size:
            self._cache[topic] = tuple(found)
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return found

    def _walk(self, segments: list[str]) -> list[tuple[str, V]]:
        # Each trie node spells one pattern prefix, so it is reached at most once per
        # topic (at depth == its prefix length): no subscription is reported twice.
        found: list[tuple[str, V]] = []
        end = len(segments)
        stack: list[tuple[_Node[V], int]] = [(self._root, 0)]
        while stack:
            node, i = stack.pop()
            found.extend(node.rest.items())  # "#" matches the remaining i..end, even none
            if i == end:
                found.extend(node.exact.items())
                continue
            child = node.children.get(segments[i])
            if child is not None:
                stack.append((child, i + 1))
            star = node.children.get("*")
            if star is not None:
                stack.append((star, i + 1))
        return found
