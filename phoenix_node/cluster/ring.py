"""The consistent hash ring that places agents on nodes.

Every node computes the same ring from the same member set, so the hashing below is a
contract between nodes (and between versions); change it only with a new wire ``v``.

Hash space: the integers ``0 .. 2**64 - 1``, read clockwise and wrapping to 0.

- Key position: ``key_hash(key)`` = ``blake2b(key.encode("utf-8"), digest_size=8)``
  (no key, salt or person), its 8 digest bytes read as a big-endian unsigned integer.
- Tokens: a member ``name`` with weight ``w`` has ``max(1, round(vnodes * w))`` tokens
  (Python's ``round``: half to even), token ``i`` (``i = 0, 1, ...``) at the position of
  ``f"{name}\\x00{i}"`` hashed as a key (``i`` in decimal, no padding). Raising a weight
  only adds tokens, so it moves keys only onto that member.
- Owner: the member of the first token at or after the key's position (wrapping past
  ``2**64 - 1`` to the lowest token). Tokens are ordered by ``(position, name)``; at a
  position shared by two tokens the one with the smaller name (code point order) wins.
  So a token owns the half-open range ``(previous token, token]``.
- Preference list for ``n``: the first ``n`` distinct members met walking clockwise from
  the key's owner token, owner first. Entries after the first hold the replicas; when
  the owner leaves, entry 2 becomes the owner of the keys the owner had.

Members are node *names* (addresses such as ``tcp://10.0.0.1:7000``), never an
incarnation: a restarted node must get its ranges back. Wire form (:meth:`Ring.to_wire`),
msgpack-able: ``{"v": 1, "vnodes": int, "members": {name: float weight}}``, names sorted.
Limits: names of 1..1024 characters without NUL, weights finite in ``(0, 1000]``,
``vnodes`` in ``1..4096``, at most 10 000 members and 2**21 tokens in all.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping
from hashlib import blake2b
from types import MappingProxyType
from typing import Any

__all__ = ["EmptyRingError", "Ring", "key_hash", "moved"]

HASH_SPACE = 2**64
MAX_NAME_LEN = 1024
MAX_WEIGHT = 1000.0
MAX_VNODES = 4096
MAX_MEMBERS = 10_000
MAX_TOKENS = 2**21
WIRE_VERSION = 1
_EMPTY: Mapping[str, float] = MappingProxyType({})
_from_bytes = int.from_bytes


class EmptyRingError(ValueError):
    """The ring has no members, so no key has an owner."""


def key_hash(key: str) -> int:
    """The 64-bit ring position of ``key`` (see the module docstring)."""
    if not isinstance(key, str):
        raise TypeError(f"ring key must be a str, not {type(key).__name__}")
    try:
        return _from_bytes(blake2b(key.encode(), digest_size=8).digest(), "big")
    except UnicodeEncodeError as exc:
        raise ValueError(f"ring key {key!r:.80} is not encodable as UTF-8") from exc


def _check_name(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"ring member name must be a str, not {type(name).__name__}")
    if not 1 <= len(name) <= MAX_NAME_LEN or "\x00" in name:
        raise ValueError(f"ring member name needs 1..{MAX_NAME_LEN} chars, no NUL: {name!r:.80}")
    key_hash(name)  # rejects lone surrogates, which cannot be hashed
    return str(name)


def _check_weight(name: str, weight: object) -> float:
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        raise TypeError(f"weight of {name!r} must be a number, not {type(weight).__name__}")
    try:
        value = float(weight)
    except OverflowError:  # an int past the float range
        value = math.inf
    if not (math.isfinite(value) and 0.0 < value <= MAX_WEIGHT):
        raise ValueError(f"weight of {name!r} must be finite and in (0, {MAX_WEIGHT}]: {value}")
    return value


def _check_vnodes(vnodes: object) -> int:
    if isinstance(vnodes, bool) or not isinstance(vnodes, int):
        raise TypeError(f"vnodes must be an int, not {type(vnodes).__name__}")
    if not 1 <= vnodes <= MAX_VNODES:
        raise ValueError(f"vnodes must be in 1..{MAX_VNODES}: {vnodes}")
    return int(vnodes)


def _token_count(vnodes: int, weight: float) -> int:
    return max(1, round(vnodes * weight))


def _points(name: str, weight: float, vnodes: int) -> list[tuple[int, str]]:
    count = _token_count(vnodes, weight)
    digests = [blake2b(f"{name}\x00{i}".encode(), digest_size=8).digest() for i in range(count)]
    return [(_from_bytes(d, "big"), name) for d in digests]


class Ring:
    """An immutable consistent hash ring; ``with_member`` / ``without_member`` make new ones.

    Preference lists are computed per token on first use and kept (they never go stale).
    """

    __slots__ = ("_members", "_owners", "_prefs", "_tokens", "_vnodes")

    def __init__(self, members: Mapping[str, float] = _EMPTY, *, vnodes: int = 128) -> None:
        self._vnodes = _check_vnodes(vnodes)
        if not isinstance(members, Mapping):
            raise TypeError(f"members must be a mapping, not {type(members).__name__}")
        if len(members) > MAX_MEMBERS:  # before walking a hostile giant mapping
            raise ValueError(f"a ring holds at most {MAX_MEMBERS} members: {len(members)}")
        checked: dict[str, float] = {}
        for name, weight in members.items():
            name = _check_name(name)
            checked[name] = _check_weight(name, weight)
        self._check_size(checked)
        self._set(checked, [p for n, w in checked.items() for p in _points(n, w, self._vnodes)])

    def _check_size(self, members: Mapping[str, float]) -> None:
        if len(members) > MAX_MEMBERS:
            raise ValueError(f"a ring holds at most {MAX_MEMBERS} members: {len(members)}")
        total = sum(_token_count(self._vnodes, w) for w in members.values())
        if total > MAX_TOKENS:
            raise ValueError(f"ring would have {total} tokens, more than the limit {MAX_TOKENS}")

    def _set(self, members: Mapping[str, float], points: Iterable[tuple[int, str]]) -> Ring:
        # Sort (token, name) as one int, token << 14 | name rank: ints sort far faster.
        names = sorted(members)
        rank = {name: i for i, name in enumerate(names)}
        packed = sorted(t << 14 | rank[n] for t, n in points)
        self._members = MappingProxyType({name: members[name] for name in names})
        self._tokens = [p >> 14 for p in packed]
        self._owners = [names[p & 0x3FFF] for p in packed]
        self._prefs: dict[int, tuple[str, ...]] = {}
        return self

    def _derive(self, members: dict[str, float], name: str) -> Ring:
        """A ring of ``members`` that reuses our tokens; only ``name``'s are (re)hashed."""
        points = [(t, n) for t, n in zip(self._tokens, self._owners, strict=True) if n != name]
        if name in members:
            points += _points(name, members[name], self._vnodes)
        ring = Ring.__new__(Ring)
        ring._vnodes = self._vnodes
        return ring._set(members, points)

    @property
    def members(self) -> Mapping[str, float]:
        """Read-only mapping name -> weight, sorted by name."""
        return self._members

    @property
    def vnodes(self) -> int:
        return self._vnodes

    def with_member(self, name: str, weight: float = 1.0) -> Ring:
        """A ring with ``name`` added, or with its weight changed. Only its points are hashed."""
        name = _check_name(name)
        weight = _check_weight(name, weight)
        if self._members.get(name) == weight:
            return self
        members = {**self._members, name: weight}
        self._check_size(members)
        return self._derive(members, name)

    def without_member(self, name: str) -> Ring:
        """A ring without ``name``; ``ValueError`` if it is not a member."""
        if name not in self:
            raise ValueError(f"{name!r} is not a member of the ring")
        return self._derive({n: w for n, w in self._members.items() if n != name}, name)

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._members

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Ring):
            return NotImplemented
        return self._vnodes == other._vnodes and self._members == other._members

    def __hash__(self) -> int:
        return hash((self._vnodes, tuple(self._members.items())))

    def __repr__(self) -> str:
        return f"Ring({dict(self._members)!r}, vnodes={self._vnodes})"

    def owner(self, key: str) -> str:
        """The member that owns ``key``. The routing hot path: one blake2b, one bisect."""
        try:
            h = _from_bytes(blake2b(key.encode(), digest_size=8).digest(), "big")
        except (AttributeError, UnicodeEncodeError):
            h = key_hash(key)  # raises the clear TypeError / ValueError
        try:
            return self._owners[bisect_left(self._tokens, h)]
        except IndexError:  # past the last token: wrap around to the first
            if self._owners:
                return self._owners[0]
            raise EmptyRingError("the ring has no members") from None

    def owner_of_hash(self, h: int) -> str:
        """The member that owns ring position ``h`` (``0 <= h < 2**64``)."""
        return self._owners[self._index(h)]

    def preference(self, key: str, n: int) -> list[str]:
        """The first ``n`` distinct members clockwise from ``key``, owner first (fewer if
        the ring has fewer members)."""
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"preference length must be an int, not {type(n).__name__}")
        if n < 1:
            raise ValueError(f"preference length must be at least 1: {n}")
        i = self._index(key_hash(key))
        want = min(n, len(self._members))
        found = self._prefs.get(i)
        if found is None or len(found) < want:
            found = self._prefs[i] = self._walk(i, want)
        return list(found[:want])

    def _index(self, h: int) -> int:
        if isinstance(h, bool) or not isinstance(h, int):
            raise TypeError(f"ring position must be an int, not {type(h).__name__}")
        if not 0 <= h < HASH_SPACE:
            raise ValueError(f"ring position must be in 0..2**64-1: {h}")
        if not self._tokens:
            raise EmptyRingError("the ring has no members")
        return bisect_left(self._tokens, h) % len(self._tokens)  # past the last: wrap

    def _walk(self, start: int, want: int) -> tuple[str, ...]:
        owners, count = self._owners, len(self._owners)
        found: dict[str, None] = {}  # insertion-ordered set
        for step in range(count):
            found[owners[(start + step) % count]] = None
            if len(found) == want:
                break
        return tuple(found)

    def _widths(self) -> Iterator[tuple[int, int, str]]:
        """``(start, end, owner)`` of each non-empty token range; the wrapping one in two."""
        tokens, owners = self._tokens, self._owners
        if not tokens:
            return
        if tokens[-1] < HASH_SPACE - 1:
            yield tokens[-1], HASH_SPACE - 1, owners[0]
        yield -1, tokens[0], owners[0]
        for i in range(1, len(tokens)):
            if tokens[i] != tokens[i - 1]:
                yield tokens[i - 1], tokens[i], owners[i]

    def shares(self) -> dict[str, float]:
        """Fraction of the hash space each member owns as primary (the values sum to 1)."""
        sizes = dict.fromkeys(self._members, 0)
        for start, end, name in self._widths():
            sizes[name] += end - start
        return {name: size / HASH_SPACE for name, size in sizes.items()}

    def ranges(self, name: str) -> list[tuple[int, int]]:
        """The primary ranges of ``name``, sorted and merged, as ``(start, end]`` pairs:
        position ``h`` is in a range iff ``start < h <= end``. A range that begins at
        position 0 has ``start == -1``; none wraps."""
        if name not in self:
            raise ValueError(f"{name!r} is not a member of the ring")
        merged: list[tuple[int, int]] = []
        for start, end in sorted((s, e) for s, e, n in self._widths() if n == name):
            if merged and merged[-1][1] == start:
                merged[-1] = (merged[-1][0], end)
            else:
                merged.append((start, end))
        return merged

    def to_wire(self) -> dict[str, Any]:
        """The msgpack-able form (see the module docstring)."""
        return {"v": WIRE_VERSION, "vnodes": self._vnodes, "members": dict(self._members)}

    @classmethod
    def from_wire(cls, raw: object) -> Ring:
        """Rebuild a ring from :meth:`to_wire` output; any defect raises ``ValueError``."""
        if not isinstance(raw, dict):
            raise ValueError(f"ring wire data must be a map, not {type(raw).__name__}")
        if set(raw) != {"v", "vnodes", "members"}:
            raise ValueError(f"ring wire keys must be v, vnodes, members: {list(raw)!r:.200}")
        if type(raw["v"]) is not int or raw["v"] != WIRE_VERSION:
            raise ValueError(f"unsupported ring wire version: {raw['v']!r:.40}")
        try:
            return cls(raw["members"], vnodes=raw["vnodes"])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"bad ring wire data: {exc}") from None


def moved(old: Ring, new: Ring, keys: Iterable[str]) -> float:
    """The fraction of ``keys`` whose owner differs from ``old`` to ``new`` (0.0 if none)."""
    if not isinstance(old, Ring) or not isinstance(new, Ring):
        raise TypeError("moved() compares two Ring objects")
    changed = [old.owner(key) != new.owner(key) for key in keys]
    return sum(changed) / len(changed) if changed else 0.0
