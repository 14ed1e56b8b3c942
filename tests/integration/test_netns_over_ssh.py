"""The netns testbed driven through SSHHost: up, a real load through the NodePort, down.

The machine is this one, reached through the real sshd the SSH tests start, so
every command, file, process and cgroup of the testbed goes over SSH (the state
folder, ledger and servers live "there").  The same iteration and the same kind
of numbers as a local run; afterwards nothing of the run is left: no namespace,
no in.tftpd, no cgroup, the global sysctls as they were.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from labkit.cgroups import cpu_root
from labkit.host import LocalHost
from labkit.scenario import load_scenario
from labkit.sysctls import CLAIM_PATH, GlobalSysctls
from tests.conftest import need_program

pytestmark = pytest.mark.integration

GLOBALS = ("net.netfilter.nf_conntrack_max", "net.netfilter.nf_conntrack_expect_max")


def _globals() -> dict[str, str]:
    return {name: LocalHost().read_sysctl(name) for name in GLOBALS}


def _leftovers(run_id: str) -> list[str]:
    names = [f"namespace {n}" for n in os.listdir("/run/netns") if n.startswith(f"lk{run_id}")] \
        if os.path.isdir("/run/netns") else []
    root, _ = cpu_root()
    names += [f"cgroup {n}" for n in os.listdir(root) if n.startswith(f"lk{run_id}")]
    return names


def test_the_netns_testbed_runs_an_iteration_through_ssh_and_leaves_nothing(sshd, tmp_path):
    need_program("in.tftpd", "conntrack", "iptables", "flock")
    from labkit.run import run_iteration
    from labkit.testbed import get_testbed

    iteration = load_scenario().iteration(2, "quick")
    started = time.monotonic()
    with sshd.ssh_host() as machine:
        testbed = get_testbed("netns", host=machine, state_dir=tmp_path / "state", python=sys.executable,
                              global_wait=300)
        try:
            testbed.up(iteration)
            up_s = time.monotonic() - started
            run_id, status = testbed.run_id, testbed.status()
            assert status["state"] == "up" and status["machine"] == machine.name
            assert type(testbed.host("node")).__name__ == "SSHNetnsHost"
            pid = status["hosts"][2]["pid"]
            # the originals the run saved, on the machine, before it changed them
            saved = GlobalSysctls("test", directory=tmp_path / "state").saved()
            assert set(saved) == set(GLOBALS) and _globals() == {"net.netfilter.nf_conntrack_max": "1024",
                                                                 "net.netfilter.nf_conntrack_expect_max": "128"}
            assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"in.tftpd")
            row = run_iteration(testbed, iteration, tmp_path / "out")
            run_s = time.monotonic() - started - up_s
        finally:
            down_started = time.monotonic()
            testbed.down()
            down_s = time.monotonic() - down_started
        assert testbed.status()["state"] == "down"
    took = time.monotonic() - started
    print(f"\nnetns over SSH: up {up_s:.2f} s (of it waiting for the globals "
          f"{status['last_up']['waited_for_globals_s']:.2f} s), run {run_s:.1f} s, down {down_s:.2f} s, "
          f"in all {took:.1f} s; "
          f"{row['transfers_ok']} transfers ok ({row['transfers_per_s']:.0f}/s), "
          f"{row['transfers_failed']} failed, node peak count {row['peak_node_count']}")
    # the article's iteration 2, as a local run shows it: transfers served, and the node's table
    # (sampled by the monitor's agent over SSH) full at the quick profile's max, dropping
    assert row["transfers_ok"] > 0 and row["transfers_per_s_whole_load"] > 0
    assert row["peak_node_count"] >= 0.9 * row["conntrack_max"] and row["node_drops"] > 0
    assert (tmp_path / "out" / "samples.csv").exists()
    assert _leftovers(run_id) == []
    assert not os.path.exists(f"/proc/{pid}") or b"in.tftpd" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert not (tmp_path / "state" / f"netns-{run_id}").exists()
    try:
        claimant = Path(CLAIM_PATH).read_text()
    except FileNotFoundError:
        claimant = ""
    assert str(tmp_path) not in claimant
    if not claimant:  # (else another lab run holds them by now)
        assert _globals() == saved


def test_the_machine_primitives_over_ssh_act_on_that_machine(sshd, tmp_path):
    with sshd.ssh_host() as machine:
        run = tmp_path / "state" / "netns-abcde"
        machine.makedirs(run)
        with pytest.raises(FileExistsError):
            machine.makedirs(run, exist_ok=False)
        machine.atomic_write(run / "state.json", b'{"state": "up"}', mode=0o600)
        machine.append_file(run / "ledger.jsonl", b"one\n")
        machine.append_file(run / "ledger.jsonl", b"two\n")
        assert (run / "state.json").read_bytes() == b'{"state": "up"}'
        assert oct(os.stat(run / "state.json").st_mode & 0o777) == "0o600"
        assert (run / "ledger.jsonl").read_bytes() == b"one\ntwo\n"
        assert oct(os.stat(run / "ledger.jsonl").st_mode & 0o777) == "0o600"
        assert [(n, d) for n, d, _ in machine.entries(run.parent)] == [("netns-abcde", True)]
        assert machine.exists(run / "state.json") and not machine.exists(run / "nothing")
        pid = machine.spawn(["sleep", "30"], log=str(run / "sleep.log"))
        start = machine.proc_start_time(pid)
        deadline = time.monotonic() + 5  # spawn returns at the fork; the exec of sleep may still be under way
        while Path(f"/proc/{pid}/cmdline").read_bytes() != b"sleep\x0030\x00" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert start is not None and Path(f"/proc/{pid}/cmdline").read_bytes() == b"sleep\x0030\x00"
        assert machine.proc_start_time(pid) == start
        machine.kill(pid)
        deadline = time.monotonic() + 5
        while machine.proc_start_time(pid) == start and time.monotonic() < deadline:
            LocalHost().reap([pid])  # an orphan of the SSH session may come to this process (subreaper)
            time.sleep(0.05)
        assert machine.proc_start_time(pid) is None
        assert machine.own_netns_inode() == os.stat("/proc/self/ns/net").st_ino
        with machine.lock(run):
            pass
        machine.remove(run / "state.json")
        machine.remove(run.parent)
        assert not run.parent.exists()


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


class _DuringTheLoad:
    """A live view of the load (see run_iteration's ``live``) that looks at the machine once the
    load reports progress, and optionally does something to it then."""

    def __init__(self, look, act=None):
        self.look, self.act, self.seen = look, act, None

    def start(self, monitor):
        pass

    def progress(self, totals):
        if self.seen is None and totals.get("started"):
            self.seen = self.look()
            if self.act is not None:
                self.act(self.seen)

    def stop(self):
        pass


def test_background_flows_and_the_loadgens_cgroup_live_on_the_testbeds_machine(sshd, tmp_path):
    """Through SSH: the flows are a process started there (by sshd, not by us), in namespaces there,
    the loadgen runs in a cgroup there; both are gone after the iteration.  Flows that fail during
    the next load (one of their namespaces removed) end that load at once, with their reason."""
    need_program("in.tftpd", "conntrack", "iptables", "flock")
    from labkit.exceptions import TestbedError
    from labkit.run import run_iteration
    from labkit.testbed import get_testbed

    state = tmp_path / "state"
    iteration = dataclasses.replace(load_scenario().iteration(2, "quick"), background_flows=300)
    root, _ = cpu_root()

    def look() -> dict:
        folders = list(state.glob("netns-bg-*"))
        marker = json.loads((folders[0] / "background-flows.json").read_text())
        pid = int(marker["pid"])
        loads = [p for p in root.glob(f"lk{testbed.run_id}-load*")]
        procs = [int(x) for p in loads for x in (p / "cgroup.procs").read_text().split()]
        return {"folders": folders, "marker": marker, "cmdline": _cmdline(pid),
                "environ": Path(f"/proc/{pid}/environ").read_bytes(),
                "namespaces": [n for n in marker["namespaces"] if os.path.exists(f"/run/netns/{n}")],
                "count": int(LocalHost().netns(marker["netns"]).read_sysctl("net.netfilter.nf_conntrack_count")),
                "loads": loads, "loadgens": [p for p in procs if b"loadgen" in _cmdline(p)]}

    started = time.monotonic()
    with sshd.ssh_host() as machine:
        testbed = get_testbed("netns", host=machine, state_dir=state, python=sys.executable, global_wait=300)
        try:
            testbed.up(iteration)
            run_id = testbed.run_id
            probe = _DuringTheLoad(look)
            row = run_iteration(testbed, iteration, tmp_path / "out", wait_warm=False, live=probe)
            seen = probe.seen
            after = {"folders": list(state.glob("netns-bg-*")), "cmdline": _cmdline(seen["marker"]["pid"]),
                     "namespaces": [n for n in seen["marker"]["namespaces"] if os.path.exists(f"/run/netns/{n}")],
                     "loads": [p for p in seen["loads"] if p.exists()]}
            ok_s = time.monotonic() - started

            def break_the_flows(seen):
                subprocess.run(["ip", "netns", "del", seen["marker"]["namespaces"][0]], check=True)
                seen["broken_at"] = time.monotonic()

            failing = _DuringTheLoad(look, break_the_flows)
            with pytest.raises(TestbedError, match="background flows stopped during the load: their namespace "
                                                   "lkbg.* was removed by someone else"):
                run_iteration(testbed, iteration, tmp_path / "out-failed", wait_warm=False, live=failing)
            failed_s = time.monotonic() - failing.seen["broken_at"]
        finally:
            testbed.down()
    print(f"\nflows over SSH: pid {seen['marker']['pid']} in {seen['namespaces']}, count {seen['count']} there "
          f"during the load; loadgen cgroup {[p.name for p in seen['loads']]} held {seen['loadgens']}; "
          f"iteration {ok_s:.1f} s ({row['transfers_ok']} ok); the failing one ended {failed_s:.1f} s after its "
          "flows' namespace was removed")
    # during the load: the flows process, started through sshd, sending in its namespaces there
    assert b"labkit.background" in seen["cmdline"] and b"SSH_CONNECTION=" in seen["environ"]
    assert seen["marker"]["status"] == "running" and seen["marker"]["flows"] == 300
    assert seen["namespaces"] == seen["marker"]["namespaces"] and 0 < seen["count"] <= 300
    assert row["background_flows"] == 300
    # ... and the loadgen in its cgroup there
    assert len(seen["loads"]) == 1 and seen["loadgens"]
    # after the iteration: all of it gone
    assert after == {"folders": [], "cmdline": b"", "namespaces": [], "loads": []}
    # the failing flows ended their load at once (it had most of its 8 s to go) and left nothing either
    assert failed_s < iteration.duration_s - 1
    assert not list(state.glob("netns-bg-*")) and not _cmdline(failing.seen["marker"]["pid"])
    assert not [n for n in failing.seen["marker"]["namespaces"] if os.path.exists(f"/run/netns/{n}")]
    assert not [p for p in failing.seen["loads"] if p.exists()]
    assert _leftovers(run_id) == []
