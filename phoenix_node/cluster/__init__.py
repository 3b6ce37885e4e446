"""The cluster: nodes on several machines acting as one system.

Membership and failure detection (:mod:`.membership`, SWIM), the consistent
hash ring that places agents on nodes (:mod:`.ring`), and the control
process's cluster duties that tie them to the peers' sockets (:mod:`.service`).
"""

from .membership import (
    Member,
    Membership,
    MembershipError,
    MembershipEvent,
    MembershipProtocolError,
    MemberState,
    NodeId,
    SwimConfig,
)
from .ring import EmptyRingError, Ring, key_hash, moved

__all__ = [
    "EmptyRingError",
    "Member",
    "MemberState",
    "Membership",
    "MembershipError",
    "MembershipEvent",
    "MembershipProtocolError",
    "NodeId",
    "Ring",
    "SwimConfig",
    "key_hash",
    "moved",
]
