"""What a node advertises (PlacementCapability): the strings placement relies on."""

from __future__ import annotations

import gpu
from fabric.placement import PlacementCapability, evaluator_capability, node_capabilities, placement_capability_names


def test_fixed_capabilities_are_the_strings_that_travel():
    assert placement_capability_names() == ["serve", "compute", "gpu"]
    assert PlacementCapability("gpu") is PlacementCapability.GPU
    assert evaluator_capability("text.stats", "1") == "eval:text.stats@1"


def test_a_node_advertises_serve_compute_gpu_and_its_evaluator_versions():
    evs = [("a", "1"), ("b", "2")]
    assert node_capabilities(evs, gpu=False) == ["serve", "compute", "eval:a@1", "eval:b@2"]
    assert node_capabilities(evs, gpu=True) == ["serve", "compute", "gpu", "eval:a@1", "eval:b@2"]
    # a relay forwards misses and never computes: it must never be chosen as a home site
    assert node_capabilities(evs, compute=False, gpu=False) == ["serve"]
    # by default gpu is advertised exactly when CuPy and a device are usable here
    assert ("gpu" in node_capabilities(evs)) is gpu.available()
