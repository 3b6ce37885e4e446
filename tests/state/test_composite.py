from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phoenix_node.state import (
    AgentState,
    DecodeError,
    GCounter,
    InvalidValueError,
    LWWMap,
    ORSet,
    PNCounter,
    StateSchema,
    TypeMismatchError,
)
from phoenix_node.state._codec import pack
from phoenix_node.state.composite import COMPOSITE_CODE, COMPOSITE_VERSION


class Page:
    hits = GCounter()
    tags = ORSet()
    config = LWWMap()


SCHEMA = StateSchema.from_class(Page)


def _generic_encoding(state: AgentState) -> bytes:
    """The record as the nested lists of the documented format, packed in one go."""
    fields = {name: state[name].to_wire() for name in state}
    fields.update({name: value.to_wire() for name, value in state._extra.items()})
    return pack([COMPOSITE_CODE, COMPOSITE_VERSION, [[k, fields[k]] for k in sorted(fields)]])


def test_schema_collects_the_declared_fields_in_name_order() -> None:
    assert list(SCHEMA.fields) == ["config", "hits", "tags"]
    assert SCHEMA.fields["hits"] is GCounter


def test_declarations_must_be_empty_templates() -> None:
    class Bad:
        hits = GCounter()

    Bad.hits.increment("a#1")
    with pytest.raises(InvalidValueError, match="declare state fields empty"):
        StateSchema.from_class(Bad)


def test_each_state_gets_its_own_values() -> None:
    a, b = SCHEMA.new_state(), SCHEMA.new_state()
    a["hits"].increment("r#1", 3)
    assert a.value["hits"] == 3 and b.value["hits"] == 0
    assert Page.hits.value == 0  # the template is untouched


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["hits", "tags", "config"]), st.integers(0, 5)), max_size=20)
)
def test_encoding_is_the_documented_format_and_round_trips(ops: list[tuple[str, int]]) -> None:
    state = SCHEMA.new_state()
    for name, n in ops:
        if name == "hits":
            state["hits"].increment("r#1", n)
        elif name == "tags":
            state["tags"].add("r#1", f"t{n}")
        else:
            state["config"].put("r#1", f"k{n}", n)
    data = state.encode()
    assert data == _generic_encoding(state)
    again = SCHEMA.decode(data)
    assert again == state and again.value == state.value


def test_load_gives_the_stored_state_or_a_fresh_one() -> None:
    assert SCHEMA.load(None) == SCHEMA.new_state()
    state = SCHEMA.new_state()
    state["hits"].increment("r#1", 2)
    assert SCHEMA.load(state.encode()).value["hits"] == 2
    with pytest.raises(DecodeError):
        SCHEMA.load(b"\x00")


def test_dirty_flag_and_deltas() -> None:
    state = SCHEMA.new_state()
    assert not state.dirty and state.take_delta() is None
    state["hits"].increment("r#1", 2)
    state["hits"].increment("r#2", 5)
    state["tags"].add("r#1", "x")
    assert state.dirty
    delta = state.take_delta()
    assert delta is not None and delta.value["hits"] == 7 and delta.value["tags"] == {"x"}
    assert state.take_delta() is None  # reset
    other = SCHEMA.new_state()
    other.merge_in(delta)
    assert other == state
    state.mark_clean()
    assert not state.dirty


def _apply(state: AgentState, op: tuple[str, int]) -> None:
    name, n = op
    if name == "hits":
        state["hits"].increment("r#1", n)
    elif name == "tags":
        state["tags"].add("r#1", f"t{n % 4}")
    elif name == "untag":
        state["tags"].remove(f"t{n % 4}")
    else:
        state["config"].put("r#1", f"k{n % 4}", n)


@pytest.mark.timeout(30)
def test_a_delta_of_some_fields_encodes_as_a_record_of_those_fields() -> None:
    state = SCHEMA.new_state()
    state["config"].put("r#1", "big", "x" * 100)
    state.take_delta()
    state["hits"].increment("r#1", 3)
    delta = state.take_delta()
    assert delta is not None and list(delta) == ["hits"]
    data = delta.encode()
    assert data == _generic_encoding(delta)  # canonical, the one changed field alone
    assert len(data) < len(state.encode()) - 100
    decoded = SCHEMA.decode(data)  # the other fields start empty
    assert decoded.value == {"config": {}, "hits": 3, "tags": frozenset()}


@pytest.mark.timeout(30)
def test_a_delta_of_every_field_keeps_the_schema_order_whatever_the_mutation_order() -> None:
    state = SCHEMA.new_state()
    state["tags"].add("r#1", "x")  # mutated in an order unlike the field order
    state["config"].put("r#1", "k", 1)
    state["hits"].increment("r#1", 2)
    delta = state.take_delta()
    assert delta is not None and list(delta) == ["config", "hits", "tags"]
    assert delta.encode() == _generic_encoding(delta)
    assert SCHEMA.decode(delta.encode()) == state


