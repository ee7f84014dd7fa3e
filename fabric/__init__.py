"""evalfabric: a content-addressed evaluation fabric (import package ``fabric``)."""

from cassette.errors import FabricError, StatusCode
from cassette.keys import ContentKey

__all__ = ["FabricError", "StatusCode", "ContentKey"]
