"""evalfabric: a content-addressed evaluation fabric.

The distribution is named ``evalfabric`` (PyPI's ``fabric`` is an unrelated SSH
library); the import package is ``fabric``.  This module re-exports the public
contract of DESIGN.md; everything else may change.

>>> import fabric
>>> @fabric.evaluator("square", version="1")
... def square(x: int) -> int:
...     return x * x
>>> fabric.realize(fabric.Request("square", {"x": 3})).value
9
"""

from cassette.errors import FabricError, StatusCode
from cassette.keys import ContentKey
from fabric.api import arealize, get, get_into, open, put, realize
from fabric.artifacts import ArtifactRef
from fabric.local import Fabric
from fabric.registry import evaluator
from fabric.request import Reply, Request

__all__ = [
    "Request",
    "Reply",
    "ContentKey",
    "ArtifactRef",
    "FabricError",
    "StatusCode",
    "Fabric",
    "evaluator",
    "realize",
    "arealize",
    "open",
    "put",
    "get",
    "get_into",
]
