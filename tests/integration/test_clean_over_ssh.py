"""``labkit clean`` and a replay's teardown on a machine reached over SSH.

The machine is this one, reached through the real sshd the SSH tests start: the
testbed's state folder, ledger, servers, cgroups and saved global sysctls are "there",
and everything that removes them goes through the SSH host.  A remote netns testbed
left as a crash leaves it (the process that brought it up killed with SIGKILL, the
testbed up, background-flow leftovers beside it) is removed by
``clean(host=that machine)``; a replay run's testbed, abandoned by its notebook, is
removed by its ``teardown()``.  Afterwards nothing of the runs is left and the global
sysctls are as they were.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from labkit.cgroups import cpu_root
from labkit.host import LocalHost
from labkit.sysctls import CLAIM_PATH, GlobalSysctls
from tests.conftest import need_program

pytestmark = pytest.mark.integration

GLOBALS = ("net.netfilter.nf_conntrack_max", "net.netfilter.nf_conntrack_expect_max")
REPO = Path(__file__).resolve().parents[2]


def _globals() -> dict[str, str]:
    return {name: LocalHost().read_sysctl(name) for name in GLOBALS}


def _leftovers(prefix: str) -> list[str]:
    names = [f"namespace {n}" for n in os.listdir("/run/netns") if n.startswith(prefix)] \
        if os.path.isdir("/run/netns") else []
    root, _ = cpu_root()
    names += [f"cgroup {n}" for n in os.listdir(root) if n.startswith(prefix)]
    return names


def _servers(pids) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"in.tftpd"):
                alive.append(pid)
        except OSError:
            pass
    return alive


def _released(state: Path, saved: dict[str, str]) -> None:
    """The saved originals are back (unless another lab run holds the globals by now)."""
    try:
        claimant = Path(CLAIM_PATH).read_text()
    except FileNotFoundError:
        claimant = ""
    assert str(state) not in claimant
    if not claimant:
        assert _globals() == saved


UP_AND_DIE = """
import json, os, signal, sys
from labkit.remote import SSHHost
from labkit.scenario import load_scenario
from labkit.testbed import get_testbed
host, port, user, key, known, state = sys.argv[1:]
machine = SSHHost(host, port=int(port), username=user, key_filename=key, known_hosts=known, connect_timeout=5)
testbed = get_testbed("netns", host=machine, state_dir=state, python=sys.executable, global_wait=300)
testbed.up(load_scenario().iteration(3, "quick"))
print(json.dumps(testbed.status()), flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # a crash: nothing of the run is taken down
"""


def test_clean_on_a_machine_removes_a_crashed_remote_testbed_and_restores_its_globals(sshd, tmp_path):
    need_program("in.tftpd", "conntrack", "iptables", "flock")
    from labkit.cleanup import clean
    from labkit.testbed import get_testbed

    state = tmp_path / "state"
    known = tmp_path / "known_hosts"
    known.write_text(sshd.known_hosts_line())
    started = time.monotonic()
    crashed = subprocess.run([sys.executable, "-c", textwrap.dedent(UP_AND_DIE), sshd.host, str(sshd.port),
                              sshd.user, str(sshd.user_key), str(known), str(state)],
                             cwd=REPO, capture_output=True, text=True, timeout=600)
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    status = json.loads(crashed.stdout.splitlines()[-1])
    up_s = time.monotonic() - started
    run_id, pids = status["run_id"], [h["pid"] for h in status["hosts"] if h["role"] == "pod"]
    saved = GlobalSysctls("test", directory=state).saved()
    with sshd.ssh_host() as machine:
        # what the crash left, as `labkit status` reads it through that machine
        left = get_testbed("netns", host=machine, state_dir=state).status()
        assert (left["state"], left["run_id"], left["machine"]) == ("up", run_id, machine.name)
        assert len(_servers(pids)) == 3 and len(_leftovers(f"lk{run_id}-")) == 5 + 3  # namespaces, cgroups
        assert set(saved) == set(GLOBALS) and _globals()["net.netfilter.nf_conntrack_max"] == "1024"
        # background flows of a dead process beside it: their namespace, folder and marker
        bg = state / "netns-bg-zq7"
        machine.makedirs(bg)
        from labkit.ledger import Ledger
        ident = Ledger(bg, host=machine).record("netns", name="lkbgzq70")
        machine.run(["ip", "netns", "add", "lkbgzq70"])
        Ledger(bg, host=machine).note(ident, inode=machine.netns_inode("lkbgzq70"))
        machine.atomic_write(state / "background-flows.json",
                             json.dumps({"pid": 2 ** 22 + 7, "start": 1, "netns": "lkbgzq70"}).encode())
        clean_started = time.monotonic()
        report = clean(state, host=machine)
        clean_s = time.monotonic() - clean_started
        assert not report.problems and not report.kept, report
        assert get_testbed("netns", host=machine, state_dir=state).status()["state"] == "down"
    print(f"\ncrashed remote testbed: up (in a process then killed) {up_s:.1f} s, clean over SSH {clean_s:.2f} s, "
          f"{len(report.removed)} items removed")
    assert any(line.startswith("netns lkbgzq70") for line in report.removed)
    assert _leftovers(f"lk{run_id}-") == [] and _leftovers("lkbgzq70") == []
    assert _servers(pids) == []
    assert sorted(os.listdir(state)) == []  # runs, marker, saved sysctls: all gone
    _released(state, saved)


def test_a_replay_runs_testbed_on_a_machine_is_torn_down_there(sshd, tmp_path, monkeypatch):
    need_program("in.tftpd", "conntrack", "iptables", "flock")
    from labkit.results import replay_state_dir
    from labkit.scenario import load_scenario
    from labkit.testbed.netns import NetnsTestbed

    monkeypatch.setenv("LABKIT_STATE_DIR", str(tmp_path / "state"))
    folder = replay_state_dir("rp1")
    iteration = load_scenario().iteration(2, "quick")
    with sshd.ssh_host() as machine:
        testbed = NetnsTestbed.for_replay("rp1", host=machine, python=sys.executable, global_wait=300)
        assert testbed.state_dir == folder
        testbed.up(iteration)  # the notebook then fails: nothing takes it down
        run_id, pid = testbed.run_id, testbed.status()["hosts"][2]["pid"]
        saved = GlobalSysctls("test", directory=folder).saved()
        assert _servers([pid]) == [pid] and set(saved) == set(GLOBALS)
    started = time.monotonic()
    with sshd.ssh_host() as machine:  # the driver's teardown, with a testbed of its own
        removed = NetnsTestbed.for_replay("rp1", host=machine).teardown()
        took = time.monotonic() - started
    print(f"\nreplay teardown over SSH: {took:.2f} s, {len(removed)} items removed")
    assert any(line.startswith(f"netns lk{run_id}-node") for line in removed)
    assert _leftovers(f"lk{run_id}-") == [] and _servers([pid]) == []
    assert not folder.exists()
    _released(folder, saved)
