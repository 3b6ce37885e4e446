"""The table of built-in CRDT types by wire tag, for decoding values of any type.

Used where a structure holds CRDTs of several types (ORMap values, the fields
of a composite agent state). The table is declared here, explicitly, rather
than filled by import-time registration.
"""

from __future__ import annotations

from typing import Any

from ._base import CRDT
from ._errors import DecodeError
from .gcounter import GCounter
from .gset import GSet
from .lwwmap import LWWMap
from .lwwregister import LWWRegister
from .ormap import ORMap
from .orset import ORSet
from .pncounter import PNCounter
from .rga import RGA
from .ttlmap import TTLMap
from .twophaseset import TwoPhaseSet
from .vclock import VectorClock

__all__ = ["TYPES_BY_CODE", "crdt_from_wire"]

TYPES_BY_CODE: dict[int, type[CRDT]] = {
    cls.TYPE_CODE: cls
    for cls in (
        GCounter,
        PNCounter,
        GSet,
        TwoPhaseSet,
        ORSet,
        LWWRegister,
        LWWMap,
        ORMap,
        RGA,
        TTLMap,
        VectorClock,
    )
}


def crdt_from_wire(obj: Any) -> CRDT:
    """Rebuild a CRDT of any built-in type from its decoded ``[code, version, body]``."""
    if not isinstance(obj, list) or len(obj) != 3:
        raise DecodeError("not a CRDT encoding: expected [code, version, body]")
    code = obj[0]
    cls = TYPES_BY_CODE.get(code) if isinstance(code, int) and not isinstance(code, bool) else None
    if cls is None:
        raise DecodeError(f"unknown CRDT type tag {code!r}")
    return cls.from_wire(obj)
