"""Background flows on the real kernel: bounded, in their own namespace, gone afterwards,
and they bring the conntrack garbage collector's passes from a minute apart to seconds."""

from __future__ import annotations

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
from labkit.cleanup import clean as clean_report
from labkit.host import LocalHost, NetnsHost
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


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_flows_are_a_process_of_their_own_bounded_in_their_namespace_and_leave_nothing(tmp_path):
    need_root()
    need_program("ip", "iptables", "conntrack")
    before = _namespaces()
    flows = BackgroundFlows(500, directory=tmp_path).start()
    try:
        assert flows.pid != os.getpid() and "labkit.background" in _cmdline(flows.pid)
        time.sleep(3.5)
        counts = [_count(flows.netns)]
        for _ in range(10):
            time.sleep(0.13)
            counts.append(_count(flows.netns))
        # every second 500 new flows; the previous second's are deleted first
        assert 0 < max(counts) <= 500, counts
        info = background.running(flows)
        assert info["netns"] == flows.netns and info["pid"] == flows.pid and info["flows"] == 500
        assert info["warm_at"] == pytest.approx(flows.started + background.WARM_S)
        assert flows.folder.parent == tmp_path and flows.folder.name.startswith("netns-bg-")
    finally:
        flows.stop()
    assert _namespaces() == before
    assert _cmdline(flows.pid) == "" and list(tmp_path.iterdir()) == []


def test_flows_whose_process_was_killed_are_removed_by_clean(tmp_path):
    need_root()
    need_program("ip", "iptables", "conntrack")
    before = _namespaces()
    flows = BackgroundFlows(100, directory=tmp_path).start()
    made = _namespaces() - before
    assert len(made) == 1 and next(iter(made)).startswith("lkbg")
    assert "running (pid" in " ".join(clean_report(tmp_path).kept)  # alive: `labkit clean` leaves them
    os.kill(flows.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while background.running(flows) is not None and time.monotonic() < deadline:
        LocalHost().reap([flows.pid])
        time.sleep(0.05)
    assert background.running(flows) is None and "has ended" in background.failure(flows)
    removed = clean(tmp_path)
    assert any("lkbg" in line for line in removed), removed
    assert _namespaces() == before and not flows.folder.exists()
    # the owner's lease thread notices the folder is gone and ends (no warning each renewal)
    flows._renewer.join(background.RENEW_S + 5)
    assert not flows._renewer.is_alive()
    flows.stop()


def test_flows_end_by_themselves_when_their_owner_is_gone(tmp_path):
    """A crashed replay leaves no flows running: they stop renewing their lease, and end."""
    need_root()
    need_program("ip", "iptables", "conntrack")
    before = _namespaces()
    owner = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from labkit import background as b; b.LEASE_S, b.RENEW_S = 2.0, "
         "0.5; f = b.BackgroundFlows(100, directory=sys.argv[1]).start(); print(f.pid, flush=True); time.sleep(60)",
         str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(owner.stdout.readline())
        assert "labkit.background" in _cmdline(pid) and len(_namespaces() - before) == 1
        time.sleep(3)  # renewed meanwhile: still running
        assert "labkit.background" in _cmdline(pid)
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    deadline = time.monotonic() + 10
    while _cmdline(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _cmdline(pid) == "" and _namespaces() == before and list(tmp_path.iterdir()) == []


def test_a_run_uses_the_flows_it_is_given_and_never_another_runs(tmp_path):
    need_root()
    need_program("ip", "iptables", "conntrack")
    with BackgroundFlows(50, directory=tmp_path, warm_s=0) as flows:
        before = _namespaces()
        with background.ensure(2000, directory=tmp_path, use=flows) as info:
            assert info["netns"] == flows.netns and _namespaces() == before
        # without them, a run starts its own beside them (and stops only those)
        with background.ensure(50, directory=tmp_path, wait=False) as info:
            assert info["netns"] != flows.netns and len(_namespaces() - before) == 1
        assert _namespaces() == before and background.running(flows) is not None
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