@pytest.mark.timeout(60)
@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.lists(
            st.tuples(st.sampled_from(["hits", "tags", "untag", "config"]), st.integers(0, 9)),
            max_size=6,
        ),
        max_size=8,
    )
)
def test_decoded_deltas_merged_into_a_full_state_give_the_owners_state(
    rounds: list[list[tuple[str, int]]],
) -> None:
    """The replica holds the owner's state as of some earlier point; merging the decoded
    encodings of the deltas taken since (each round's, or their join) is the owner's."""
    owner = SCHEMA.new_state()
    replica = SCHEMA.new_state()
    joined: AgentState | None = None
    for ops in rounds:
        for op in ops:
            _apply(owner, op)
        delta = owner.take_delta()
        if delta is None:
            continue
        replica.merge_in(SCHEMA.decode(delta.encode(), track_deltas=False))
        if joined is None:
            joined = SCHEMA.decode(delta.encode(), track_deltas=False)
        else:  # the join of logged deltas, as a worker keeps it between shipments
            joined.merge_in(SCHEMA.decode(delta.encode(), track_deltas=False))
            joined = SCHEMA.decode(joined.encode(), track_deltas=False)
    assert replica == owner
    at_once = SCHEMA.new_state()
    if joined is not None:
        at_once.merge_in(joined)
    assert at_once == owner


@pytest.mark.timeout(30)
def test_delta_tracking_can_be_switched_and_drops_what_is_pending() -> None:
    state = SCHEMA.new_state(track_deltas=False)
    assert not state.tracks_deltas
    state["hits"].increment("r#1", 1)
    state.set_delta_tracking(True)  # the change before is in no delta
    assert state.tracks_deltas and state.take_delta() is None
    state["hits"].increment("r#1", 2)
    delta = state.take_delta()
    assert delta is not None and delta.value == {"hits": 3}  # the field's state, r#1 = 3
    state["tags"].add("r#1", "x")
    state.set_delta_tracking(False)  # stopping drops the pending delta, keeps the state
    assert not state.tracks_deltas and state.take_delta() is None
    state["tags"].add("r#1", "y")
    assert state.take_delta() is None and state.value["tags"] == {"x", "y"} and state.dirty


def test_untracked_state_keeps_only_the_dirty_flag() -> None:
    state = SCHEMA.new_state(track_deltas=False)
    state["hits"].increment("r#1")
    assert state.dirty and state.take_delta() is None


def test_merge_is_field_by_field_and_pure() -> None:
    a, b = SCHEMA.new_state(), SCHEMA.new_state()
    a["hits"].increment("a#1", 1)
    b["hits"].increment("b#1", 2)
    b["tags"].add("b#1", "y")
    before = (a.encode(), b.encode())
    merged = a.merge(b)
    assert merged.value["hits"] == 3 and merged.value["tags"] == {"y"}
    assert (a.encode(), b.encode()) == before
    assert a.merge(b) == b.merge(a)


def test_fields_no_longer_declared_are_kept_and_written_back() -> None:
    state = SCHEMA.new_state()
    state["hits"].increment("r#1", 4)
    state["tags"].add("r#1", "keep")

    class Slim:
        hits = GCounter()

    slim = StateSchema.from_class(Slim).decode(state.encode())
    assert slim.value == {"hits": 4}
    slim["hits"].increment("r#1")
    data = slim.encode()
    assert data == _generic_encoding(slim)
    assert SCHEMA.decode(data).value["tags"] == {"keep"}


def test_a_declared_field_missing_from_the_record_starts_empty() -> None:
    class Old:
        hits = GCounter()

    old = StateSchema.from_class(Old).new_state()
    old["hits"].increment("r#1", 2)
    state = SCHEMA.decode(old.encode())
    assert state.value == {"config": {}, "hits": 2, "tags": frozenset()}


def test_a_stored_field_of_another_type_is_refused() -> None:
    class Other:
        hits = PNCounter()

    with pytest.raises(DecodeError, match="stored PNCounter, declared GCounter"):
        SCHEMA.decode(StateSchema.from_class(Other).new_state().encode())


def test_merge_of_different_schemas_is_refused() -> None:
    class Other:
        hits = GCounter()

    with pytest.raises(TypeMismatchError):
        SCHEMA.new_state().merge_in(StateSchema.from_class(Other).new_state())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_decode_of_random_bytes_raises_only_decode_error(data: bytes) -> None:
    try:
        SCHEMA.decode(data)
    except DecodeError:
        pass


@pytest.mark.parametrize(
    "bad",
    [
        [COMPOSITE_CODE, 2, []],
        [COMPOSITE_CODE + 1, 1, []],
        [COMPOSITE_CODE, 1, [["tags", GCounter().to_wire()], ["hits", GCounter().to_wire()]]],
        [COMPOSITE_CODE, 1, [["hits", [99, 1, []]]]],
        [COMPOSITE_CODE, 1, [["hits"]]],
        [COMPOSITE_CODE, 1, "x"],
    ],
)
def test_malformed_records_are_refused(bad: object) -> None:
    with pytest.raises(DecodeError):
        SCHEMA.decode(pack(bad))


def test_states_are_never_pickled() -> None:
    import pickle

    with pytest.raises(TypeError, match="never pickled"):
        pickle.dumps(SCHEMA.new_state())
