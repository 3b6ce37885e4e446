"""The replication change log value (workers/replog.py): the documented layout, and
what a damaged value reads as (ship the whole state; never an exception)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.replog import (
    delta_entry,
    entry_agent,
    entry_key,
    entry_stamp,
    read_entry,
    whole_entry,
)

STAMP = b"\x00\x00\x00\x07\x00\x00\x00\x00\x00\x00\x00\x02"  # a worker's >IQ stamp


@pytest.mark.timeout(10)
def test_values_have_the_documented_layout() -> None:
    assert whole_entry(STAMP) == b"W" + STAMP
    assert delta_entry(STAMP, b"\x93\x14\x01\x90") == b"D\x0c" + STAMP + b"\x93\x14\x01\x90"


@pytest.mark.timeout(10)
def test_a_value_reads_back_as_its_stamp_and_delta() -> None:
    assert read_entry(whole_entry(STAMP)) == (STAMP, None)
    assert read_entry(delta_entry(STAMP, b"rec")) == (STAMP, b"rec")
    assert entry_stamp(whole_entry(b"ae12")) == b"ae12"
    assert entry_stamp(delta_entry(STAMP, b"rec")) == STAMP
    # the stamp tells two values apart: one value per commit
    assert entry_stamp(delta_entry(b"s1", b"rec")) != entry_stamp(delta_entry(b"s2", b"rec"))


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "value",
    [b"", b"W", b"D", b"D\x00", b"D\x00rec", b"D\x05abc", b"D\x03abc", b"X" + STAMP, STAMP],
)
def test_a_damaged_value_reads_as_ship_the_whole_state(value: bytes) -> None:
    assert read_entry(value) == (value, None)
    assert entry_stamp(value) == value


@pytest.mark.timeout(10)
def test_bad_arguments_are_refused_with_a_clear_error() -> None:
    with pytest.raises(ValueError, match="stamp"):
        whole_entry(b"")
    with pytest.raises(ValueError, match="stamp"):
        delta_entry(b"x" * 256, b"rec")
    with pytest.raises(ValueError, match="empty"):
        delta_entry(STAMP, b"")


@pytest.mark.timeout(60)
@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40))
def test_any_bytes_read_without_an_exception(value: bytes) -> None:
    stamp, delta = read_entry(value)
    assert entry_stamp(value) == stamp
    if delta is not None:
        assert value == delta_entry(stamp, delta)


@pytest.mark.timeout(10)
def test_an_entry_key_holds_its_agent_id_and_stamp() -> None:
    key = entry_key("Shelf/a", b"\x00\x01")
    assert key == b"Shelf/a\xff\x00\x01"
    assert entry_agent(key) == "Shelf/a"
    assert entry_agent(b"Shelf/a") == "Shelf/a"  # a control's bare whole mark
    odd = "Shelf/\x00\xff\u00ff"  # NUL and U+00FF in an id: no 0xFF byte in UTF-8
    key = entry_key(odd, b"s")
    assert key is not None and entry_agent(key) == odd
    assert entry_key("Shelf/" + "x" * 500, b"s" * 12) is None  # past LMDB's 511 bytes
    with pytest.raises(ValueError):
        entry_key("Shelf/a", b"")
