"""Workshop mode on the real netns testbed (quick profile), without a browser.

One iteration-2 session as a participant drives it: the article's commands run for
real on the node and in the pod, the live chart gets its first point within 5 s of
the run step and one about every second of the load, the check computes F1 from the
participant's row; then the sandbox refuses a max below what the node tracks, and
the testbed stays up and usable.  Everything is taken down afterwards.
"""

from __future__ import annotations

import time

import pytest

from labkit import live
from labkit.session import IterationSession
from tests.conftest import need_program, need_root

pytestmark = pytest.mark.integration

DURATION_S = 6


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    need_root()
    need_program("ip", "iptables", "in.tftpd", "conntrack", "sysctl")
    base = tmp_path_factory.mktemp("workshop")
    mp = pytest.MonkeyPatch()
    mp.setenv("LABKIT_STATE_DIR", str(base / "state"))
    mp.setenv("LABKIT_RESULTS_DIR", str(base / "results"))
    lab = IterationSession(2, "quick", duration=DURATION_S, cooldown=2)
    try:
        lab.up()
        yield lab
    finally:
        from labkit.testbed.netns import clean

        lab.down()
        clean(base / "state")
        mp.undo()


def test_the_articles_commands_run_on_the_node_and_in_the_pod(session):
    shown = session.sysctl_w()
    assert shown.ok, repr(shown)
    assert "[init]# sysctl -w net.netfilter.nf_conntrack_max=1024" in repr(shown)
    assert "net.netfilter.nf_conntrack_max = 1024" in repr(shown)
    assert session.sh("node", "cat /proc/sys/net/netfilter/nf_conntrack_max").value() == 1024
    pod = session.sh("pod-1", "cat /proc/sys/net/netfilter/nf_conntrack_max /proc/sys/net/netfilter/nf_conntrack_udp_timeout")
    assert pod.text.split() == ["1024", "30"]  # the global max; the pod's own (default) timeout
    nat = session.sh("node", "iptables-save -t nat")
    assert nat.ok and "KUBE-NODEPORTS" in nat.text and "--dport 30069" in nat.text
    refused = session.sh("node", "sysctl -w net.netfilter.nf_conntrack_max=2048")
    assert "Invalid argument" in refused.result.stderr  # the global max: not from the node's namespace
    assert session.sh("node", "cat /proc/sys/net/netfilter/nf_conntrack_max").value() == 1024
    panel = repr(session.pod_sysctls())
    assert "SysctlForbidden" in panel


def test_the_run_step_draws_its_first_point_within_5_s_and_one_a_second(session, monkeypatch):
    charts = []
    original = live.LiveChart.start

    def start(self, monitor):
        self.first_point_s = time.monotonic() - started
        charts.append(self)
        original(self, monitor)

    monkeypatch.setattr(live.LiveChart, "start", start)
    started = time.monotonic()
    table = session.run(live=True)
    chart = charts[0]
    assert chart.first_point_s < 5.0, f"first live point after {chart.first_point_s:.1f} s"
    assert chart.series.points and chart.series.counts["node"][-1][1] >= 0
    assert max(v for _t, v in chart.series.counts["node"]) > 0
    assert len(chart.series.transfers) >= DURATION_S - 2, chart.series.transfers
    assert chart.redraws >= DURATION_S, chart.redraws  # at least once a second while it ran
    assert float(table.loc["transfers/s (article)", "value"]) == 1000


def test_after_the_load_the_node_still_tracks_and_the_check_uses_the_participants_row(session):
    count = session.sh("node", "cat /proc/sys/net/netfilter/nf_conntrack_count").value()
    assert count > 0
    stats = session.sh("node", "conntrack -S")
    assert stats.table is not None and "drop" in stats.table.columns
    tail = session.sh("node", "conntrack -L expect 2>&1 >/dev/null | tail -1")
    assert "expectations have been shown" in tail.text
    table = session.check("less")
    assert table.loc["your prediction", "value"] == "less"
    assert table.loc["finding F1", "value"].startswith("iteration 2")
    assert table.loc["on your data", "value"] in ("pass", "fail")


def test_the_sandbox_refuses_a_max_below_what_the_node_tracks_and_stays_up(session):
    from labkit.sandbox import Sandbox

    sb = Sandbox("quick")
    tracked = session.sh("node", "cat /proc/sys/net/netfilter/nf_conntrack_count").value()
    assert tracked > 1
    panel = sb.attempt(**{**sb.defaults(), "conntrack_max": 1})
    title, text, refused = panel.blocks[0]
    assert refused and "refused before anything changed" in title
    assert "in the testbed's node namespace" in text or "in the testbed's pod-1 namespace" in text
    assert panel.blocks[1][1].startswith("up, with ") and "nf_conntrack_max=1024" in panel.blocks[1][1]
    assert session.sh("node", "cat /proc/sys/net/netfilter/nf_conntrack_max").value() == 1024
