"""Background flows on the real kernel: bounded, in their own namespace, gone afterwards,
and they bring the conntrack garbage collector's passes from a minute apart to seconds."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from labkit import background
from labkit.background import BackgroundFlows
from labkit.host import NetnsHost
from labkit.testbed.netns import clean
from tests.conftest import need_program, need_root

pytestmark = pytest.mark.integration


def _count(netns: str) -> int:
    return int(NetnsHost(netns).read_sysctl("net.netfilter.nf_conntrack_count"))


def _namespaces() -> set[str]:
    """The background flows' namespaces on the machine (``lkbg`` names; other lab runs may come
    and go meanwhile on a shared machine)."""
    names = os.listdir("/run/netns") if os.path.isdir("/run/netns") else []
    return {n for n in names if n.startswith("lkbg")}


def test_flows_stay_in_their_namespace_bounded_and_leave_nothing(tmp_path):
    need_root()
    need_program("ip", "iptables", "conntrack")
    before = _namespaces()
    flows = BackgroundFlows(500, directory=tmp_path).start()
    try:
        time.sleep(3.5)
        counts = [_count(flows.netns)]
        for _ in range(10):
            time.sleep(0.13)
            counts.append(_count(flows.netns))
        # every second 500 new flows; the previous second's are deleted first
        assert 0 < max(counts) <= 500 and flows.sent >= 1500, counts
        info = background.running(tmp_path)
        assert info["netns"] == flows.netns and info["pid"] == os.getpid() and info["flows"] == 500
        assert info["warm_at"] == pytest.approx(flows.started + background.WARM_S)
    finally:
        flows.stop()
    assert _namespaces() == before
    assert background.running(tmp_path) is None and list(tmp_path.iterdir()) == []


def test_flows_of_a_killed_process_are_removed_by_clean(tmp_path):
    need_root()
    need_program("ip", "iptables", "conntrack")
    before = _namespaces()
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from labkit.background import "
         "BackgroundFlows; BackgroundFlows(100, directory=Path(sys.argv[1])).start(); print('up', flush=True); "
         "time.sleep(60)", str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "up"
        made = _namespaces() - before
        assert len(made) == 1 and next(iter(made)).startswith("lkbg")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert background.running(tmp_path) is None  # its process is gone
    removed = clean(tmp_path)
    assert any("lkbg" in line for line in removed), removed
    assert _namespaces() == before


def test_ensure_uses_running_flows_instead_of_starting_more(tmp_path):
    need_root()
    need_program("ip", "iptables", "conntrack")
    with BackgroundFlows(50, directory=tmp_path) as flows:
        marker = json.loads(background.marker_path(tmp_path).read_text())
        marker["warm_at"] = time.time() - 1  # pretend warm, so ensure() does not wait
        background.marker_path(tmp_path).write_text(json.dumps(marker))
        before = _namespaces()
        with background.ensure(2000, directory=tmp_path) as info:
            assert info["netns"] == flows.netns and _namespaces() == before
    with background.ensure(0, directory=tmp_path) as info:
        assert info is None


def _gc_passes(probe: str, seconds: float) -> list[float]:
    """Times at which a pass of the garbage collector reaped a 1 s canary in ``probe``."""
    ns = NetnsHost(probe)
    ns.run(["iptables", "-w", "-A", "OUTPUT", "-m", "conntrack", "--ctstate", "NEW", "-j", "ACCEPT"])
    start, passes = time.monotonic(), []
    while time.monotonic() - start < seconds:
        ns.run(["conntrack", "-I", "-p", "udp", "-s", "10.9.0.1", "-d", "10.9.0.2", "--sport", "1",
                "--dport", "2", "-t", "1", "-u", "SEEN_REPLY"])
        while _count(probe) > 0 and time.monotonic() - start < seconds:
            time.sleep(0.05)
        if _count(probe) == 0:
            passes.append(time.monotonic() - start)
    return passes


def test_with_flows_the_garbage_collector_passes_every_few_seconds(tmp_path, netns):
    """Idle, the kernel's passes are up to 60 s apart; warm flows bring them to seconds."""
    need_program("ip", "iptables", "conntrack")
    probe = netns()
    with BackgroundFlows(2000, directory=tmp_path) as flows:
        flows.wait_warm()
        passes = _gc_passes(probe, 30.0)
    gaps = [round(b - a, 1) for a, b in zip(passes, passes[1:])]
    print(f"garbage-collector passes {[round(p, 1) for p in passes]}, gaps {gaps}")
    assert len(passes) >= 3 and statistics.median(gaps) <= 12.0, gaps
