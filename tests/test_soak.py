"""Long soaks (``make soak``; excluded from ``make test`` by the ``soak`` marker).

The default suite runs each of these scenarios a few times; here they run many
times with fresh seeds, to shake out rare interleavings.
"""

from __future__ import annotations

import pytest

import test_crash
import test_fleet

pytestmark = pytest.mark.soak


@pytest.mark.parametrize("seed", range(100, 140))
@pytest.mark.parametrize("durability", ["sync", "fast"])
def test_kill_9_soak(tmp_path, seed, durability):
    test_crash.test_kill_9_mid_burst_loses_no_acknowledged_put_and_leaves_nothing_half_written(tmp_path, seed, durability)


@pytest.mark.parametrize("round_", range(5))
def test_fleet_compute_once_soak(fleet_of, tmp_path, round_):
    test_fleet.test_five_nodes_eight_agents_500_requests_evaluated_exactly_500_times(fleet_of, tmp_path)


@pytest.mark.parametrize("round_", range(3))
def test_kill_and_rejoin_soak(fleet_of, round_):
    test_fleet.test_kill_9_a_holder_then_restart_it(fleet_of)


fleet_of = test_fleet.fleet_of
