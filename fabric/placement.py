"""What a node can be asked to do: the capabilities it advertises (PlacementCapability).

A node advertises a set of capability strings in its wire welcome and in its
gossip membership entry.  Three are fixed (:class:`PlacementCapability`); one
more per evaluator version the node can run, ``eval:NAME@VERSION``
(:func:`evaluator_capability`).  Placement reads them: only members advertising
``eval:NAME@VERSION`` are candidates for the home site of a request for that
evaluator version (specs/gossip.md, fabric.fleet).
"""

from __future__ import annotations

import enum
from typing import Iterable

__all__ = ["PlacementCapability", "evaluator_capability", "placement_capability_names", "node_capabilities"]


class PlacementCapability(str, enum.Enum):
    """A fixed capability; its value is the string that travels."""

    #: answers ``fetch`` / ``get`` for the keys it holds (ContentServeFabric)
    SERVE = "serve"
    #: runs evaluators and records their replies (may be a home site)
    COMPUTE = "compute"
    #: can materialize artifacts into CuPy arrays on a CUDA device of its own
    GPU = "gpu"


def placement_capability_names() -> list[str]:
    """The strings of every :class:`PlacementCapability`, in declaration order."""
    return [c.value for c in PlacementCapability]


def evaluator_capability(evaluator: str, version: str) -> str:
    """The capability string a node advertises for an evaluator version: ``eval:NAME@VERSION``."""
    return f"eval:{evaluator}@{version}"


def node_capabilities(evaluators: Iterable[tuple[str, str]], *, compute: bool = True, gpu: bool | None = None) -> list[str]:
    """What a node advertises: ``serve``; ``compute`` and one :func:`evaluator_capability`
    per ``(name, version)`` when it computes; ``gpu`` when ``gpu`` is true, or (``None``)
    when CuPy and a CUDA device are usable here."""
    caps = [PlacementCapability.SERVE.value]
    if compute:
        caps.append(PlacementCapability.COMPUTE.value)
    if gpu is None:
        from gpu import available

        gpu = available()
    if gpu:
        caps.append(PlacementCapability.GPU.value)
    if compute:
        caps.extend(evaluator_capability(n, v) for n, v in evaluators)
    return caps
