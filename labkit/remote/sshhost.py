"""A remote machine as a :class:`~labkit.host.Host`, and its network namespaces as views of it.

:class:`SSHHost` is composed the way fabric composes its ``Connection``: an
:class:`~labkit.remote.connection.SSHConnection` (connect, reconnect, host keys),
one :class:`~labkit.remote.executor.SSHExecutor` (commands, timeouts, input,
streams) and an :class:`~labkit.remote.transfer.SSHTransfer` (SFTP and the sudo
path).  :meth:`SSHHost.netns` gives an :class:`SSHNetnsHost`, the same machine
inside a network namespace (``ip netns exec NAME`` or ``nsenter -t PID -n``),
which is how the Kubernetes testbeds reach a pod: it runs through the host's
executor with the namespace's prefix, sharing the one connection.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import paramiko

from labkit.exceptions import SysctlError
from labkit.host import Command, Host, Result, sysctl_name
from labkit.remote.channel import SSHStream
from labkit.remote.connection import SSHConnection
from labkit.remote.executor import SSHExecutor
from labkit.remote.transfer import SSHTransfer

SYSCTL_TIMEOUT = 30.0


class _Kept:
    """An attribute of :class:`SSHHost` that one of its parts keeps (read and set through the host)."""

    def __init__(self, part: str):
        self.part = part

    def __set_name__(self, owner: type, name: str) -> None:
        self.attr = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return getattr(getattr(obj, self.part), self.attr)

    def __set__(self, obj: Any, value: Any) -> None:
        setattr(getattr(obj, self.part), self.attr, value)


class SSHHost(Host):
    """A remote machine reached over SSH with Paramiko.

    Args:
        hostname: address or name to connect to.
        port: the SSH port.
        username: the remote user (None: Paramiko's default, the local user).
        key_filename: private key file(s); when given, no agent or default keys
            are tried, so the lab authenticates the same way every time.
        known_hosts: the lab's known_hosts file (default
            ``$LABKIT_KNOWN_HOSTS`` or ``~/.config/labkit/known_hosts``); the
            system's and the user's own files are not read.
        trust_on_first_use: accept a host key that the file does not know yet and
            pin it there.  A changed key is refused regardless.
        name: how errors and results name this host (default ``user@host:port``).
        connect_timeout, banner_timeout, auth_timeout: seconds for the TCP
            connect, the server's SSH banner, and authentication.
        keepalive: seconds between keepalive packets (0: none), so a dead peer is
            noticed and idle NAT mappings stay open.
        sudo: run commands and privileged file accesses through ``sudo -n`` (a
            Vagrant box's ``vagrant`` user).
        via_netns: open the TCP connection from inside this network namespace of
            the local machine (the lab's VMs live in one: :mod:`labkit.vm.libvirtd`).
        agent: send commands and file accesses through one command agent per
            connection (:mod:`labkit.remote.agent`) when the machine can run it;
            False: one SSH channel per command.

    Attributes:
        connection, executor, transfer: the three parts (public, shared by the
            namespace views).
    """

    hostname = _Kept("connection")
    port = _Kept("connection")
    username = _Kept("connection")
    key_filename = _Kept("connection")
    known_hosts = _Kept("connection")
    trust_on_first_use = _Kept("connection")
    name = _Kept("connection")
    connect_timeout = _Kept("connection")
    banner_timeout = _Kept("connection")
    auth_timeout = _Kept("connection")
    keepalive = _Kept("connection")
    via_netns = _Kept("connection")
    sudo = _Kept("executor")

    def __init__(self, hostname: str, *, port: int = 22, username: str | None = None,
                 key_filename: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                 known_hosts: str | os.PathLike | None = None, trust_on_first_use: bool = False,
                 name: str | None = None, connect_timeout: float = 10.0,
                 banner_timeout: float = 15.0, auth_timeout: float = 15.0,
                 keepalive: float = 15.0, sudo: bool = False, via_netns: str | None = None,
                 agent: bool = True):
        self.connection = SSHConnection(
            hostname, port=port, username=username, key_filename=key_filename,
            known_hosts=known_hosts, trust_on_first_use=trust_on_first_use, name=name,
            connect_timeout=connect_timeout, banner_timeout=banner_timeout,
            auth_timeout=auth_timeout, keepalive=keepalive, via_netns=via_netns)
        self.executor = SSHExecutor(self.connection, sudo=sudo, agent=agent)
        self.transfer = SSHTransfer(self.connection, self.executor)

    # -- connection -------------------------------------------------------------------

    def connect(self) -> paramiko.Transport:
        """Connect now if not connected (or reconnect a dropped connection).

        See :meth:`SSHConnection.connect <labkit.remote.connection.SSHConnection.connect>`.
        """
        return self.connection.connect()

    def close(self) -> None:
        """End the command agent, close the SFTP session and the connection; the next call reconnects."""
        self.executor.close_agent()
        self.connection.close()

    @property
    def connected(self) -> bool:
        """True when a connection is open and alive."""
        return self.connection.connected

    def sftp(self) -> paramiko.SFTPClient:
        """The one SFTP session of this host (opened on first use, reused)."""
        return self.connection.sftp()

    # -- commands ---------------------------------------------------------------------

    def remote_command(self, cmd: Command, *, timeout: float | None = None,
                       env: Mapping[str, str] | None = None, prefix: Sequence[str] = ()) -> str:
        """The exact command line sent to the server for ``cmd``.

        ``sudo -n`` (if asked), then ``timeout`` bounding the whole process group,
        then ``env``, then ``prefix`` (e.g. ``ip netns exec NS``), then the command:
        an argv list as is, a string through ``sh -c``.
        """
        return self.executor.command_line(cmd, timeout=timeout, env=env, prefix=prefix)

    def exec_bytes(self, command: str, *, timeout: float | None, input: str | bytes | None = None,
                   display: str | None = None, host: str | None = None
                   ) -> tuple[int, bytes, bytes, float]:
        """Run an already-built remote command line; return ``(exit_code, stdout, stderr, seconds)``.

        See :meth:`SSHExecutor.exec_bytes <labkit.remote.executor.SSHExecutor.exec_bytes>`.
        """
        return self.executor.exec_bytes(command, timeout=timeout, input=input, display=display,
                                        host=host or self.name)

    def _run(self, cmd, *, timeout, input, env) -> Result:
        return self.executor.run(cmd, host=self.name, timeout=timeout, input=input, env=env)

    def stream(self, cmd: Command, *, timeout: float | None = None,
               env: Mapping[str, str] | None = None, line_timeout: float | None = None
               ) -> SSHStream:
        """Start a long-running command and return its stdout as a line stream.

        See :class:`~labkit.remote.channel.SSHStream`.  ``timeout`` bounds the
        whole command (remote ``timeout``), ``line_timeout`` the wait for each line.
        """
        return self.executor.stream(cmd, host=self.name, timeout=timeout, env=env,
                                    line_timeout=line_timeout)

    # -- files and sysctls ------------------------------------------------------------

    def read_file(self, path: str) -> bytes:
        """Return a remote file's content (over SFTP; with ``sudo``, ``sudo cat``)."""
        return self.transfer.read_file(path)

    def write_file(self, path: str, data: bytes, mode: int | None = None) -> None:
        """Write a remote file (over SFTP; with ``sudo``, ``sudo tee``)."""
        self.transfer.write_file(path, data, mode)

    def put(self, local_path: str | os.PathLike, remote_path: str, mode: int | None = None) -> None:
        """Copy a local file to this host over the SFTP session (with ``sudo``, ``sudo tee``)."""
        self.transfer.put(local_path, remote_path, mode)

    def get(self, remote_path: str, local_path: str | os.PathLike) -> None:
        """Copy a file of this host to a local path over the SFTP session (with ``sudo``, ``sudo cat``)."""
        self.transfer.get(remote_path, local_path)

    def append_file(self, path: str | os.PathLike, data: bytes) -> None:
        """Append to a file (mode 0600 when made, folders made if missing) and fsync it there."""
        if self.executor.file_op("append", os.fspath(path), data=data) is None:
            super().append_file(path, data)

    def atomic_write(self, path: str | os.PathLike, data: bytes, mode: int = 0o644) -> None:
        """Write a file atomically: a temporary file beside it, fsynced, then renamed over it."""
        if self.executor.file_op("atomic_write", os.fspath(path), data=data, mode=mode) is None:
            super().atomic_write(path, data, mode)

    def write_sysctl(self, name: str, value: Any) -> None:
        """Set a sysctl with ``sysctl -w``, keeping the kernel's refusal message.

        Raises:
            SysctlError: invalid name, no such sysctl, read-only here, or the
                kernel refused the value.
        """
        write_sysctl_by_command(self, name, value)

    # -- namespaces -------------------------------------------------------------------

    def netns(self, name: str | None = None, *, pid: int | None = None,
              host_name: str | None = None) -> "SSHNetnsHost":
        """A view of this machine inside a network namespace, sharing the connection.

        Args:
            name: a named namespace (``ip netns exec NAME``).
            pid: or the namespace of a process, e.g. a container's
                (``nsenter -t PID -n``); exactly one of ``name`` and ``pid``.
            host_name: how results name the view (default ``<host>/<netns>``).

        Raises:
            ValueError: neither or both given, or an invalid name or pid.
        """
        if (name is None) == (pid is None):
            raise ValueError("give exactly one of name and pid")
        if name is not None:
            if not name or "/" in name or name.startswith("-"):
                raise ValueError(f"invalid network namespace name {name!r}")
            return SSHNetnsHost(self, ["ip", "netns", "exec", name], name,
                                host_name or f"{self.name}/{name}")
        if not isinstance(pid, int) or pid <= 0:
            raise ValueError(f"invalid pid {pid!r}")
        return SSHNetnsHost(self, ["nsenter", "-t", str(pid), "-n"], f"pid:{pid}",
                            host_name or f"{self.name}/pid:{pid}")


class SSHNetnsHost(Host):
    """An :class:`SSHHost` seen from inside one of its network namespaces.

    Commands run through the parent's executor with the namespace prefix;
    sysctls and files under ``/proc`` are read and written by commands run there
    (the SFTP server lives in the machine's own namespace); other files go
    through the parent's file transfer.

    Attributes:
        parent: the :class:`SSHHost` whose connection this view uses.
        netns: the namespace's name, or ``pid:N`` for a process's namespace.
        prefix: the argv that enters the namespace.
    """

    def __init__(self, parent: SSHHost, prefix: Sequence[str], netns: str, name: str):
        self.parent = parent
        self.prefix = list(prefix)
        self.netns = netns
        self.name = name

    def _run(self, cmd, *, timeout, input, env) -> Result:
        return self.parent.executor.run(cmd, host=self.name, prefix=self.prefix, timeout=timeout,
                                        input=input, env=env)

    def read_file(self, path: str) -> bytes:
        """Return a file's content; ``/proc`` files as the namespace sees them."""
        if path.startswith("/proc/"):
            return self.parent.transfer.cat(path, prefix=self.prefix, host=self.name)
        return self.parent.transfer.read_file(path)

    def write_file(self, path: str, data: bytes, mode: int | None = None) -> None:
        """Write a file; ``/proc`` files inside the namespace."""
        if path.startswith("/proc/"):
            return self.parent.transfer.tee(path, data, prefix=self.prefix, host=self.name)
        return self.parent.transfer.write_file(path, data, mode)

    def write_sysctl(self, name: str, value: Any) -> None:
        """Set a sysctl of this namespace with ``sysctl -w`` run inside it."""
        write_sysctl_by_command(self, name, value)

    def stream(self, cmd: Command, *, timeout: float | None = None,
               env: Mapping[str, str] | None = None, line_timeout: float | None = None
               ) -> SSHStream:
        """Like :meth:`SSHHost.stream`, inside this namespace."""
        return self.parent.executor.stream(cmd, host=self.name, prefix=self.prefix, timeout=timeout,
                                           env=env, line_timeout=line_timeout)

    def close(self) -> None:
        """Nothing to release: the parent owns the connection."""


def write_sysctl_by_command(host: Host, name: str, value: Any) -> None:
    """Set a sysctl on ``host`` by running ``sysctl -q -w NAME=VALUE`` there.

    Raises:
        SysctlError: invalid name or value, no such sysctl, read-only here, or the
            kernel refused the value (its message kept).
    """
    dotted = sysctl_name(name)
    text = str(value)
    if "\n" in text:
        raise SysctlError(name, host.name, "invalid value: contains a newline", value=value)
    result = host.run(["sysctl", "-q", "-w", f"{dotted}={text}"], timeout=SYSCTL_TIMEOUT, check=False)
    if not result.ok:
        reason = result.stderr.strip().replace("sysctl: ", "") or f"exit code {result.exit_code}"
        if "permission denied" in reason.lower() or "read-only" in reason.lower():
            reason += " (read-only here: global sysctls can only be set in the initial network namespace)"
        raise SysctlError(name, host.name, reason, value=value)
