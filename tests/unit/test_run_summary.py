"""The summary row of an iteration, computed from small tidy frames (no testbed)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from labkit.results import SUMMARY_COLUMNS, summary_frame
from labkit.run import steady_rate, summarize
from labkit.scenario import load_scenario
from labkit.story import load_story

T0 = 1_700_000_000.0


def frames():
    rows = []
    for i in range(0, 150):  # 15 s at 10 Hz; the load runs 10 s
        t = T0 + i * 0.1
        node = min(1000, i * 20)
        for netns, count, drop, early in (("node", node, i * 3, i), ("pod-1", node // 2, i, 0),
                                          ("pod-2", node // 4, 2 * i, 0), ("init", 40, 5000 + i, 0)):
            rows += [(t, "local", netns, "nf_conntrack_count", count),
                     (t, "local", netns, "nf_conntrack_max", 1000),
                     (t, "local", netns, "nf_conntrack_expect_max", 64),
                     (t, "local", netns, "expect_count", min(64, i)),
                     (t, "local", netns, "stat_drop", drop),
                     (t, "local", netns, "stat_early_drop", early),
                     (t, "local", netns, "udp_timeout", 30 if netns != "node" else 10),
                     (t, "local", netns, "udp_timeout_stream", 120)]
    samples = pd.DataFrame(rows, columns=["time", "host", "netns", "metric", "value"])
    samples["time"] = pd.to_datetime(samples["time"], unit="s", utc=True)
    events = pd.DataFrame([
        (T0 + 3, "local", "node", "table_full", "nf_conntrack: table full in netns 1, dropping packet"),
        (T0 + 4, "local", "pod-2", "table_full", "nf_conntrack: table full in netns 2, dropping packet"),
        (T0 + 5, "local", "node", "expect_table_full", "nf_conntrack: expectation table full"),
        (T0 + 5, "local", "", "suppressed", "net_ratelimit: 12 callbacks suppressed"),
        (T0 + 6, "local", "init", "table_full", "someone else's namespace"),
    ], columns=["time", "host", "netns", "kind", "message"])
    load = pd.DataFrame([(T0 + s, s, "completed", 100 if s < 5 else 50) for s in range(11)],
                        columns=["time", "elapsed_s", "metric", "value"])
    return samples, events, load


def test_summarize_gives_designs_columns_from_the_monitor_and_the_load():
    it = load_scenario().iteration(3, "quick")
    import dataclasses
    it = dataclasses.replace(it, duration_s=10, cooldown_s=5)
    samples, events, load = frames()
    summary = {"ok": 700, "failed": 12, "by_reason": {"timeout": 12}, "transfers_per_s": 70.0,
               "latency_p50_ms": 3.0, "latency_p99_ms": 900.0}
    row = summarize(it, summary, samples, events, load_start=T0, load_stop=T0 + 10, load=load)
    assert set(SUMMARY_COLUMNS) <= set(row)
    assert row["transfers_per_s"] == 50.0 and row["transfers_per_s_whole_load"] == 70.0
    assert (row["transfers_ok"], row["transfers_failed"]) == (700, 12)
    assert row["peak_node_count"] == 1000 and row["peak_pod_count"] == 500
    assert row["peak_expect_count"] == 64
    assert (row["node_drops"], row["node_early_drops"]) == (149 * 3, 149)
    assert (row["pod_drops"], row["pod_early_drops"]) == (149 + 2 * 149, 0)
    assert (row["table_full_logs"], row["node_table_full_logs"], row["pod_table_full_logs"]) == (2, 1, 1)
    assert row["expect_full_logs"] == 1
    assert (row["node_udp_timeout"], row["pod_udp_timeout"]) == (10, 30)
    assert row["conntrack_max"] == it.node_sysctls["net.netfilter.nf_conntrack_max"]
    assert row["node_count_at_stop"] == 1000 and row["after_stop_s"] == 1
    assert json.loads(row["failed_by_reason"]) == {"timeout": 12}
    frame = summary_frame([row])
    assert list(frame.columns[:len(SUMMARY_COLUMNS)]) == list(SUMMARY_COLUMNS)


def test_summary_row_carries_the_models_prediction_beside_the_measurement():
    import dataclasses
    it = load_scenario().iteration(3, "quick")
    it = dataclasses.replace(it, duration_s=10, cooldown_s=5,
                             node_sysctls={**it.node_sysctls, "net.netfilter.nf_conntrack_max": 1000})
    samples, events, load = frames()
    slab = pd.DataFrame([(T0 + i, "local", "init", "slab_conntrack_bytes", 50_000 + 20_000 * min(i, 5))
                         for i in range(0, 15)], columns=["time", "host", "netns", "metric", "value"])
    slab["time"] = pd.to_datetime(slab["time"], unit="s", utc=True)
    summary = {"ok": 700, "failed": 12, "by_reason": {}, "transfers_per_s": 70.0, "latency_p50_ms": 3.0}
    row = summarize(it, summary, pd.concat([samples, slab]), events, load_start=T0, load_stop=T0 + 10,
                    load=load)
    # 50 transfers/s, node timeout 10 s, a 10 s load: 2 x 10 s x 50/s = 1000 entries = the quick max
    assert row["predicted_node_fills"] is True and row["measured_node_fills"] is True
    assert row["predicted_node_count"] == 1000
    # quick has no calibrated capacity: the whole load's 70/s (the second half's 50/s is the full table's)
    assert row["model_offered_per_s"] == 70.0
    assert (row["slab_bytes_start"], row["slab_bytes_peak"], row["slab_lab_bytes_peak"]) == (50_000, 150_000, 100_000)
    assert row["predicted_memory_bytes"] > row["predicted_entry_bytes"] > 0


def test_steady_rate_is_the_second_half_of_the_load():
    _, _, load = frames()
    assert steady_rate(load, 10) == 50.0
    assert steady_rate(load, 4) == 100.0
    assert steady_rate(load.iloc[0:0], 10) is None


def test_every_iteration_has_its_story():
    story = load_story()
    assert set(story["iterations"]) == set(range(1, 13))
    assert all(story["iterations"][n]["story"].strip() for n in range(1, 13))
