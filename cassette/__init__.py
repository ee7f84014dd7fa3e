"""cassette: content keys, the canonical codec and the LMDB reply ledger.

The lowest layer of evalfabric; it imports nothing else of ours.  The ledger
names (``Cassette``, ``Record``, ...) load on first use, so a layer that needs only
keys and the codec (gossip/) does not load LMDB.
"""

from cassette.errors import FabricError, StatusCode
from cassette.keys import ContentKey
from cassette import codec

__all__ = ["FabricError", "StatusCode", "ContentKey", "codec",
           "Record", "Cassette", "PutResult", "VerifyReport", "ReplayReport", "MISS"]

_LAZY = {"Record": "cassette.record", "Cassette": "cassette.store", "PutResult": "cassette.store",
         "VerifyReport": "cassette.store", "ReplayReport": "cassette.store", "MISS": "cassette.store"}


def __getattr__(name: str):
    """The ledger names, imported on first use (PEP 562)."""
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'cassette' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value
