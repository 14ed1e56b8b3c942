"""Background flows: where they run, what they refuse, how a failure reaches the load (no kernel needed)."""

import json
import os
import signal
import struct
import threading
import time

from types import SimpleNamespace

import pytest

from labkit import background
from labkit.background import BackgroundFlows, running
from labkit.run import background_flows


def test_flows_run_on_a_netns_testbeds_machine_and_not_beside_a_cluster(tmp_path, monkeypatch):
    from labkit.prepare import build_testbed
    from labkit.testbed.cluster import ClusterTestbed
    from labkit.testbed.netns import NetnsTestbed

    monkeypatch.setenv("LABKIT_STATE_DIR", str(tmp_path))
    it = SimpleNamespace(background_flows=2000)
    local = build_testbed("netns")  # namespaces of this machine: the flows share its collector
    remote = ClusterTestbed.__new__(ClusterTestbed)  # a cluster's node: labkit does not run processes there
    assert background_flows(local, it) == 2000
    assert background_flows(remote, it) == 0
    assert background_flows(local, SimpleNamespace(background_flows=0)) == 0
    over_ssh = NetnsTestbed.__new__(NetnsTestbed)  # a netns testbed on another machine: its flows run there
    over_ssh.machine, over_ssh.state_dir, over_ssh.python = _Remote(), tmp_path / "there", "python3"
    assert not over_ssh.is_local and background_flows(over_ssh, it) == 2000
    where = over_ssh.node_machine()
    assert (where.host, where.state_dir, where.python) == (over_ssh.machine, tmp_path / "there", "python3")


class _Remote:
    name, is_local = "root@lab", False


def test_zero_flows_are_refused_naming_the_value(tmp_path):
    with pytest.raises(ValueError, match="background flows: 0 flows per second"):
        BackgroundFlows(0, directory=tmp_path)


def _marker(folder, pid=None, status="running", error=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "background-flows.json").write_text(json.dumps(
        {"pid": pid or os.getpid(), "folder": str(folder), "netns": "lkbgx0", "namespaces": ["lkbgx0"],
         "flows": 10, "started": 0, "warm_at": 0, "status": status, "error": error}))
    return folder


def test_a_marker_of_a_dead_process_is_not_running_and_says_so(tmp_path):
    folder = _marker(tmp_path / "netns-bg-dead", pid=999999999)
    assert running(folder) is None
    assert background.failure(folder) == "their process (pid 999999999) has ended without a word"
    (folder / "flows.log").write_text("Traceback ...\nModuleNotFoundError: No module named 'labkit'\n")
    assert background.failure(folder).endswith("has ended: ModuleNotFoundError: No module named 'labkit'")
    (folder / "background-flows.json").write_text("not json")
    assert running(folder) is None and "cannot be read" in background.failure(folder)


def test_flows_are_spread_so_no_namespace_nears_a_small_max(tmp_path):
    assert len(BackgroundFlows(2000, directory=tmp_path).namespaces) == 8
    assert len(BackgroundFlows(100, directory=tmp_path).namespaces) == 1
    assert len(set(BackgroundFlows(501, directory=tmp_path).namespaces)) == 3


def _failed_marker(folder, error="OSError: [Errno 19] No such device"):
    return _marker(folder, status="failed", error=error)


def test_a_failed_marker_is_not_running_and_says_why(tmp_path):
    folder = _failed_marker(tmp_path / "netns-bg-x")
    assert running(folder) is None
    assert background.failure(folder) == "OSError: [Errno 19] No such device"
    assert background.failure(json.loads((folder / "background-flows.json").read_text())) == \
        "OSError: [Errno 19] No such device"  # a marker names its folder


def test_an_iteration_relying_on_failed_flows_fails_with_their_reason_instead_of_starting_its_own(tmp_path):
    from labkit.exceptions import TestbedError

    folder = _failed_marker(tmp_path / "netns-bg-x")
    with pytest.raises(TestbedError, match="background flows of this run stopped: OSError.*No such device"):
        with background.ensure(2000, directory=tmp_path, use=folder):
            pass  # pragma: no cover - must not be reached


class _OwnFlows:
    made: list = []

    def __init__(self, flows, **where):
        self.flows, self.where, self.stopped, self.error = flows, where, False, None
        _OwnFlows.made.append(self)

    def start(self):
        return self

    def wait_warm(self, on_wait=None):
        return 0.0

    @property
    def info(self):
        return {"flows": self.flows, "folder": "own"}

    def check(self):
        pass

    def stop(self):
        self.stopped = True


