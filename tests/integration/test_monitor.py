"""The monitor on the real kernel: its figures against conntrack(8), its events against dmesg."""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
import time

import pytest

from labkit.monitor import Monitor, parse_conntrack_S, parse_dmesg_line, read_events, read_samples
from labkit.monitor.parse import EXPECT_TABLE_FULL, TABLE_FULL
from labkit.sysctls import GlobalSysctls
from tests.conftest import need_program, need_root, unique_name
from tests.integration.pressure import PressureLab

pytestmark = pytest.mark.integration

# conntrack -S name -> stat table column
S_TO_STAT = {"found": "found", "invalid": "invalid", "insert": "insert", "insert_failed": "insert_failed",
             "drop": "drop", "early_drop": "early_drop", "error": "icmp_error",
             "search_restart": "search_restart", "clash_resolve": "clashres", "chaintoolong": "chainlength"}


@pytest.fixture
def lab():
    need_root()
    need_program("ip", "iptables", "conntrack")
    made = PressureLab(unique_name("lkm"))
    yield made
    made.close()


def last(samples, role, metric):
    rows = samples[(samples.netns == role) & (samples.metric == metric)]
    return int(rows.sort_values("time")["value"].iloc[-1])


def expectations_listed(lab) -> int:
    out = lab.node_run("conntrack", "-L", "expect")
    return int(re.search(r"(\d+) expectations have been shown", out).group(1))


@pytest.mark.parametrize("agent", [False, True], ids=["in-process", "agent"])
def test_figures_agree_with_conntrack_tools(lab, agent):
    uploaded = set(glob.glob("/tmp/labkit-monitor-agent-*"))
    with Monitor(lab.hosts(), hz=20, agent=agent) as mon:
        lab.send(40, port=69)          # 40 TFTP read requests: 40 entries, 40 expectations
        lab.send(25, port=5000)
        # on a busy machine the last datagrams may reach the node a little later
        deadline = time.monotonic() + 10
        while int(lab.node_run("conntrack", "-C")) < 65 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
    reference = parse_conntrack_S(lab.node_run("conntrack", "-S"))
    count = int(lab.node_run("conntrack", "-C"))
    samples = mon.samples
    assert list(samples.columns) == ["time", "host", "netns", "metric", "value"]
    node_tail = samples[(samples.netns == "node") & (samples.metric == "nf_conntrack_count")].tail(4)
    assert last(samples, "node", "nf_conntrack_count") == count == 65, node_tail.to_string()
    assert last(samples, "node", "expect_count") == expectations_listed(lab) == 40
    for s_name, column in S_TO_STAT.items():
        assert last(samples, "node", f"stat_{column}") == reference[s_name], s_name
    assert last(samples, "client", "nf_conntrack_count") == 0       # no stateful rule there
    assert last(samples, "node", "udp_timeout") == int(lab.node_run(
        "cat", "/proc/sys/net/netfilter/nf_conntrack_udp_timeout"))
    # the count rose while the monitor ran, and it saw that happen
    node_counts = samples[(samples.netns == "node") & (samples.metric == "nf_conntrack_count")]["value"]
    assert node_counts.iloc[0] == 0 and node_counts.max() == 65
    assert set(glob.glob("/tmp/labkit-monitor-agent-*")) <= uploaded    # the agent's file is removed


def test_samples_come_at_the_asked_rate(lab):
    mon = Monitor(lab.hosts(), hz=10, kmsg=False).start()
    time.sleep(2.0)
    mon.stop()
    per_ns = mon.samples.groupby("netns")["time"].nunique()
    assert set(per_ns.index) == {"client", "node"}
    assert all(17 <= n <= 23 for n in per_ns), per_ns.to_dict()


def _dmesg_lines(inode: int, usec_from: int, usec_to: int) -> set[int]:
    out = subprocess.run(["dmesg", "-r"], capture_output=True, text=True, check=True).stdout
    found = set()
    for line in out.splitlines():
        event = parse_dmesg_line(line)
        if event and event.netns_inode == inode and usec_from <= event.usec <= usec_to:
            found.add(event.usec)
    return found


