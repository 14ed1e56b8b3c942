"""The monitor's tables read back from CSV, counter rates, and the chart (real recorded data)."""

from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

from labkit.exceptions import MonitorError  # noqa: E402
from labkit.monitor import read_events, read_samples  # noqa: E402
from labkit.charts import conntrack_chart, counter_rate, relative, seconds  # noqa: E402

DATA = Path(__file__).parent.parent / "data"


@pytest.fixture(scope="module")
def recorded():
    return (read_samples(DATA / "monitor-iteration4-samples.csv.gz"),
            read_events(DATA / "monitor-iteration4-events.csv"))


def test_recorded_tables_are_tidy(recorded):
    samples, events = recorded
    assert list(samples.columns) == ["time", "host", "netns", "metric", "value"]
    assert list(events.columns) == ["time", "host", "netns", "kind", "message"]
    assert samples["time"].dt.tz is not None and events["time"].dt.tz is not None
    # suppressed lines belong to no namespace: read back as "", not NaN
    assert set(events.loc[events.kind == "suppressed", "netns"]) == {""}


def test_counter_rates_add_up_to_the_counter_rise(recorded):
    samples, _ = recorded
    rates = counter_rate(relative(samples, seconds(samples["time"]).min()), "stat_drop")
    node = samples[(samples.netns == "node") & (samples.metric == "stat_drop")]["value"]
    rose = node.max() - node.min()
    assert rose > 0
    assert rates[rates.netns == "node"]["rate"].sum() == rose
    assert (rates["rate"] >= 0).all()


def test_the_monitors_chart_is_the_notebooks_counts_against_max_with_drops_and_lines(recorded, tmp_path):
    samples, events = recorded
    out = tmp_path / "conntrack.png"
    fig = conntrack_chart(samples, events, out=out, title="iteration 4")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    axes = fig.axes
    assert len(axes) == 3                       # counts, counter deltas, log lines
    labels = [t.get_text() for t in axes[0].get_legend().get_texts()]
    assert {"node count", "pod-1 count"} <= set(labels) and not any("init" in label for label in labels)
    assert any("nf_conntrack_max" in label for label in labels)
    assert axes[0].get_ylim()[1] >= 2048        # the max is on the scale
    assert axes[2].get_xlabel() == "seconds since the first sample"  # no load given: from the first sample
    # every table-full line of the node and the pod is drawn: one mark per event in the log panel
    lab = events[events["netns"].isin(["node", "pod-1"]) & events["kind"].isin(["table_full", "expect_table_full"])]
    drawn = sum(len(c.get_offsets()) for c in axes[2].collections)
    assert drawn == len(lab) > 0


def test_chart_refuses_empty_samples(recorded):
    samples, _ = recorded
    with pytest.raises(MonitorError, match="nothing to plot"):
        conntrack_chart(samples.iloc[0:0])


def _recorded(ticks, events, roles):
    """A Monitor whose one machine recorded ``ticks`` and ``events`` (no sampling)."""
    from labkit.host import LocalHost
    from labkit.monitor.monitor import Monitor, _Machine

    monitor = Monitor({"node": LocalHost()})
    machine = _Machine("vm")
    machine.ticks, machine.events, machine.roles = ticks, events, roles
    machine.own_inode = 4026531840
    monitor._machines = {"vm": machine}
    return monitor


def test_a_61_table_full_line_naming_no_netns_goes_to_the_one_full_namespace():
    """Kernel 6.1 prints ``table full, dropping packet`` with no namespace even from a netns."""
    from labkit.monitor.parse import TABLE_FULL, KernelEvent

    line = KernelEvent(TABLE_FULL, "nf_conntrack: nf_conntrack: table full, dropping packet")
    full, spare = {"nf_conntrack_count": 1024, "nf_conntrack_max": 1024}, {"nf_conntrack_count": 10,
                                                                           "nf_conntrack_max": 1024}
    ticks = [(100.0, "node", full), (100.0, "pod-1", spare), (200.0, "node", full), (200.0, "pod-1", full)]
    roles = {4026531840: "init", 11: "node", 12: "pod-1"}
    events = _recorded(ticks, [(100.3, line), (200.2, line), (300.0, line)], roles).events
    # only the node full at 100 s: the node's; both at 200 s, none at 300 s: the initial namespace's
    assert list(events["netns"]) == ["node", "init", "init"]
