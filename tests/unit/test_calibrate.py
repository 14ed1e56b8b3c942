"""Deriving the lab profile from calibration measurements (pure)."""

from __future__ import annotations

import pytest

from labkit.calibrate import EXPECT_MAX, MAX, Measurement, comparison, derive, measurement, write_profile
from labkit.scenario import load_profile, load_scenario

ARTICLE = {1: 8500, 2: 1000, 3: 1000, 4: 1000, 5: 4000, 6: 4100, 7: 4600, 8: 5100, 9: 5800}


def measurements(capacity=400.0, lifetime30=90.0, lifetime10=32.0, lifetime3=20.0):
    return [Measurement("plain", None, 1, 420.0, 0, None, 0),
            Measurement("nodeport-T30", 30, 1, capacity, int(capacity * lifetime30), lifetime30, 0),
            Measurement("nodeport-T10", 10, 1, capacity, int(capacity * lifetime10), lifetime10, 0),
            Measurement("nodeport-T3", 3, 1, capacity, int(capacity * lifetime3), lifetime3, 0)]


def test_the_short_timeout_stays_10_s_only_where_it_shortens_entry_lifetimes():
    # iteration 8's table: 4000/5100 x 400/s x 90 entry-s = 28236; at 10 s one pod fills 25/90 of it
    keeps = derive(measurements(lifetime10=25.0), ARTICLE, cpu_limit=0.35)
    assert keeps["sysctl_values"]["net.netfilter.nf_conntrack_udp_timeout"] == {30: 30, 10: 10}
    lagging = derive(measurements(lifetime10=86.0), ARTICLE, cpu_limit=0.35)
    assert lagging["sysctl_values"]["net.netfilter.nf_conntrack_udp_timeout"] == {30: 30, 10: 3}
    assert "does not shorten" in lagging["calibration"]["derivation"][3]["why"]


def test_the_short_timeout_leaves_iteration_9_room_as_the_articles_did():
    # 10 s shortens enough (32 of 90 entry-s), but one pod's 12800 entries fill 45 % of the 28236 table
    # (two pods would fill 90 %), where the article's one pod filled 38 %: 3 s; at 25 entry-s, 35 %: 10 s
    assert derive(measurements(lifetime10=25.0), ARTICLE,
                  cpu_limit=0.35)["sysctl_values"]["net.netfilter.nf_conntrack_udp_timeout"][10] == 10
    full = derive(measurements(lifetime10=32.0), ARTICLE, cpu_limit=0.35)
    assert full["sysctl_values"]["net.netfilter.nf_conntrack_udp_timeout"][10] == 3
    assert "more than the article's 38%" in full["calibration"]["derivation"][3]["why"]


def test_each_table_admits_the_share_of_capacity_the_articles_admitted():
    profile = derive(measurements(), ARTICLE, cpu_limit=0.35)
    maxes = profile["sysctl_values"][MAX]
    # iteration 2: 1000 of 5100/s -> 0.196 x 400/s x 90 entry-s = 7059 -> rounded up to 64
    assert maxes[131072] == 7104
    assert maxes[524288] == pytest.approx(4000 / 5100 * 400 * 90, abs=64)
    assert maxes[1048576] == pytest.approx(4100 / 5100 * 400 * 90, abs=64)
    assert maxes[131072] < maxes[524288] < maxes[1048576]
    expects = profile["sysctl_values"][EXPECT_MAX]
    assert expects[8192] == 8 * expects[1024] or abs(expects[8192] - 8 * expects[1024]) <= 8


def test_a_faster_machine_gets_bigger_tables():
    slow = derive(measurements(capacity=300), ARTICLE, cpu_limit=0.35)["sysctl_values"][MAX]
    fast = derive(measurements(capacity=3000), ARTICLE, cpu_limit=0.35)["sysctl_values"][MAX]
    assert all(fast[v] > 9 * slow[v] for v in slow)


def test_the_derived_profile_loads_as_a_profile_file(tmp_path):
    profile = derive(measurements(), ARTICLE, cpu_limit=0.35)
    path = write_profile(profile, tmp_path / "lab.yaml")
    scenario = load_scenario()
    loaded = load_profile(path, scenario)
    scenario.add_profile(loaded)
    it = scenario.iteration(5, loaded)
    assert it.node_sysctls[MAX] == profile["sysctl_values"][MAX][524288]
    assert it.node_sysctls["net.netfilter.nf_conntrack_udp_timeout"] == 30
    table = comparison(profile)
    assert list(table.columns) == ["sysctl", "article", "lab", "why"] and len(table) == 6


def test_measurement_lifetime_is_mean_count_over_rate():
    m = measurement("nodeport-T30", {"transfers_per_s": 400.0, "peak_node_count": 36000,
                                     "mean_node_count": 29200.0, "replicas": 1,
                                     "transfers_failed": 0}, udp_timeout=30)
    assert m.lifetime == 73.0


def test_expect_max_stays_fillable_by_the_transfers_in_flight_on_a_slow_machine():
    """A slow machine (a VM under emulation) keeps 2 transfers in flight: they hold at most 2
    expectations, so the default's table must be smaller than that for I4 to show, and the raised one
    at least that."""
    slow = derive(measurements(capacity=3.0), ARTICLE, cpu_limit=0.35,
                  run={"duration_s": 50, "cooldown_s": 5, "concurrency": 2, "file_size": 5120})
    expects = slow["sysctl_values"][EXPECT_MAX]
    assert expects[1024] == 1 and expects[8192] >= 2
    rows = [r for r in slow["calibration"]["derivation"] if r["sysctl"] == EXPECT_MAX]
    assert "below the 2 transfers in flight" in rows[0]["why"]
    # the lab's 64 in flight leave the article's ratio alone (26 and 204 on the calibration machine)
    usual = derive(measurements(capacity=285, lifetime30=57.7, lifetime10=20.6, lifetime3=7.3), ARTICLE,
                   cpu_limit=0.35)["sysctl_values"][EXPECT_MAX]
    assert usual == {1024: 26, 8192: 204}
