"""`labkit up/down/clean` leave the machine as they found it: after down, after a signal
during up, and after `clean` following a SIGKILL; what is not the lab's survives `clean`.

These tests drive the real CLI in a child process with its own $LABKIT_STATE_DIR and
change the machine's global conntrack sysctls (through GlobalSysctls, waiting while
another lab run on this machine holds them).  Other test runs share this machine, so
a snapshot comparison ignores only what other runs (``lk`` names not of this run)
made or removed meanwhile; everything else must be identical.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from labkit.host import LocalHost
from labkit.ledger import Ledger
from labkit.testbed.netns import clean, run_dirs
from tests.conftest import need_program, need_root

pytestmark = pytest.mark.integration

MAX = "net.netfilter.nf_conntrack_max"
EXPECT = "net.netfilter.nf_conntrack_expect_max"
WAIT = "180"  # seconds to wait while another lab run holds the global sysctls

LAB_NAMES = ("lk", "labkit-")  # names of lab runs that may come and go meanwhile (netns runs, the vm tier)


@pytest.fixture
def state(tmp_path):
    need_root()
    need_program("ip", "iptables-save", "in.tftpd")
    directory = tmp_path / "state"
    yield directory
    clean(directory)


def labkit(state_dir: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, LABKIT_STATE_DIR=str(state_dir))
    return subprocess.run([sys.executable, "-m", "labkit", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def spawn_up(state_dir: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, LABKIT_STATE_DIR=str(state_dir))
    return subprocess.Popen([sys.executable, "-m", "labkit", "up", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def unclaimed_globals(timeout: float = 300) -> dict:
    """The global sysctls at a moment no lab run holds them (then they are the machine's own).

    Another lab run on this machine may hold them for a while; wait for it, under the
    machine-wide lock GlobalSysctls itself takes.
    """
    from labkit.sysctls import CLAIM_PATH
    host = LocalHost()
    deadline = time.monotonic() + timeout
    while True:
        with open(CLAIM_PATH + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not os.path.exists(CLAIM_PATH):
                return {MAX: host.read_sysctl(MAX), EXPECT: host.read_sysctl(EXPECT)}
        if time.monotonic() > deadline:
            pytest.fail("another lab run held the global sysctls for too long")
        time.sleep(0.2)


def snapshot() -> dict:
    """The machine's namespaces, its own links and iptables rules, and the global sysctls."""
    host = LocalHost()
    rules = host.run(["iptables-save"]).stdout
    return {
        "netns": {line.split()[0] for line in host.run(["ip", "netns", "list"]).stdout.splitlines()},
        "links": {line.split(":")[1].strip().split("@")[0]
                  for line in host.run(["ip", "-o", "link"]).stdout.splitlines()},
        "iptables": [line for line in rules.splitlines() if not line.startswith("#")],
        "globals": unclaimed_globals(),
    }


def assert_same_machine(before: dict, after: dict, run_id: str) -> None:
    """Identical, except for resources of other lab runs that came or went meanwhile (the vm
    tier's ``labkit-vm`` namespace among them: ``make test`` runs it beside the rest)."""
    for key in ("netns", "links"):
        changed = before[key] ^ after[key]
        ours = {n for n in changed if run_id in n}
        others = {n for n in changed if not n.startswith(LAB_NAMES)}
        assert not ours, f"{key} of this run left behind: {ours}"
        assert not others, f"{key} that are not the lab's changed: {others}"
    assert after["iptables"] == before["iptables"]


def many_pods_profile(tmp_path: Path, replicas: int = 6) -> Path:
    """The quick profile with iteration 3 at ``replicas`` pods, so `up` takes long enough to interrupt."""
    raw = yaml.safe_load((Path(__file__).parents[2] / "labkit/data/iterations.yaml").read_text())
    profile = dict(raw["profiles"]["quick"], name="many", iterations={3: {"replicas": replicas}})
    path = tmp_path / "many.yaml"
    path.write_text(yaml.safe_dump(profile))
    return path


def wait_for_pods(state_dir: Path, proc: subprocess.Popen, pods: int, timeout: float = 240) -> tuple[str, dict]:
    """Poll the ledger until ``pods`` pod namespaces are recorded; return the run id and the saved globals."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = run_dirs(state_dir)
        if runs:
            entries = Ledger(runs[0]).entries()
            if sum(1 for e in entries if e["kind"] == "netns" and "-pod" in e["name"]) >= pods:
                saved = json.loads((state_dir / "global-sysctls.json").read_text())["saved"]
                return runs[0].name.split("-", 1)[1], saved
        if proc.poll() is not None:
            pytest.fail(f"labkit up ended before it could be interrupted: {proc.stderr.read()}")
        time.sleep(0.002)
    proc.kill()
    pytest.fail("labkit up did not get to the pods in time (global sysctls held by another run?)")


def test_up_then_down_leaves_the_machine_as_it_was(state):
    before = snapshot()
    up = labkit(state, "up", "--iteration", "2", "--profile", "quick", "--wait", WAIT, "--json")
    assert up.returncode == 0, up.stderr
    status = json.loads(up.stdout)
    run_id = status["run_id"]
    assert status["service"]["node_port"] == 30069 and status["state"] == "up"
    saved = json.loads((state / "global-sysctls.json").read_text())["saved"]
    assert LocalHost().read_sysctl(MAX) == "1024" and LocalHost().read_sysctl(EXPECT) == "128"
    assert json.loads(labkit(state, "status", "--json").stdout)["run_id"] == run_id
    down = labkit(state, "down")
    after = snapshot()
    assert down.returncode == 0, down.stderr
    assert after["globals"] == saved
    assert_same_machine(before, after, run_id)
    assert labkit(state, "down").returncode == 0  # idempotent
    assert json.loads(labkit(state, "status", "--json").stdout)["state"] == "down"
    assert not run_dirs(state)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_up_leaves_nothing(state, tmp_path, signum):
    before = snapshot()
    proc = spawn_up(state, "--iteration", "3", "--profile", str(many_pods_profile(tmp_path)), "--wait", WAIT)
    run_id, saved = wait_for_pods(state, proc, 2)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    after = snapshot()
    assert proc.returncode == 128 + signum, err  # 143 for SIGTERM, as a shell reports it
    assert after["globals"] == saved
    assert_same_machine(before, after, run_id)
    assert not run_dirs(state) and not (state / "global-sysctls.json").exists()
    assert not [p for p in Path("/sys/fs/cgroup").glob(f"*/lk{run_id}-*")]


def test_clean_after_a_sigkill_restores_everything_and_spares_look_alikes(state, tmp_path):
    before = snapshot()
    proc = spawn_up(state, "--iteration", "3", "--profile", str(many_pods_profile(tmp_path)), "--wait", WAIT)
    run_id, saved = wait_for_pods(state, proc, 3)
    proc.kill()
    proc.communicate()
    host = LocalHost()
    entries = Ledger(run_dirs(state)[0]).entries()
    servers = [(e["pid"], e["start"]) for e in entries if e["kind"] == "process" and e.get("pid")]
    assert servers and f"lk{run_id}-node" in host.run(["ip", "netns", "list"]).stdout  # left behind
    refused = labkit(state, "up", "--iteration", "1", "--profile", "quick")
    assert refused.returncode == 1 and "labkit clean" in refused.stderr
    assert json.loads(labkit(state, "status", "--json").stdout)["state"] == "broken"
    # Someone else's look-alikes: same prefix and run id, not in the ledger.
    look_alike = f"lk{run_id}-pod99"
    host.run(["ip", "netns", "add", look_alike])
    try:
        host.run(["ip", "-n", look_alike, "link", "add", f"lk{run_id}v99", "type", "veth",
                  "peer", "name", f"lk{run_id}e99"])
        res = labkit(state, "clean")
        assert res.returncode == 0, res.stderr
        assert "removed netns" in res.stdout
        after = snapshot()
        assert after["globals"] == saved
        assert look_alike in after["netns"]
        assert f"lk{run_id}v99" in host.run(["ip", "-n", look_alike, "-o", "link"]).stdout
        after["netns"].discard(look_alike)
        assert_same_machine(before, after, run_id)
        from labkit.ledger import proc_start_time
        assert all(proc_start_time(pid) != start for pid, start in servers)  # in.tftpd ended
        assert not [p for p in Path("/sys/fs/cgroup").glob(f"*/lk{run_id}-*")]
        assert labkit(state, "clean").stdout.strip().endswith("nothing of labkit's was left")
    finally:
        host.run(["ip", "netns", "del", look_alike], check=False)


def test_down_spares_a_namespace_someone_else_recreated_under_the_same_name(state, monkeypatch):
    from labkit.scenario import load_scenario, with_overrides
    from labkit.testbed import get_testbed
    monkeypatch.setenv("LABKIT_STATE_DIR", str(state))
    it = load_scenario().iteration(2, "quick")
    tb = get_testbed("netns")
    tb.up(with_overrides(it, node_sysctls=it.namespaced_node_sysctls))
    name = tb.ns("client")
    host = LocalHost()
    host.run(["ip", "netns", "del", name])
    host.run(["ip", "netns", "add", name])  # not ours any more: another inode
    try:
        tb.down()
        assert name in host.run(["ip", "netns", "list"]).stdout
    finally:
        host.run(["ip", "netns", "del", name], check=False)


@pytest.mark.parametrize("iteration", [1, 3, 9])
def test_labkit_up_takes_under_five_seconds(state, iteration):
    start = time.monotonic()
    res = labkit(state, "up", "--iteration", str(iteration), "--profile", "quick", "--wait", WAIT, "--json")
    took = time.monotonic() - start
    labkit(state, "down")
    assert res.returncode == 0, res.stderr
    # Time spent waiting for another lab run to give the global sysctls back is not ours.
    waited = json.loads(res.stdout)["last_up"]["waited_for_globals_s"]
    assert took - waited < 5.0, f"labkit up --iteration {iteration} took {took:.2f} s ({waited:.1f} s waiting)"


def test_exec_runs_a_command_as_a_role(state):
    assert labkit(state, "up", "--iteration", "1", "--profile", "quick").returncode == 0
    try:
        client = labkit(state, "exec", "client", "--", "ip", "-br", "addr")
        assert client.returncode == 0 and "10.69.0.2/24" in client.stdout
        node = labkit(state, "exec", "node", "--", "cat", "/proc/sys/net/ipv4/ip_forward")
        assert node.stdout.strip() == "1"
        assert labkit(state, "exec", "client", "--", "false").returncode == 1
        missing = labkit(state, "exec", "pod-1", "--", "true")
        assert missing.returncode == 1 and "roles: init, node, client" in missing.stderr
        status = labkit(state, "status")
        assert status.returncode == 0 and "iteration 1" in status.stdout and "10.69.0.1:69" in status.stdout
    finally:
        labkit(state, "down")


def test_a_reconfiguration_refused_for_held_globals_keeps_the_testbed_running(state, tmp_path, monkeypatch):
    from labkit.exceptions import GlobalSysctlsHeld
    from labkit.scenario import load_scenario
    from labkit.sysctls import GlobalSysctls
    from labkit.testbed import get_testbed
    monkeypatch.setenv("LABKIT_STATE_DIR", str(state))
    scenario = load_scenario()
    tb = get_testbed("netns", global_wait=0.5)
    tb.up(scenario.iteration(1, "quick"))
    other = GlobalSysctls("someone-else", directory=tmp_path / "other")
    other.set({EXPECT: int(LocalHost().read_sysctl(EXPECT))}, wait=300)  # held, value unchanged
    try:
        with pytest.raises(GlobalSysctlsHeld):
            tb.up(scenario.iteration(2, "quick"))
        assert tb.status()["state"] == "up" and tb.status()["iteration"] == 1
        assert tb.service == ("10.69.0.1", 69)
    finally:
        other.restore()
    tb.down()
