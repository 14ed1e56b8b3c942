"""The charts, drawn from small synthetic tidy frames shaped like a pressured iteration."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest

from labkit import charts

T0 = 1_700_000_000.0
MAX, EMAX = 6000, 50


def synthetic():
    """20 s of load then 10 s of tail at 10 Hz: the node pins at the max, the pod at half."""
    rows, events, load = [], [], []
    for i in range(300):
        t = T0 - 2 + i * 0.1
        rel = t - T0
        node = min(MAX, max(0, rel) * 600) if rel < 20 else MAX * np.exp(-(rel - 20) / 30)
        drops = max(0, rel - 10) * 200
        for netns, count, d in (("node", node, drops), ("pod-1", node / 2, 0), ("init", 40, 0)):
            rows += [(t, "local", netns, "nf_conntrack_count", count),
                     (t, "local", netns, "nf_conntrack_max", MAX),
                     (t, "local", netns, "nf_conntrack_expect_max", EMAX),
                     (t, "local", netns, "expect_count", min(EMAX, max(0, rel) * 5)),
                     (t, "local", netns, "stat_drop", d),
                     (t, "local", netns, "stat_early_drop", d / 10)]
    for k in range(12):
        events.append((T0 + 10 + k, "local", "node", "table_full", "nf_conntrack: table full in netns 4026532000, dropping packet"))
    events.append((T0 + 12, "local", "node", "expect_table_full", "nf_conntrack: expectation table full"))
    events.append((T0 + 13, "local", "lkother", "table_full", "someone else's"))
    for s in range(22):
        load += [(T0 + s, "completed", 100 if s < 10 else 40), (T0 + s, "failed_timeout", 0 if s < 12 else 8)]
    cols = ["time", "host", "netns", "metric", "value"]
    return (pd.DataFrame(rows, columns=cols),
            pd.DataFrame(events, columns=["time", "host", "netns", "kind", "message"]),
            pd.DataFrame(load, columns=["time", "metric", "value"]))


def labels(fig):
    return [(ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes]


def test_conntrack_chart_shows_counts_against_the_max_with_drops_and_logs(tmp_path):
    samples, events, _ = synthetic()
    fig = charts.conntrack_chart(samples, events, t0=T0, load_s=20, title="iteration 4")
    count_ax, drop_ax, log_ax = fig.axes
    legend = [t.get_text() for t in count_ax.get_legend().get_texts()]
    assert legend == ["node count", "pod-1 count", "nf_conntrack_max = 6,000 (global)"]
    assert count_ax.get_ylabel() == "conntrack entries"
    assert "packets/s" in drop_ax.get_ylabel() and log_ax.get_xlabel() == "time since the load started (s)"
    assert [t.get_text() for t in drop_ax.get_legend().get_texts()] == ["node drops", "node early drops"]
    assert [t.get_text() for t in log_ax.get_yticklabels()] == ["table full (node)", "expectation table full (node)"]
    fig.savefig(tmp_path / "conntrack.png", dpi=80)


def test_counter_rate_is_the_increase_per_second():
    samples, _, _ = synthetic()
    s = charts.relative(samples, T0)
    rate = charts.counter_rate(s[s["netns"] == "node"], "stat_drop")
    by_second = dict(zip(rate["second"], rate["rate"]))
    assert by_second[5] == 0 and by_second[15] == pytest.approx(200, rel=0.01)


def test_expectation_and_transfer_charts(tmp_path):
    samples, _, load = synthetic()
    fig = charts.expectation_chart(samples, t0=T0, load_s=20)
    assert labels(fig) == [("time since the load started (s)", "expectations")]
    fig = charts.transfers_chart(load, t0=T0, load_s=20)
    assert labels(fig) == [("time since the load started (s)", "transfers/s")]
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["completed (verified)", "failed: timeout"]


def test_throughput_chart_normalises_both_to_iteration_1():
    summary = pd.DataFrame({"iteration": [1, 2, 9], "transfers_per_s": [300.0, 100.0, 450.0],
                            "article_transfers_per_s": [8500, 1000, 5800]})
    fig = charts.throughput_chart(summary)
    ax = fig.axes[0]
    heights = [round(p.get_height(), 3) for p in ax.patches]
    assert heights == [1.0, 0.333, 1.5, 1.0, 0.118, 0.682]
    assert ax.get_ylabel() == "transfers/s relative to iteration 1"


def test_iso_times_are_accepted():
    frame = pd.DataFrame({"time": ["2026-01-01T00:00:01+00:00", "2026-01-01T00:00:02.5+00:00"]})
    got = charts.seconds(frame["time"])
    assert got.iloc[1] - got.iloc[0] == pytest.approx(1.5)
