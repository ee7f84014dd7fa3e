"""Gossip layer: who holds which content, and who is up (sans-I/O).

Everything here is a pure state machine that takes time and messages and
returns messages to send; nothing reads a clock, opens a socket or imports the
fabric.  Normative text: ``specs/gossip.md``.

* :class:`HoldingIndex` / :class:`HeldContent` -- the grow-only set of holder
  facts, its compact summary and O(d) anti-entropy (``gossip.holding``);
* :class:`Membership` -- SWIM failure detection with incarnations
  (``gossip.membership``);
* :class:`GossipNode` -- both combined, with eager push and anti-entropy, plus
  :func:`rendezvous_home` (``gossip.node``);
* ``gossip.messages`` -- the wire messages and their strict canonical codec;
* ``gossip.sim`` -- a deterministic simulator for fleets of 1,000+ nodes;
* ``gossip.runner`` -- a thin trio driver over a minimal transport (import it
  explicitly; it is the only module that needs trio).
"""

from gossip.holding import FactRun, HeldContent, HoldingIndex
from gossip.membership import Member, Membership, MembershipConfig, MemberState, Roster
from gossip.messages import decode_message, encode_message
from gossip.node import GossipConfig, GossipNode, GossipStats, rendezvous_home, rendezvous_order

__all__ = [
    "FactRun",
    "HeldContent",
    "HoldingIndex",
    "Member",
    "Membership",
    "MembershipConfig",
    "MemberState",
    "Roster",
    "GossipConfig",
    "GossipNode",
    "GossipStats",
    "rendezvous_home",
    "rendezvous_order",
    "encode_message",
    "decode_message",
]
