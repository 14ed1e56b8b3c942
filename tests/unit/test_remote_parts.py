"""The seams of labkit.remote without a server: one executor for a host and its views, reconnects, sudo files.

A fake transport stands in for Paramiko's: it records each command line the
executor starts and answers it like a shell would (stdout, stderr, exit code),
so what is asserted is the exact command a real sshd would have run.
"""

from __future__ import annotations

import errno
import io
import shlex
import threading

import paramiko
import pytest

from labkit.exceptions import SSHError, SysctlError
from labkit.remote import SSHConnection, SSHExecutor, SSHHost


class FakeChannel:
    """A session channel whose command has already finished with ``answer``."""

    def __init__(self, transport: "FakeTransport"):
        self.transport = transport
        self.out = self.err = b""
        self.code = -1
        self.input = b""
        self.eof_received = True
        self.closed = False
        self.status_event = threading.Event()
        self.wrote = threading.Event()

    def exec_command(self, command: str) -> None:
        self.transport.commands.append(command)
        self.out, self.err, self.code = self.transport.answer(shlex.split(command))
        self.status_event.set()

    def sendall(self, data: bytes) -> None:
        self.input += data

    def shutdown_write(self) -> None:
        self.transport.inputs.append(self.input)
        self.wrote.set()

    def recv_ready(self) -> bool:
        return bool(self.out)

    def recv(self, n: int) -> bytes:
        chunk, self.out = self.out[:n], self.out[n:]
        return chunk

    def recv_stderr_ready(self) -> bool:
        return bool(self.err)

    def recv_stderr(self, n: int) -> bytes:
        chunk, self.err = self.err[:n], self.err[n:]
        return chunk

    def exit_status_ready(self) -> bool:
        return True

    def recv_exit_status(self) -> int:
        return self.code

    def close(self) -> None:
        self.closed = True


class FakeTransport:
    """Paramiko's transport as the executor uses it; ``dead`` ones refuse every channel."""

    def __init__(self, answer=lambda argv: (b"", b"", 0), dead: bool = False):
        self.answer = answer
        self.active = not dead
        self.commands: list[str] = []
        self.inputs: list[bytes] = []
        self.channels: list[FakeChannel] = []

    def is_active(self) -> bool:
        return self.active

    def open_session(self, timeout: float | None = None) -> FakeChannel:
        if not self.active:
            raise EOFError()
        self.channels.append(FakeChannel(self))
        return self.channels[-1]

    def set_keepalive(self, seconds: int) -> None:
        pass


def _host(transport: FakeTransport, monkeypatch, **kw) -> SSHHost:
    kw.setdefault("agent", False)  # the per-command channel path (the agent: test_agent_server, test_ssh_host)
    host = SSHHost("192.0.2.10", username="vagrant", known_hosts="/nonexistent/kh", name="node", **kw)
    monkeypatch.setattr(host.connection, "connect", lambda: transport)
    return host


def _after_timeout(argv: list[str]) -> list[str]:
    """The command behind ``[sudo -n] [timeout -k K S]``."""
    if argv[:2] == ["sudo", "-n"]:
        argv = argv[2:]
    return argv[4:] if argv[:1] == ["timeout"] else argv


def test_a_namespace_view_runs_through_the_hosts_one_executor_with_its_prefix(monkeypatch):
    def answer(argv):
        cmd = _after_timeout(argv)
        if "sysctl" in cmd:
            return b"", b"sysctl: setting key \"net.netfilter.nf_conntrack_max\": Invalid argument\n", 255
        if cmd[-1] == "/proc/sys/net/netfilter/nf_conntrack_max":
            return b"6000\n", b"", 0
        if cmd[-2:] == ["conntrack", "-C"]:
            return b"12\n", b"", 0
        return b"a\nb\n", b"", 0

    transport = FakeTransport(answer)
    host = _host(transport, monkeypatch, sudo=True)
    view = host.netns(pid=4242, host_name="pod-1")
    enter = ["nsenter", "-t", "4242", "-n"]

    result = view.run(["conntrack", "-C"], timeout=5)
    assert (result.host, result.stdout, result.ok) == ("pod-1", "12\n", True)
    assert shlex.split(transport.commands[-1]) == ["sudo", "-n", "timeout", "-k", "2", "6", *enter,
                                                   "conntrack", "-C"]
    assert view.read_sysctl("net.netfilter.nf_conntrack_max") == "6000"
    assert shlex.split(transport.commands[-1]) == ["sudo", "-n", "timeout", "-k", "2", "61", *enter, "cat", "--",
                                                   "/proc/sys/net/netfilter/nf_conntrack_max"]
    with pytest.raises(SysctlError, match="pod-1.*Invalid argument"):
        view.write_sysctl("net.netfilter.nf_conntrack_max", "abc")
    assert enter + ["sysctl", "-q", "-w", "net.netfilter.nf_conntrack_max=abc"] == \
        _after_timeout(shlex.split(transport.commands[-1]))
    assert list(view.stream(["cat", "/tmp/lines"])) == ["a", "b"]
    assert shlex.split(transport.commands[-1]) == ["sudo", "-n", *enter, "cat", "/tmp/lines"]
    # a file outside /proc is the machine's file: the host's own path, no namespace prefix
    view.read_file("/etc/hostname")
    assert shlex.split(transport.commands[-1]) == ["sudo", "-n", "timeout", "-k", "2", "61", "cat", "--",
                                                   "/etc/hostname"]
    # the host itself: same executor, same connection, no prefix
    assert host.run("echo hi", timeout=None).host == "node"
    assert transport.commands[-1] == "sudo -n sh -c 'echo hi'"
    assert len(transport.commands) == 6 and all(c.closed for c in transport.channels)


