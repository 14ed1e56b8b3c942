"""SSHHost against a real OpenSSH server that the tests start on loopback."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import paramiko
import pytest

from labkit.exceptions import CommandFailed, CommandTimedOut, HostKeyError, SSHError, SysctlError
from labkit.host import LocalHost, NetnsHost
from tests.conftest import unique_name
from tests.integration.conftest import keygen

pytestmark = pytest.mark.integration

UDP_TIMEOUT = "net.netfilter.nf_conntrack_udp_timeout"
MIB = 1024 * 1024


def _gone(pattern: str, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if subprocess.run(["pgrep", "-f", pattern], capture_output=True).returncode != 0:
            return True
        time.sleep(0.1)
    return False


def test_runs_a_command_and_keeps_its_exit_code(sshd):
    with sshd.ssh_host() as host:
        ok = host.run(["uname", "-s"])
        assert ok.stdout.strip() == "Linux" and ok.ok and ok.host == host.name
        failed = host.run("echo oops >&2; exit 3", check=False)
        assert (failed.exit_code, failed.stderr.strip()) == (3, "oops")
        with pytest.raises(CommandFailed, match="exit code 3"):
            host.run("exit 3")


def test_connects_lazily_and_reuses_one_connection(sshd):
    host = sshd.ssh_host()
    assert not host.connected
    host.run("true")
    transport = host.connect()
    host.run("true")
    assert host.connect() is transport
    host.close()
    assert not host.connected


def test_input_and_environment_reach_the_command(sshd):
    with sshd.ssh_host() as host:
        r = host.run('cat; printf "%s" "$LK_WHO"', input="from stdin\n", env={"LK_WHO": "me too"})
        assert r.stdout == "from stdin\nme too"


def test_ten_mib_on_both_streams_completes(sshd):
    # stderr first, then stdout: a reader that waits on one stream alone deadlocks here
    cmd = f"yes e | head -c {10 * MIB} >&2; yes o | head -c {10 * MIB}"
    with sshd.ssh_host() as host:
        start = time.monotonic()
        r = host.run(cmd, timeout=120)
        assert len(r.stdout) == 10 * MIB and len(r.stderr) == 10 * MIB
        assert set(r.stdout) == {"o", "\n"} and set(r.stderr) == {"e", "\n"}
        assert time.monotonic() - start < 60


def test_a_deadline_ends_a_hung_command_and_its_process(sshd):
    marker = f"{1000 + os.getpid() % 1000}.{time.time_ns() % 10**6}"
    with sshd.ssh_host() as host:
        start = time.monotonic()
        with pytest.raises(CommandTimedOut) as info:
            host.run(f"echo started; sleep {marker}; echo never", timeout=1.5)
        took = time.monotonic() - start
        assert 1.4 < took < 4, took
        assert info.value.stdout.strip() == "started"
        assert host.name in str(info.value)
        # the remote process group is ended too, not left sleeping
        assert _gone(f"sleep {marker}", within=8), f"sleep {marker} still runs"
        assert host.run("echo still usable").stdout.strip() == "still usable"


def test_commands_share_one_agent_process_and_plain_channels_remain_possible(sshd):
    with sshd.ssh_host() as host:
        parents = {host.run("echo $PPID").stdout.strip() for _ in range(3)}
        agent = host.executor.agent()
        assert parents == {str(agent.pid)}  # one process started every command: no login each
        assert "python" in Path(f"/proc/{agent.pid}/cmdline").read_text()
    assert _wait_gone(agent.pid)  # closing the host ends its agent
    with sshd.ssh_host(agent=False) as host:
        parents = {host.run("echo $PPID").stdout.strip() for _ in range(3)}
        assert len(parents) == 3 and host.executor.agent() is None  # a session each


def _wait_gone(pid: int, within: float = 8) -> bool:
    deadline = time.monotonic() + within
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.1)
    return not os.path.exists(f"/proc/{pid}")


def test_a_machine_that_cannot_run_the_agent_gets_a_channel_per_command(sshd, tmp_path, caplog):
    remote = str(sshd.dir / f"{unique_name()}.txt")
    with sshd.ssh_host() as host:
        host.executor.agent_python = "/no/such/python3"
        with caplog.at_level("INFO", logger="labkit.remote.executor"):
            assert host.run("echo $LK", env={"LK": "x"}).stdout == "x\n"
        assert host.executor.agent() is None
        assert "command agent did not start" in caplog.text and "/no/such/python3" in caplog.text
        host.atomic_write(remote, b"one\n", mode=0o600)
        host.append_file(remote, b"two\n")
        assert host.read_file(remote) == b"one\ntwo\n" and os.stat(remote).st_mode & 0o777 == 0o600


def test_files_go_both_ways_over_one_sftp_session(sshd, tmp_path):
    data = os.urandom(3 * MIB + 17)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    remote = str(sshd.dir / f"{unique_name()}.bin")
    with sshd.ssh_host() as host:
        host.put(src, remote, mode=0o640)
        session = host.sftp()
        assert os.stat(remote).st_mode & 0o777 == 0o640
        host.get(remote, tmp_path / "back.bin")
        assert (tmp_path / "back.bin").read_bytes() == data
        host.write_file(remote, b"small\n")
        assert host.read_file(remote) == b"small\n"
        assert host.sftp() is session
        with pytest.raises(OSError):
            host.read_file(str(sshd.dir / "no-such-file"))


def test_sysctl_in_a_namespace_over_ssh(sshd, netns):
    ns = netns()
    NetnsHost(ns).run(["iptables", "-A", "INPUT", "-m", "conntrack", "--ctstate", "NEW", "-j", "ACCEPT"])
    outside = LocalHost().read_sysctl(UDP_TIMEOUT)
    new = "17" if outside != "17" else "19"
    with sshd.ssh_host() as host:
        view = host.netns(ns)
        assert view.run(["ip", "-o", "link"]).stdout.count("\n") == 1  # only lo
        view.write_sysctl(UDP_TIMEOUT, new)
        assert view.read_sysctl(UDP_TIMEOUT) == new
        assert NetnsHost(ns).read_sysctl(UDP_TIMEOUT) == new  # really in that namespace
        assert host.read_sysctl(UDP_TIMEOUT) == outside  # and not outside it
        with pytest.raises(SysctlError, match="Invalid argument"):
            view.write_sysctl(UDP_TIMEOUT, "abc")
        with pytest.raises(SysctlError, match="no such sysctl"):
            view.read_sysctl("net.netfilter.no_such_thing")


def test_a_process_network_namespace_over_ssh(sshd, netns):
    ns = netns()
    sleeper = subprocess.Popen(["ip", "netns", "exec", ns, "sleep", "30"])
    try:
        with sshd.ssh_host() as host:
            view = host.netns(pid=sleeper.pid)
            view.write_sysctl("net.ipv4.ip_local_port_range", "20000 30000")
            assert NetnsHost(ns).read_sysctl("net.ipv4.ip_local_port_range").split() == ["20000", "30000"]
            assert view.read_sysctl("net.ipv4.ip_local_port_range").split() == ["20000", "30000"]
    finally:
        sleeper.kill()
        sleeper.wait()


def test_stream_yields_lines_as_they_come_and_stops(sshd):
    marker = f"lkstream{os.getpid()}x{time.time_ns() % 10**6}"
    with sshd.ssh_host() as host:
        stream = host.stream(f"i=0; while :; do i=$((i+1)); echo {marker} $i; sleep 0.05; done")
        seen = []
        start = time.monotonic()
        for line in stream:
            seen.append(line)
            if len(seen) == 5:
                break
        assert seen == [f"{marker} {i}" for i in range(1, 6)]
        assert time.monotonic() - start < 5
        stream.stop()
        assert _gone(marker, within=8), "the remote loop kept running after stop()"


def test_stream_stop_from_another_thread_and_failure(sshd):
    with sshd.ssh_host() as host:
        stream = host.stream("echo one; sleep 60")
        lines = []
        threading.Timer(1.0, stream.stop).start()
        start = time.monotonic()
        lines.extend(stream)
        assert lines == ["one"] and time.monotonic() - start < 5
        with pytest.raises(CommandFailed, match="exit code 4"):
            list(host.stream("echo a; echo bad >&2; exit 4"))


def test_changed_host_key_is_refused_naming_host_and_fingerprints(sshd, tmp_path):
    other = keygen(tmp_path / "other")
    kind, b64 = other.with_suffix(".pub").read_text().split()[:2]
    known = tmp_path / "known_hosts"
    known.write_text(f"[{sshd.host}]:{sshd.port} {kind} {b64}\n")
    host = sshd.ssh_host(known_hosts=known, pin=False, trust_on_first_use=True)
    with pytest.raises(HostKeyError) as info:
        host.run("true")
    text = str(info.value)
    real = paramiko.PKey.from_path(sshd.host_key).fingerprint
    pinned = paramiko.PKey.from_path(other).fingerprint
    assert f"[{sshd.host}]:{sshd.port}" in text and "CHANGED" in text
    assert real in text and pinned in text
    assert "ssh-keygen -R" in text and str(known) in text
    assert known.read_text().split()[2] == b64  # the pinned key was not replaced


def test_unknown_host_key_is_refused_unless_trusted_on_first_use(sshd, tmp_path):
    known = tmp_path / "lab" / "known_hosts"
    with pytest.raises(HostKeyError, match="not in the lab's known_hosts") as info:
        sshd.ssh_host(known_hosts=known, pin=False).run("true")
    assert paramiko.PKey.from_path(sshd.host_key).fingerprint in str(info.value)
    assert not known.exists()
    trusting = sshd.ssh_host(known_hosts=known, pin=False, trust_on_first_use=True)
    assert trusting.run("echo hi").stdout == "hi\n"
    assert known.read_text() == sshd.known_hosts_line()  # pinned
    # and now a strict host trusts it, without the option
    assert sshd.ssh_host(known_hosts=known, pin=False).run("echo again").stdout == "again\n"


def test_ssh_errors_name_the_host_and_reason(fresh_sshd, tmp_path):
    wrong_key = keygen(tmp_path / "stranger")
    host = fresh_sshd.ssh_host()
    host.key_filename = [str(wrong_key)]
    with pytest.raises(SSHError, match=r"authentication failed for user 'root'"):
        host.run("true")
    host = fresh_sshd.ssh_host()
    assert host.run("echo up").ok
    fresh_sshd.stop(remove=False)
    with pytest.raises(SSHError, match=rf"{host.name}: connection refused"):
        host.run("true")  # the dropped connection is noticed and a reconnect is tried


def test_a_connection_dropped_mid_command_is_reported(fresh_sshd):
    host = fresh_sshd.ssh_host(keepalive=1)
    assert host.run("echo up").ok
    threading.Timer(1.0, fresh_sshd.drop_connections).start()
    start = time.monotonic()
    with pytest.raises(SSHError, match="connection lost while running"):
        host.run("sleep 20", timeout=30)
    assert time.monotonic() - start < 10


def test_a_server_that_never_sends_its_banner_is_given_up_on_in_time(tmp_path):
    import socket

    from labkit.remote import SSHHost

    with socket.socket() as listener:  # accepts the TCP connection, then says nothing
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        host = SSHHost("127.0.0.1", port=port, username="nobody", known_hosts=tmp_path / "kh",
                       connect_timeout=2, banner_timeout=1.5, auth_timeout=2)
        start = time.monotonic()
        with pytest.raises(SSHError, match=rf"127.0.0.1:{port}: .*banner"):
            host.run("true")
        assert time.monotonic() - start < 6


def test_the_sudo_path_of_a_vagrant_box(sshd, netns, tmp_path):
    """As the Vagrant testbeds drive their nodes: commands, files and sysctls via sudo -n."""
    from tests.conftest import need_program

    need_program("sudo")
    ns = netns()
    remote = str(sshd.dir / f"{unique_name()}.conf")
    with sshd.ssh_host(sudo=True) as host:
        assert host.run("id -u").stdout.strip() == "0"
        host.write_file(remote, b"allowedUnsafeSysctls: []\n", mode=0o600)
        assert host.read_file(remote) == b"allowedUnsafeSysctls: []\n"
        assert os.stat(remote).st_mode & 0o777 == 0o600
        with pytest.raises(OSError) as info:
            host.read_file(remote + ".missing")
        assert info.value.errno == 2
        view = host.netns(ns)
        view.write_sysctl("net.ipv4.ip_forward", 1)
        assert NetnsHost(ns).read_sysctl("net.ipv4.ip_forward") == "1"
        assert [line for line in view.stream("echo a; echo b")] == ["a", "b"]


def test_a_silent_stream_ends_at_its_line_timeout(sshd):
    with sshd.ssh_host() as host:
        start = time.monotonic()
        with pytest.raises(CommandTimedOut, match="timed out after 1 s"):
            list(host.stream("echo first; sleep 30", line_timeout=1))
        assert time.monotonic() - start < 4