def test_a_run_uses_only_flows_it_is_given_never_another_runs(tmp_path, monkeypatch):
    """Another run's flows on the machine, failed or running, neither serve nor fail this run."""
    _failed_marker(tmp_path / "netns-bg-other")  # e.g. a test that made its own flows fail
    _marker(tmp_path / "netns-bg-runs")
    _OwnFlows.made = []
    monkeypatch.setattr(background, "BackgroundFlows", _OwnFlows)
    with background.ensure(300, directory=tmp_path) as info:
        assert info == {"flows": 300, "folder": "own"}
    assert len(_OwnFlows.made) == 1 and _OwnFlows.made[0].stopped
    assert _OwnFlows.made[0].where["directory"] == tmp_path
    with background.ensure(300, directory=tmp_path, use=tmp_path / "netns-bg-runs", wait=False) as info:
        assert info["folder"] == str(tmp_path / "netns-bg-runs")  # the caller's own, passed on
    assert len(_OwnFlows.made) == 1
    assert background.find(tmp_path) in (tmp_path / "netns-bg-other", tmp_path / "netns-bg-runs")
    assert background.find(tmp_path / "nothing-here") is None


def test_a_flows_process_that_cannot_start_says_why(tmp_path, monkeypatch):
    """E.g. the machine's python cannot import labkit: the error names what it said, nothing is left."""
    from labkit.exceptions import TestbedError

    monkeypatch.setattr(background, "LAUNCH", ("-c", "import sys; sys.exit('No module named labkit (here)')"))
    flows = BackgroundFlows(10, directory=tmp_path)
    began = time.monotonic()
    with pytest.raises(TestbedError, match=r"background flows on .* did not start: No module named labkit \(here\)"):
        flows.start()
    assert time.monotonic() - began < 10 and list(tmp_path.iterdir()) == []


def test_watch_stops_the_block_when_the_flows_fail(tmp_path, monkeypatch):
    from labkit.exceptions import TestbedError

    monkeypatch.setattr(background, "WATCH_EVERY_S", 0.02)
    folder = _marker(tmp_path / "netns-bg-x")
    seen = []
    with pytest.raises(TestbedError, match="stopped during the load: OSError.*No such device"):
        with background.watch({"folder": str(folder)}, on_failure=seen.append):
            time.sleep(0.2)
            _failed_marker(folder)
            time.sleep(0.5)
    assert seen == ["OSError: [Errno 19] No such device"]


def test_watch_ends_a_blocking_load_at_once_by_interrupting_the_main_thread(tmp_path, monkeypatch):
    from labkit.exceptions import TestbedError

    monkeypatch.setattr(background, "WATCH_EVERY_S", 0.02)
    folder = _marker(tmp_path / "netns-bg-x")
    threading.Timer(0.2, _failed_marker, args=(folder,)).start()
    began = time.monotonic()
    with pytest.raises(TestbedError, match="No such device"):
        with background.watch({"folder": str(folder)}):
            time.sleep(30)  # a load: ends by the watcher's SIGINT, not by itself
    assert time.monotonic() - began < 5


@pytest.mark.parametrize("inherited", [signal.SIG_IGN, signal.SIG_DFL], ids=["ignored", "default"])
def test_watch_ends_the_load_when_sigint_was_inherited_ignored_or_default(tmp_path, monkeypatch, inherited):
    """``nohup labkit replay &`` starts with SIGINT ignored: the flows' failure still ends the load at once
    (and with SIGINT at its default, the watcher's interrupt does not kill the process)."""
    from labkit.exceptions import TestbedError

    monkeypatch.setattr(background, "WATCH_EVERY_S", 0.02)
    folder = _marker(tmp_path / "netns-bg-x")
    old = signal.signal(signal.SIGINT, inherited)
    try:
        threading.Timer(0.2, _failed_marker, args=(folder,)).start()
        began = time.monotonic()
        with pytest.raises(TestbedError, match="No such device"):
            with background.watch({"folder": str(folder)}):
                time.sleep(30)
        assert time.monotonic() - began < 5
        assert signal.getsignal(signal.SIGINT) == inherited  # given back as it was
    finally:
        signal.signal(signal.SIGINT, old)


def test_the_flows_process_refuses_a_bad_command_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        background.main(["--flows", "0", "--folder", str(tmp_path / "netns-bg-x")])
    assert "at least 1 flow" in capsys.readouterr().err