def test_under_pressure_count_pins_at_max_and_drops_are_attributed(lab, tmp_path):
    """Global max lowered for a few seconds: node's count at the max, drops, lines for 'node'."""
    node_inode = lab.inode(lab.node)
    globals_ = GlobalSysctls(f"test-{lab.tag}", directory=tmp_path / "state")
    t0, mono0 = time.time(), time.monotonic()
    with Monitor(lab.hosts(), hz=20) as mon:
        globals_.set({"net.netfilter.nf_conntrack_max": 300, "net.netfilter.nf_conntrack_expect_max": 50},
                     wait=300)
        try:
            lab.send(60, port=69)
            # the kernel's rate limiter (10 lines / 5 s, machine-wide) may be spent: keep
            # the pressure up until both kinds of line got through, at most 12 s
            deadline = time.monotonic() + 12
            while time.monotonic() < deadline:
                lab.send(40, port=5000)
                lab.send(3, port=69)
                kinds = {ev.kind for _, _, ev in mon.new_events() if ev.netns_inode in (node_inode, None)}
                if {TABLE_FULL, EXPECT_TABLE_FULL} <= kinds:
                    break
                time.sleep(0.2)
        finally:
            globals_.restore()
        time.sleep(0.3)
    mono1 = time.monotonic()
    reference = parse_conntrack_S(lab.node_run("conntrack", "-S"))
    samples, events = mon.samples, mon.events

    node = samples[samples.netns == "node"]
    counts = node[node.metric == "nf_conntrack_count"]["value"]
    assert counts.max() == 300                                            # pinned at the max
    assert 300 in set(node[node.metric == "nf_conntrack_max"]["value"])
    assert node[node.metric == "expect_count"]["value"].max() == 50
    assert last(samples, "node", "stat_drop") == reference["drop"] > 0
    assert last(samples, "node", "stat_early_drop") == reference["early_drop"]

    full = events[events.kind == TABLE_FULL]
    assert len(full) >= 1 and set(full.netns) == {"node"}
    assert all(f"in netns {node_inode}," in m for m in full.message)
    # "expectation table full" names no namespace: it goes to the one at its max then
    # (another lab's lines in the same moments would go there too: the kernel cannot tell)
    expect_full = events[events.kind == EXPECT_TABLE_FULL]
    assert "node" in set(expect_full.netns) and "client" not in set(expect_full.netns)
    times = events["time"].astype("int64") / 1e9
    assert times.min() >= t0 - 0.5 and times.max() <= time.time() + 0.5

    # nothing lost between /dev/kmsg and the events table: the same lines as dmesg
    usec0 = int((mono0 - 0.5) * 1e6)
    usec1 = int(mono1 * 1e6)
    seen = {ev.usec for _, _, ev in mon.new_events() if ev.netns_inode == node_inode}
    assert seen == _dmesg_lines(node_inode, usec0, usec1)
    assert mon.lost_kernel_records == 0


def test_cli_writes_tidy_csv_files(lab, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "labkit", "monitor", "--duration", "1.5", "--hz", "10", "--quiet",
           "--netns", f"node={lab.node}", "--netns", f"client={lab.client}", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.8)
    lab.send(30, port=69)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert "wrote" in stdout
    samples = read_samples(out / "samples.csv")
    events = read_events(out / "events.csv")
    assert list(samples.columns) == ["time", "host", "netns", "metric", "value"]
    assert list(events.columns) == ["time", "host", "netns", "kind", "message"]
    assert str(samples["time"].dtype).startswith("datetime64") and samples["time"].dt.tz is not None
    assert last(samples, "node", "nf_conntrack_count") == 30
    assert {"stat_drop", "stat_early_drop", "udp_timeout_stream", "nf_conntrack_expect_max"} <= set(samples.metric)
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


def test_compressed_tables_read_back_the_same(lab, tmp_path):
    with Monitor(lab.hosts(), hz=10, kmsg=False) as mon:
        lab.send(10, port=5000)
    plain, packed = mon.write(tmp_path / "plain"), mon.write(tmp_path / "packed", compress=True)
    assert packed["samples"].name == "samples.csv.gz"
    assert packed["samples"].stat().st_size < plain["samples"].stat().st_size / 4
    assert read_samples(packed["samples"]).equals(read_samples(plain["samples"]))
    assert read_samples(plain["samples"])["value"].tolist() == mon.samples["value"].tolist()


def test_a_missing_namespace_is_refused_at_start():
    need_root()
    from labkit.exceptions import MonitorError
    from labkit.host import NetnsHost

    with pytest.raises(MonitorError, match="lk-does-not-exist"):
        Monitor({"node": NetnsHost("lk-does-not-exist")}, kmsg=False).start()
