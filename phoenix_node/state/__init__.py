"""phoenix_node.state: CRDT types, vector clocks and the LMDB store.

A pure library: no sockets, no processes, importable by workers without
cycles. See ``docs/state.md`` for the contract every type keeps.
"""

from ._base import CRDT, DeltaSink
from ._codec import MAX_COUNT
from ._errors import (
    CounterOverflowError,
    DecodeError,
    InvalidValueError,
    StateError,
    StoreClosedError,
    StoreError,
    StoreFullError,
    StoreWriteError,
    TypeMismatchError,
)
from ._types import TYPES_BY_CODE, crdt_from_wire
from .composite import AgentState, StateSchema
from .gcounter import GCounter
from .gset import GSet
from .hlc import DEFAULT_CLOCK, HybridClock
from .lwwmap import LWWMap
from .lwwregister import LWWRegister
from .ormap import ORMap
from .orset import ORSet
from .pncounter import PNCounter
from .resolve import (
    CustomResolver,
    LastWriterWins,
    Resolution,
    ResolverError,
    SemanticMerge,
    VectorClockSiblings,
    Version,
    resolve,
)
from .rga import RGA, RGAIndexError
from .store import DB_NAMES, Durability, Store, WriteBatch
from .ttlmap import TTLMap
from .twophaseset import TwoPhaseSet
from .vclock import Order, VectorClock

__all__ = [
    "CRDT",
    "DB_NAMES",
    "DEFAULT_CLOCK",
    "MAX_COUNT",
    "RGA",
    "TYPES_BY_CODE",
    "AgentState",
    "CounterOverflowError",
    "CustomResolver",
    "DecodeError",
    "DeltaSink",
    "Durability",
    "GCounter",
    "GSet",
    "HybridClock",
    "InvalidValueError",
    "LWWMap",
    "LWWRegister",
    "LastWriterWins",
    "ORMap",
    "ORSet",
    "Order",
    "PNCounter",
    "RGAIndexError",
    "Resolution",
    "ResolverError",
    "SemanticMerge",
    "StateError",
    "StateSchema",
    "Store",
    "StoreClosedError",
    "StoreError",
    "StoreFullError",
    "StoreWriteError",
    "TTLMap",
    "TwoPhaseSet",
    "TypeMismatchError",
    "VectorClock",
    "VectorClockSiblings",
    "Version",
    "WriteBatch",
    "crdt_from_wire",
    "resolve",
]