def test_without_sudo_files_go_over_sftp_and_proc_files_of_a_view_through_cat(monkeypatch):
    class SFTP:
        opened: list[str] = []

        def open(self, path, mode):
            self.opened.append(path)
            return io.BytesIO(b"from sftp")

    transport = FakeTransport(lambda argv: (b"1\n", b"", 0))
    host = _host(transport, monkeypatch)
    monkeypatch.setattr(host.connection, "sftp", lambda: SFTP())
    view = host.netns("lkpod1")
    assert view.read_file("/etc/hostname") == b"from sftp" and SFTP.opened == ["/etc/hostname"]
    assert transport.commands == []
    assert view.read_file("/proc/sys/net/ipv4/ip_forward") == b"1\n"
    assert shlex.split(transport.commands[-1]) == ["timeout", "-k", "2", "61", "ip", "netns", "exec", "lkpod1",
                                                   "cat", "--", "/proc/sys/net/ipv4/ip_forward"]


def test_sudo_put_and_write_send_the_bytes_to_tee_and_refusals_become_oserrors(monkeypatch, tmp_path):
    def answer(argv):
        if argv[-2] == "/etc/ro.conf":
            return b"", b"sh: 1: cannot create /etc/ro.conf: Permission denied\n", 2
        return b"", b"", 0

    transport = FakeTransport(answer)
    host = _host(transport, monkeypatch, sudo=True)
    local = tmp_path / "kubelet.conf"
    local.write_bytes(b"allowedUnsafeSysctls: []\n")
    host.put(local, "/var/lib/kubelet/config.yaml", mode=0o600)
    assert shlex.split(transport.commands[-1]) == [
        "sudo", "-n", "timeout", "-k", "2", "61", "sh", "-c", 'cat > "$1" && chmod "$2" "$1"', "sh",
        "/var/lib/kubelet/config.yaml", "600"]
    assert transport.channels[-1].wrote.wait(5) and transport.inputs[-1] == local.read_bytes()
    with pytest.raises(OSError) as info:
        host.write_file("/etc/ro.conf", b"x", mode=0o644)
    assert info.value.errno == errno.EACCES and info.value.filename == "/etc/ro.conf"
    assert "cannot create /etc/ro.conf" in str(info.value)


def test_a_connection_found_dead_before_a_command_is_replaced_once(monkeypatch):
    conn = SSHConnection("192.0.2.10", known_hosts="/nonexistent/kh")
    dead, live = FakeTransport(dead=True), FakeTransport(lambda argv: (b"up\n", b"", 0))
    handed = iter([dead, live])
    monkeypatch.setattr(conn, "connect", lambda: next(handed))
    result = SSHExecutor(conn, agent=False).run(["echo", "up"], host="node", timeout=None)
    assert result.stdout == "up\n" and live.commands == ["echo up"] and dead.commands == []


def test_a_second_dead_connection_is_reported_not_retried_forever(monkeypatch):
    conn = SSHConnection("192.0.2.10", known_hosts="/nonexistent/kh")
    calls = []

    def connect():
        calls.append(1)
        return FakeTransport(dead=True)

    monkeypatch.setattr(conn, "connect", connect)
    with pytest.raises(SSHError, match=r"node: cannot start 'echo up': the server closed the connection"):
        SSHExecutor(conn, agent=False).run(["echo", "up"], host="node", timeout=None)
    assert len(calls) == 2


def test_the_connection_keeps_one_transport_and_replaces_a_dead_one(monkeypatch, tmp_path):
    made = []

    class Client:  # paramiko.SSHClient as SSHConnection drives it
        def __init__(self):
            self.transport, self.closed, self.kwargs = FakeTransport(), False, {}
            made.append(self)

        def get_host_keys(self):
            return paramiko.HostKeys()

        def set_missing_host_key_policy(self, policy):
            self.policy = policy

        def connect(self, hostname, **kwargs):
            self.kwargs = dict(kwargs, hostname=hostname)

        def get_transport(self):
            return self.transport

        def close(self):
            self.closed = True
            self.transport.active = False

    monkeypatch.setattr(paramiko, "SSHClient", Client)
    conn = SSHConnection("192.0.2.10", port=2222, username="vagrant", key_filename="/k/id",
                         known_hosts=tmp_path / "kh")
    assert not conn.connected
    first = conn.connect()
    assert conn.connect() is first and len(made) == 1 and conn.connected
    assert made[0].kwargs["key_filename"] == ["/k/id"] and made[0].kwargs["allow_agent"] is False
    first.active = False  # the peer went away while idle
    assert not conn.connected
    second = conn.connect()
    assert second is not first and len(made) == 2 and made[0].closed and conn.connected
    conn.close()
    assert made[1].closed and not conn.connected
