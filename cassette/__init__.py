"""cassette: content keys, the canonical codec and the LMDB reply ledger.

The lowest layer of evalfabric; it imports nothing else of ours.
"""

from cassette.errors import FabricError, StatusCode
from cassette.keys import ContentKey
from cassette import codec

__all__ = ["FabricError", "StatusCode", "ContentKey", "codec"]
from cassette.record import Record
from cassette.store import MISS, Cassette, PutResult, ReplayReport, VerifyReport

__all__ += ["Record", "Cassette", "PutResult", "VerifyReport", "ReplayReport", "MISS"]