class _Netlink:
    def __init__(self, code):
        self.code, self.sent = code, []

    def send(self, data):
        self.sent.append(data)

    def recv(self, size):
        return struct.pack("=LHHLL", 36, 2, 0, 1, 0) + struct.pack("=i", self.code) + self.sent[-1][:16]


def test_flush_sends_one_ctnetlink_delete_and_raises_the_kernels_refusal():
    ok = _Netlink(0)
    background.flush_table(ok)
    length, kind, flags = struct.unpack_from("=LHH", ok.sent[0])
    assert (length, kind, flags) == (20, 0x102, 5) and len(ok.sent[0]) == 20
    with pytest.raises(OSError, match="Operation not permitted"):
        background.flush_table(_Netlink(-1))


def test_a_namespace_never_sends_more_than_a_share_of_the_global_max_in_force():
    """The lab VM's derived profile sets nf_conntrack_max 64: 250 flows in one namespace filled its
    table and the sender died on EPERM (iterations 3 and 4 failed). Fewer flows, never a full table."""
    from labkit.background import MAX_SHARE, PER_NAMESPACE, per_namespace

    assert per_namespace(PER_NAMESPACE, 262144) == PER_NAMESPACE
    assert per_namespace(PER_NAMESPACE, 64) == int(64 * MAX_SHARE) < 64
    assert per_namespace(PER_NAMESPACE, 1) == 1  # at least one: the listing still runs
    assert per_namespace(7, 64) == 7


def test_a_table_filled_by_a_max_lowered_mid_burst_drops_the_rest_of_that_burst_not_the_flows(monkeypatch, tmp_path):
    """The lab sets the global max per iteration while the flows run: a burst sent under the old max
    meets a full table (EPERM). Seen in the lab VM, where it failed iterations 3-5: now the sender
    goes on with the next second."""
    class FullAfter:
        def __init__(self, room):
            self.room, self.sent, self.tries = room, 0, 0

        def sendto(self, data, target):
            self.tries += 1
            if self.sent >= self.room:
                raise PermissionError(1, "Operation not permitted")
            self.sent += 1

        def close(self):
            pass

    monkeypatch.setattr(background, "flush_table", lambda sock: None)
    monkeypatch.setattr(background, "dump_table", lambda sock: 0)
    monkeypatch.setattr(background, "_global_max", lambda: 262144)
    folder = tmp_path / f"{background.DIR_PREFIX}abcde"
    folder.mkdir()
    (folder / background.LEASE_NAME).write_text("")
    sender = background._Sender(40, folder, warm_s=0.0, lease_s=60.0)
    sender.namespaces = []  # (no namespaces to look for: fake sockets)
    udp, errors = FullAfter(room=3), []

    def loop():
        try:
            sender._loop([(udp, FullAfter(0))])
        except Exception as exc:  # (what would end the flows)
            errors.append(exc)

    thread = threading.Thread(target=loop)
    thread.start()
    deadline = time.monotonic() + 5  # two seconds' bursts: 3 sent + 1 refused, then 1 refused
    while udp.tries < 5 and not errors and time.monotonic() < deadline:
        time.sleep(0.01)
    sender.halt.set()
    thread.join(5)
    assert errors == [] and udp.sent == 3 and udp.tries == 5

def test_on_another_machine_the_flows_state_is_read_with_one_command(tmp_path):
    """A host that only runs commands (as SSHHost's threads must: its SFTP session is not theirs)."""
    from labkit.ledger import proc_start_time
    from tests.unit.test_host_machine import ShellHost

    class There(ShellHost):
        commands = []

        def _run(self, cmd, **kw):
            There.commands.append(cmd)
            return super()._run(cmd, **kw)

        def read_file(self, path):
            raise AssertionError("read through a command, not a file session")

    folder = tmp_path / "netns-bg-there"
    assert background.state(folder, There())[1].startswith("they are no longer running")
    _marker(folder)
    marker = json.loads((folder / "background-flows.json").read_text())
    marker["start"] = proc_start_time(os.getpid())
    (folder / "background-flows.json").write_text(json.dumps(marker))
    assert background.running(folder, There())["pid"] == os.getpid()
    marker["start"] += 1  # the pid now belongs to another process: they have ended
    (folder / "background-flows.json").write_text(json.dumps(marker))
    (folder / "flows.log").write_text("started\nOSError: the kernel said no\n")
    assert background.failure(folder, There()) == f"their process (pid {os.getpid()}) has ended: " \
                                                  "OSError: the kernel said no"
    assert len(There.commands) == 3
