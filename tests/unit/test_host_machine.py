"""The machine primitives of Host (files, processes) done with commands, as on a host over SSH.

``ShellHost`` is a Host that only knows how to run a command (here, locally): every
primitive then takes the generic path an SSH host takes, one command each.  The
same checks run against LocalHost's native versions, so both behave alike.
"""

import os
import signal
import time

import pytest

from labkit.host import Host, LocalHost, parse_proc_start, run_subprocess


class ShellHost(Host):
    name = "shell"

    def _run(self, cmd, *, timeout, input, env):
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else [str(c) for c in cmd]
        return run_subprocess(argv, " ".join(argv), self.name, timeout=timeout, input=input, env=env)

    def read_file(self, path):
        with open(path, "rb") as f:
            return f.read()

    def write_file(self, path, data, mode=None):
        with open(path, "wb") as f:
            f.write(data)


@pytest.fixture(params=["shell", "local"])
def machine(request):
    return ShellHost() if request.param == "shell" else LocalHost()


def test_folders_files_and_their_listing(machine, tmp_path):
    run = tmp_path / "state" / "netns-abcde"
    assert not machine.exists(run)
    machine.makedirs(run)
    machine.makedirs(run)  # exist_ok by default
    with pytest.raises(FileExistsError):
        machine.makedirs(run, exist_ok=False)
    machine.makedirs(run / "srv", 0o755, exist_ok=False)
    assert oct(os.stat(run / "srv").st_mode & 0o777) == "0o755"
    machine.atomic_write(run / "state.json", b'{"a": 1}', mode=0o600)
    assert (run / "state.json").read_bytes() == b'{"a": 1}'
    assert oct(os.stat(run / "state.json").st_mode & 0o777) == "0o600"
    assert not [p for p in os.listdir(run) if p.endswith(".tmp")]
    machine.append_file(run / "ledger.jsonl", b"one\n")
    machine.append_file(run / "ledger.jsonl", b"two\n")
    assert (run / "ledger.jsonl").read_bytes() == b"one\ntwo\n"
    listing = {name: is_dir for name, is_dir, _ in machine.entries(tmp_path / "state")}
    assert listing == {"netns-abcde": True}
    assert machine.entries(tmp_path / "nothing") == []
    with pytest.raises(OSError):
        machine.rmdir(run)  # not empty
    machine.remove(run)
    machine.remove(run)  # gone: nothing to do
    assert not run.exists()


def test_a_spawned_process_is_detached_known_by_its_start_time_and_killed(machine, tmp_path):
    log = tmp_path / "server.log"
    pid = machine.spawn(["sh", "-c", "echo started >&2; exec sleep 30"], log=str(log))
    try:
        start = machine.proc_start_time(pid)
        assert start is not None and start == parse_proc_start(open(f"/proc/{pid}/stat").read())
        deadline = time.monotonic() + 5
        while b"started" not in log.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert log.read_bytes() == b"started\n"
        assert os.getsid(pid) == pid  # its own session: a signal to ours does not reach it
        assert machine.proc_start_time(pid) == start  # the same process, through its execs
    finally:
        machine.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while machine.proc_start_time(pid) is not None and time.monotonic() < deadline:
        machine.reap([pid])
        LocalHost().reap([pid])  # whichever started it here
        time.sleep(0.01)
    assert machine.proc_start_time(pid) is None
    machine.kill(pid)  # gone: nothing to do


def test_users_programs_and_namespaces(machine):
    assert machine.has_user("root") and not machine.has_user("no-such-user-lk")
    assert machine.which("sh") and not machine.which("no-such-program-lk")
    assert machine.netns_inode("no-such-namespace-lk") is None
    assert machine.own_netns_inode() == os.stat("/proc/self/ns/net").st_ino


def test_a_zombie_has_no_start_time():
    assert parse_proc_start("1 (a b) Z 0 " + "0 " * 30) is None
    assert parse_proc_start("1 (a) b) S " + " ".join(str(i) for i in range(1, 30))) == 19


def test_kill_all_ends_every_process_given_and_skips_those_gone(machine, tmp_path):
    pids = [machine.spawn(["sleep", "30"]) for _ in range(3)]
    machine.kill_all(pids + [pids[0]], signal.SIGKILL)  # one already gone by the time it comes again
    deadline = time.monotonic() + 5
    while any(machine.proc_start_time(p) is not None for p in pids) and time.monotonic() < deadline:
        machine.reap(pids)
        LocalHost().reap(pids)
        time.sleep(0.01)
    assert [machine.proc_start_time(p) for p in pids] == [None, None, None]
    machine.kill_all([], signal.SIGKILL)  # nothing to do
