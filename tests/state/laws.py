"""Generic property tests of the CRDT contract, shared by every type's test module.

A type's test module describes itself with a :class:`Spec` (how to draw an
operation, how to apply it as a given replica) and calls :func:`law_tests`,
which returns test functions for the module's namespace:

- merge is commutative, associative and idempotent, and changes neither input;
- every mutator's delta, merged into the state before the mutation, gives the
  state after it (delta-state equivalence);
- N replicas fed every delta and state in any order, with duplicates, converge
  to the join of all replicas;
- ``decode(encode(x)) == x`` and equal states give equal bytes;
- ``decode`` of random or corrupted bytes raises only ``DecodeError``.

States are drawn as *systems*: several replicas that apply random operations
and merge each other's states at random, which is how real concurrent states
arise (states of unrelated systems could reuse dots and are not reachable).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from phoenix_node.state import CRDT, DecodeError
from phoenix_node.state._codec import pack

REPLICAS = ("node-a#1", "node-b#1", "node-c#2")

Apply = Callable[[Any, str, Any], Any]


@dataclass
class Spec:
    cls: type[CRDT]
    ops: st.SearchStrategy[Any]
    apply: Apply
    #: other CRDT types whose encodings must be refused by ``cls.decode``
    others: list[CRDT] = field(default_factory=list)
    max_steps: int = 25


@dataclass
class System:
    replicas: list[Any]
    deltas: list[Any]

    def join(self) -> Any:
        result = self.replicas[0].copy()
        for r in self.replicas[1:]:
            result = result.merge(r)
        return result


def systems(spec: Spec) -> st.SearchStrategy[System]:
    step = st.one_of(
        st.tuples(st.just("op"), st.integers(0, len(REPLICAS) - 1), spec.ops),
        st.tuples(
            st.just("merge"), st.integers(0, len(REPLICAS) - 1), st.integers(0, len(REPLICAS) - 1)
        ),
    )

    @st.composite
    def build(draw: Any) -> System:
        replicas = [spec.cls() for _ in REPLICAS]
        deltas: list[Any] = []
        for kind, i, arg in draw(st.lists(step, max_size=spec.max_steps)):
            if kind == "merge":
                replicas[i] = replicas[i].merge(replicas[arg])
                continue
            before = replicas[i].copy()
            try:
                delta = spec.apply(replicas[i], REPLICAS[i], arg)
            except _Skip:
                continue
            assert isinstance(delta, spec.cls), f"mutator returned {type(delta).__name__}"
            # delta-state equivalence: the mutation equals a join with its delta
            assert before.merge(delta) == replicas[i], (before, delta, replicas[i])
            deltas.append(delta.copy())
        return System(replicas, deltas)

    return build()


class _Skip(Exception):
    """Raised by an ``apply`` for an operation that does not apply to this state."""


Skip = _Skip

_SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def law_tests(spec: Spec) -> dict[str, Callable[..., None]]:
    sys_st = systems(spec)

    @_SETTINGS
    @given(sys_st)
    def test_merge_is_commutative_associative_idempotent(system: System) -> None:
        a, b, c = system.replicas
        snapshot = [x.encode() for x in (a, b, c)]
        assert a.merge(b) == b.merge(a)
        assert a.merge(b).encode() == b.merge(a).encode()
        assert a.merge(b).merge(c) == a.merge(b.merge(c))
        assert a.merge(a) == a
        assert [x.encode() for x in (a, b, c)] == snapshot, "merge changed an input"

    @_SETTINGS
    @given(sys_st, st.randoms(use_true_random=False))
    def test_replicas_converge_under_any_delivery_order(system: System, rnd: Any) -> None:
        target = system.join()
        for _ in range(3):
            items = [d.copy() for d in system.deltas] + [r.copy() for r in system.replicas]
            items += [rnd.choice(items).copy() for _ in range(len(items) // 2)]  # duplicates
            rnd.shuffle(items)
            replica = spec.cls()
            for item in items:
                replica.merge_in(item)
            assert replica == target
            assert replica.value == target.value or _value_is_clock_dependent(spec)
        # deltas alone carry everything the replicas did
        from_deltas = spec.cls()
        for d in system.deltas:
            from_deltas = from_deltas.merge(d)
        assert from_deltas == target

    @_SETTINGS
    @given(sys_st)
    def test_encode_decode_round_trip(system: System) -> None:
        for x in (*system.replicas, *system.deltas, system.join()):
            data = x.encode()
            assert x._body_bytes() == pack(x._body()), "byte fast path differs from the body"
            y = spec.cls.decode(data)
            assert y == x
            assert y.encode() == data
            assert y.value == x.value or _value_is_clock_dependent(spec)

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=200))
    def test_decode_random_bytes_raises_only_decode_error(data: bytes) -> None:
        try:
            spec.cls.decode(data)
        except DecodeError:
            pass

    @_SETTINGS
    @given(sys_st, st.data())
    def test_decode_corrupted_encodings_raises_only_decode_error(system: System, data: Any) -> None:
        encoded = bytearray(system.join().encode())
        cut = data.draw(st.integers(0, len(encoded)))
        for corrupt in (bytes(encoded[:cut]), bytes(encoded) + b"\x00", _flip(encoded, data)):
            try:
                spec.cls.decode(corrupt)
            except DecodeError:
                pass

    def test_decode_refuses_other_types_and_versions() -> None:
        for other in spec.others:
            try:
                spec.cls.decode(other.encode())
            except DecodeError:
                continue
            raise AssertionError(f"{spec.cls.__name__} decoded a {type(other).__name__}")
        empty = spec.cls().to_wire()
        from phoenix_node.state._codec import pack

        for bad in (
            [empty[0], empty[1] + 1, empty[2]],
            [empty[0] + 100, 1, empty[2]],
            empty[:2],
            "x",
            None,
            {"a": 1},
        ):
            try:
                spec.cls.decode(pack(bad))
            except DecodeError:
                continue
            raise AssertionError(f"{spec.cls.__name__} decoded {bad!r}")

    def test_constructed_empty_with_no_arguments() -> None:
        empty = spec.cls()
        assert spec.cls.decode(empty.encode()) == empty

    return {name: fn for name, fn in locals().items() if name.startswith("test_")}


def _flip(encoded: bytearray, data: Any) -> bytes:
    if not encoded:
        return b""
    flipped = bytearray(encoded)
    i = data.draw(st.integers(0, len(flipped) - 1))
    flipped[i] = data.draw(st.integers(0, 255))
    return bytes(flipped)


def _value_is_clock_dependent(spec: Spec) -> bool:
    return getattr(spec.cls, "VALUE_DEPENDS_ON_CLOCK", False)
