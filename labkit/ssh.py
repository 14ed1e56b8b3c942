"""Run commands, sysctls and file transfers on a remote machine over SSH (Paramiko).

:class:`SSHHost` is a :class:`~labkit.host.Host` that connects lazily, keeps one
connection and one SFTP session, and bounds every wait: the TCP connect, the
server banner, authentication and each command.  A command's stdout and stderr
are read together, so a command that prints megabytes on both completes; a
command that outlives its deadline is ended (its channel closed, and on the
remote side GNU ``timeout`` ends its whole process group) and
:class:`~labkit.exceptions.CommandTimedOut` is raised.

Host keys are checked against the lab's own known_hosts file, never ignored:
an unknown key is refused (Paramiko's ``RejectPolicy``) unless the caller asks
for trust-on-first-use, which pins the key in that file; a key that differs
from the pinned one is always refused with
:class:`~labkit.exceptions.HostKeyError`.

:meth:`SSHHost.netns` gives a view of the same machine inside a network
namespace (``ip netns exec NAME`` or ``nsenter -t PID -n``), which is how the
Kubernetes testbeds reach a pod.  :meth:`SSHHost.stream` runs a long command and
yields its output line by line (the monitor's remote agent).
"""

from __future__ import annotations

import errno
import logging
import math
import os
import select
import shlex
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import paramiko

from labkit.exceptions import CommandFailed, CommandTimedOut, HostKeyError, SSHError, SysctlError
from labkit.host import Command, Host, Result, command_text, in_netns, sysctl_name
from labkit.hostkeys import (DEFAULT_KNOWN_HOSTS, PinOnFirstUse, RefuseUnknownKey, changed_key_error,
                             known_hosts_name)

log = logging.getLogger(__name__)
# Paramiko's transport thread logs every failed connection with a traceback; the
# SSHError raised here already says what failed and where.  A caller that wants
# Paramiko's own diagnostics sets this logger's level back.
if logging.getLogger("paramiko.transport").level == logging.NOTSET:
    logging.getLogger("paramiko.transport").setLevel(logging.CRITICAL)

# Extra seconds the remote `timeout` allows beyond the local deadline, so that the
# local side reports the timeout first; then TERM, and KILL KILL_AFTER s later.
REMOTE_GRACE = 1
KILL_AFTER = 2
# After the exit status arrives, how long to wait for the rest of the output
# (a background child keeping the pipes open would otherwise hold the call).
DRAIN_AFTER_EXIT = 2.0
_CHUNK = 65536


def _os_error(stderr: str, path: str) -> OSError:
    """Turn a remote tool's error message about ``path`` into an OSError."""
    text = stderr.strip().splitlines()[-1] if stderr.strip() else "failed"
    for code, words in ((errno.ENOENT, "No such file"), (errno.EACCES, "Permission denied"),
                        (errno.EROFS, "Read-only"), (errno.EINVAL, "Invalid argument")):
        if words in text:
            return OSError(code, os.strerror(code) + f" (remote: {text})", path)
    return OSError(errno.EIO, text, path)


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
    """

    def __init__(self, hostname: str, *, port: int = 22, username: str | None = None,
                 key_filename: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                 known_hosts: str | os.PathLike | None = None, trust_on_first_use: bool = False,
                 name: str | None = None, connect_timeout: float = 10.0,
                 banner_timeout: float = 15.0, auth_timeout: float = 15.0,
                 keepalive: float = 15.0, sudo: bool = False, via_netns: str | None = None):
        self.hostname = hostname
        self.via_netns = via_netns
        self.port = int(port)
        self.username = username
        if key_filename is None or isinstance(key_filename, (str, os.PathLike)):
            self.key_filename = None if key_filename is None else [os.fspath(key_filename)]
        else:
            self.key_filename = [os.fspath(k) for k in key_filename]
        self.known_hosts = Path(known_hosts) if known_hosts else DEFAULT_KNOWN_HOSTS
        self.trust_on_first_use = trust_on_first_use
        self.name = name or f"{username + '@' if username else ''}{hostname}:{self.port}"
        self.connect_timeout = connect_timeout
        self.banner_timeout = banner_timeout
        self.auth_timeout = auth_timeout
        self.keepalive = keepalive
        self.sudo = sudo
        self._client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._lock = threading.RLock()

    # -- connection -------------------------------------------------------------------

    def connect(self) -> paramiko.Transport:
        """Connect now if not connected (or reconnect a dropped connection).

        Returns:
            The live Paramiko transport.

        Raises:
            HostKeyError: the host key is unknown (and trust-on-first-use is off)
                or differs from the pinned one.
            SSHError: the server cannot be reached, does not speak SSH in time,
                or refuses the user or key.
        """
        with self._lock:
            if self._client is not None:
                transport = self._client.get_transport()
                if transport is not None and transport.is_active():
                    return transport
                log.info("%s: connection lost; reconnecting", self.name)
                self._drop()
            client = paramiko.SSHClient()
            if self.known_hosts.exists():
                # loaded as keys only: Paramiko never rewrites the file; pinning is atomic and ours
                try:
                    client.get_host_keys().load(str(self.known_hosts))
                except (OSError, paramiko.SSHException) as exc:
                    raise SSHError(f"{self.name}: cannot read known_hosts {self.known_hosts}: {exc}") from None
            client.set_missing_host_key_policy(
                PinOnFirstUse(self.known_hosts) if self.trust_on_first_use
                else RefuseUnknownKey(self.known_hosts))
            try:
                sock = None
                if self.via_netns:
                    # the socket keeps the namespace it was made in; only a short-lived
                    # thread of this process enters it
                    sock = in_netns(self.via_netns, socket.create_connection, (self.hostname, self.port),
                                    self.connect_timeout)
                client.connect(
                    self.hostname, port=self.port, username=self.username,
                    key_filename=self.key_filename, timeout=self.connect_timeout,
                    banner_timeout=self.banner_timeout, auth_timeout=self.auth_timeout,
                    allow_agent=self.key_filename is None, look_for_keys=self.key_filename is None,
                    sock=sock,
                )
            except BaseException as exc:
                client.close()
                raise self._connect_error(exc) from None
            transport = client.get_transport()
            assert transport is not None
            if self.keepalive:
                transport.set_keepalive(int(max(1, self.keepalive)))
            self._client = client
            log.debug("%s: connected", self.name)
            return transport

    def _connect_error(self, exc: BaseException) -> BaseException:
        where = f"{self.name}"
        if isinstance(exc, HostKeyError):
            return exc
        if isinstance(exc, paramiko.BadHostKeyException):
            return changed_key_error(where, known_hosts_name(self.hostname, self.port),
                                     self.known_hosts, exc)
        if isinstance(exc, paramiko.AuthenticationException):
            keys = ", ".join(self.key_filename) if self.key_filename else "agent/default keys"
            return SSHError(f"{where}: authentication failed for user {self.username!r} "
                            f"with {keys}: {exc}")
        if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError):
            return SSHError(f"{where}: connection refused (is sshd running and listening on "
                            f"port {self.port}?)")
        if isinstance(exc, (socket.timeout, TimeoutError)):
            return SSHError(f"{where}: no answer within {self.connect_timeout:g} s")
        if isinstance(exc, paramiko.SSHException):
            text = str(exc)
            if "banner" in text.lower():
                text += f" (no SSH banner within {self.banner_timeout:g} s)"
            return SSHError(f"{where}: {text}")
        if isinstance(exc, OSError):
            return SSHError(f"{where}: {exc.strerror or exc}")
        return exc

    def _drop(self) -> None:
        if self._sftp is not None:
            try:
                self._sftp.close()
            except Exception:  # closing a dead session: nothing to report
                pass
        if self._client is not None:
            self._client.close()
        self._sftp = None
        self._client = None

    def close(self) -> None:
        """Close the SFTP session and the connection; the next call reconnects."""
        with self._lock:
            self._drop()

    @property
    def connected(self) -> bool:
        """True when a connection is open and alive."""
        transport = self._client.get_transport() if self._client else None
        return bool(transport and transport.is_active())

    def sftp(self) -> paramiko.SFTPClient:
        """The one SFTP session of this host (opened on first use, reused)."""
        with self._lock:
            transport = self.connect()
            if self._sftp is None or self._sftp.get_channel().closed:
                try:
                    self._sftp = paramiko.SFTPClient.from_transport(transport)
                except (paramiko.SSHException, OSError) as exc:
                    raise SSHError(f"{self.name}: cannot open an SFTP session: {exc}") from None
                if self._sftp is None:
                    raise SSHError(f"{self.name}: the server refused an SFTP session")
            return self._sftp

    # -- commands ---------------------------------------------------------------------

    def remote_command(self, cmd: Command, *, timeout: float | None = None,
                       env: Mapping[str, str] | None = None, prefix: Sequence[str] = ()) -> str:
        """The exact command line sent to the server for ``cmd``.

        ``sudo -n`` (if asked), then ``timeout`` bounding the whole process group,
        then ``env``, then ``prefix`` (e.g. ``ip netns exec NS``), then the command:
        an argv list as is, a string through ``sh -c``.
        """
        argv: list[str] = []
        if self.sudo:
            argv += ["sudo", "-n"]
        if timeout is not None:
            argv += ["timeout", "-k", str(KILL_AFTER), str(math.ceil(timeout) + REMOTE_GRACE)]
        if env:
            argv += ["env", *(f"{k}={v}" for k, v in env.items())]
        argv += list(prefix)
        if isinstance(cmd, str):
            if not argv:
                return cmd
            argv += ["sh", "-c", cmd]
        else:
            argv += [str(c) for c in cmd]
        return shlex.join(argv)

    def _run(self, cmd, *, timeout, input, env) -> Result:
        return self._exec_prefixed(cmd, (), self.name, timeout=timeout, input=input, env=env)

    def _exec_prefixed(self, cmd: Command, prefix: Sequence[str], host: str, *,
                       timeout: float | None, input: str | bytes | None,
                       env: Mapping[str, str] | None) -> Result:
        display = command_text(cmd)
        code, out, err, duration = self.exec_bytes(
            self.remote_command(cmd, timeout=timeout, env=env, prefix=prefix),
            timeout=timeout, input=input, display=display, host=host)
        return Result(display, host, code, out.decode("utf-8", "replace"),
                      err.decode("utf-8", "replace"), duration)

    def exec_bytes(self, command: str, *, timeout: float | None, input: str | bytes | None = None,
                   display: str | None = None, host: str | None = None
                   ) -> tuple[int, bytes, bytes, float]:
        """Run an already-built remote command line; return its raw output.

        Both output streams are read as they arrive; the wait for the exit status
        is bounded by ``timeout``.

        Returns:
            ``(exit_code, stdout, stderr, seconds)``; exit_code is -1 when the
            server reported no status (the process died of a signal).

        Raises:
            CommandTimedOut: the deadline passed; the channel was closed.
            SSHError: the connection could not be made or was lost meanwhile.
        """
        display = display or command
        host = host or self.name
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        transport, chan = self._open_channel(command, display, host)
        data = input.encode() if isinstance(input, str) else input
        writer = None
        if data:
            writer = threading.Thread(target=_feed, args=(chan, data), daemon=True,
                                      name=f"ssh-stdin-{self.name}")
            writer.start()
        else:
            chan.shutdown_write()
        out, err = bytearray(), bytearray()
        exited_at = None
        try:
            while True:
                got = _drain(chan, out, err)
                if chan.eof_received and not (chan.recv_ready() or chan.recv_stderr_ready()):
                    break
                now = time.monotonic()
                if chan.exit_status_ready():
                    if exited_at is None or got:
                        exited_at = now
                    elif now - exited_at > DRAIN_AFTER_EXIT:
                        log.debug("%s: %r exited but keeps its output open; not waiting", host, display)
                        break
                if chan.closed or not transport.is_active():
                    break
                if deadline is not None and now >= deadline:
                    raise CommandTimedOut(display, host, timeout, _text(out), _text(err))
                wait = 0.5 if deadline is None else min(0.5, max(deadline - now, 0.0))
                select.select([chan], [], [], wait)
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            if not chan.status_event.wait(left):
                if not transport.is_active():
                    raise self._lost(host, display)
                raise CommandTimedOut(display, host, timeout or 0, _text(out), _text(err))
            if not transport.is_active() and not chan.exit_status_ready():
                raise self._lost(host, display)
            code = chan.recv_exit_status()
            if code == -1 and not transport.is_active():
                raise self._lost(host, display)
        finally:
            chan.close()
        return code, bytes(out), bytes(err), time.monotonic() - start

    def _open_channel(self, command: str, display: str, host: str
                      ) -> tuple[paramiko.Transport, paramiko.Channel]:
        """Open a session channel and start ``command`` on it.

        A connection that died while idle is noticed here: the command has not
        started, so one reconnect is safe (and tried once).
        """
        for attempt in (1, 2):
            transport = self.connect()
            try:
                chan = transport.open_session(timeout=self.connect_timeout)
                chan.exec_command(command)
                return transport, chan
            except (paramiko.SSHException, OSError, EOFError) as exc:
                if attempt == 1 and _dies(transport, within=2.0):
                    # the connection is gone (not just this channel refused) and nothing
                    # started yet: one fresh connection is safe to try
                    log.info("%s: connection closed under us; reconnecting once", host)
                    continue
                reason = str(exc) or "the server closed the connection"
                raise SSHError(f"{host}: cannot start {display!r}: {reason}") from None
        raise AssertionError("unreachable")

    def _lost(self, host: str, display: str) -> SSHError:
        return SSHError(f"{host}: SSH connection lost while running {display!r}; "
                        "the command may or may not have completed")

    # -- files ------------------------------------------------------------------------

    def read_file(self, path: str) -> bytes:
        """Return a remote file's content (over SFTP; with ``sudo``, ``sudo cat``)."""
        if self.sudo:
            return self._cat(path, ())
        try:
            with self.sftp().open(path, "rb") as f:
                return f.read()
        except (paramiko.SSHException, EOFError) as exc:
            raise SSHError(f"{self.name}: reading {path}: {exc}") from None

    def write_file(self, path: str, data: bytes, mode: int | None = None) -> None:
        """Write a remote file (over SFTP; with ``sudo``, ``sudo tee``)."""
        if self.sudo:
            return self._tee(path, data, mode, ())
        try:
            sftp = self.sftp()
            with sftp.open(path, "wb") as f:
                f.set_pipelined(True)
                f.write(data)
            if mode is not None:
                sftp.chmod(path, mode)
        except (paramiko.SSHException, EOFError) as exc:
            raise SSHError(f"{self.name}: writing {path}: {exc}") from None

    def put(self, local_path: str | os.PathLike, remote_path: str, mode: int | None = None) -> None:
        """Copy a local file to this host over the SFTP session."""
        if self.sudo:
            return super().put(local_path, remote_path, mode)
        try:
            sftp = self.sftp()
            sftp.put(os.fspath(local_path), remote_path)
            if mode is not None:
                sftp.chmod(remote_path, mode)
        except (paramiko.SSHException, EOFError) as exc:
            raise SSHError(f"{self.name}: copying {local_path} to {remote_path}: {exc}") from None

    def get(self, remote_path: str, local_path: str | os.PathLike) -> None:
        """Copy a file of this host to a local path over the SFTP session."""
        if self.sudo:
            return super().get(remote_path, local_path)
        try:
            self.sftp().get(remote_path, os.fspath(local_path))
        except (paramiko.SSHException, EOFError) as exc:
            raise SSHError(f"{self.name}: copying {remote_path} to {local_path}: {exc}") from None

    def _cat(self, path: str, prefix: Sequence[str], host: str | None = None) -> bytes:
        code, out, err, _ = self.exec_bytes(self.remote_command(["cat", "--", path], prefix=prefix),
                                            timeout=60, display=f"cat {path}", host=host)
        if code != 0:
            raise _os_error(err.decode(errors="replace"), path)
        return out

    def _tee(self, path: str, data: bytes, mode: int | None, prefix: Sequence[str],
             host: str | None = None) -> None:
        script = 'cat > "$1"' + (' && chmod "$2" "$1"' if mode is not None else "")
        argv = ["sh", "-c", script, "sh", path] + ([f"{mode:o}"] if mode is not None else [])
        code, _, err, _ = self.exec_bytes(self.remote_command(argv, prefix=prefix), timeout=60,
                                          input=data, display=f"write {path}", host=host)
        if code != 0:
            raise _os_error(err.decode(errors="replace"), path)

    # -- sysctls ----------------------------------------------------------------------

    def write_sysctl(self, name: str, value: Any) -> None:
        """Set a sysctl with ``sysctl -w``, keeping the kernel's refusal message.

        Raises:
            SysctlError: invalid name, no such sysctl, read-only here, or the
                kernel refused the value.
        """
        _write_sysctl(self, name, value, ())

    # -- namespaces and streams -------------------------------------------------------

    def netns(self, name: str | None = None, *, pid: int | None = None,
              host_name: str | None = None) -> "SSHNetnsHost":
        """A view of this machine inside a network namespace, sharing the connection.

        Args:
            name: a named namespace (``ip netns exec NAME``).
            pid: or the namespace of a process, e.g. a container's
                (``nsenter -t PID -n``); exactly one of ``name`` and ``pid``.
            host_name: how results name the view (default ``<host>/<netns>``).
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

    def stream(self, cmd: Command, *, timeout: float | None = None,
               env: Mapping[str, str] | None = None, line_timeout: float | None = None
               ) -> "SSHStream":
        """Start a long-running command and return its stdout as a line stream.

        See :class:`SSHStream`.  ``timeout`` bounds the whole command (remote
        ``timeout``), ``line_timeout`` the wait for each line.
        """
        return SSHStream(self, self.remote_command(cmd, timeout=timeout, env=env),
                         command_text(cmd), self.name, line_timeout=line_timeout)


class SSHNetnsHost(Host):
    """An :class:`SSHHost` seen from inside one of its network namespaces.

    Commands run through the namespace prefix; sysctls and files under ``/proc``
    are read and written by commands run there (the SFTP server lives in the
    machine's own namespace); other files go through the parent's SFTP session.

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
        return self.parent._exec_prefixed(cmd, self.prefix, self.name, timeout=timeout,
                                          input=input, env=env)

    def read_file(self, path: str) -> bytes:
        """Return a file's content; ``/proc`` files as the namespace sees them."""
        if path.startswith("/proc/"):
            return self.parent._cat(path, self.prefix, self.name)
        return self.parent.read_file(path)

    def write_file(self, path: str, data: bytes, mode: int | None = None) -> None:
        """Write a file; ``/proc`` files inside the namespace."""
        if path.startswith("/proc/"):
            return self.parent._tee(path, data, None, self.prefix, self.name)
        return self.parent.write_file(path, data, mode)

    def write_sysctl(self, name: str, value: Any) -> None:
        """Set a sysctl of this namespace with ``sysctl -w`` run inside it."""
        _write_sysctl(self, name, value, self.prefix)

    def stream(self, cmd: Command, *, timeout: float | None = None,
               env: Mapping[str, str] | None = None, line_timeout: float | None = None
               ) -> "SSHStream":
        """Like :meth:`SSHHost.stream`, inside this namespace."""
        return SSHStream(self.parent, self.parent.remote_command(cmd, timeout=timeout, env=env,
                                                                 prefix=self.prefix),
                         command_text(cmd), self.name, line_timeout=line_timeout)

    def close(self) -> None:
        """Nothing to release: the parent owns the connection."""


def _write_sysctl(host: SSHHost | SSHNetnsHost, name: str, value: Any, prefix: Sequence[str]) -> None:
    dotted = sysctl_name(name)
    text = str(value)
    if "\n" in text:
        raise SysctlError(name, host.name, "invalid value: contains a newline", value=value)
    parent = host.parent if isinstance(host, SSHNetnsHost) else host
    code, _, err, _ = parent.exec_bytes(
        parent.remote_command(["sysctl", "-q", "-w", f"{dotted}={text}"], prefix=prefix),
        timeout=30, display=f"sysctl -w {dotted}={text}", host=host.name)
    if code != 0:
        reason = err.decode(errors="replace").strip().replace("sysctl: ", "") or f"exit code {code}"
        if "permission denied" in reason.lower() or "read-only" in reason.lower():
            reason += " (read-only here: global sysctls can only be set in the initial network namespace)"
        raise SysctlError(name, host.name, reason, value=value)


class SSHStream:
    """A remote command whose stdout is read line by line as it comes.

    Iterate to get lines (``str`` without the newline).  :meth:`stop` (from any
    thread, or leaving the ``with`` block) closes the channel; the remote process
    then ends at its next write (SIGPIPE), or at its ``timeout``.  When the
    command ends by itself with a non-zero status, iteration raises
    :class:`CommandFailed`; when the connection drops, :class:`SSHError`.

    Attributes:
        exit_code: the status once the command ended (None before, or if stopped).
        stderr: the last 64 KiB the command wrote to stderr.
    """

    def __init__(self, host: SSHHost, command: str, display: str, name: str, *,
                 line_timeout: float | None = None):
        self.host = host
        self.display = display
        self.name = name
        self.line_timeout = line_timeout
        self.exit_code: int | None = None
        self.stderr = ""
        self._stopped = threading.Event()
        self._start = time.monotonic()
        self._transport, self._chan = host._open_channel(command, display, name)
        self._chan.shutdown_write()

    def __iter__(self) -> Iterator[str]:
        chan, err, pending = self._chan, bytearray(), bytearray()
        last = time.monotonic()
        while not self._stopped.is_set():
            got = _drain(chan, pending, err)
            del err[:-_CHUNK]
            *lines, rest = pending.split(b"\n")
            pending[:] = rest
            for line in lines:
                yield line.decode("utf-8", "replace")
            if got:
                last = time.monotonic()
            if chan.eof_received and not chan.recv_ready():
                break
            if chan.closed or not self._transport.is_active():
                break
            if self.line_timeout is not None and time.monotonic() - last > self.line_timeout:
                self.stop()
                raise CommandTimedOut(self.display, self.name, self.line_timeout,
                                      stderr=_text(err))
            select.select([chan], [], [], 0.5)
        self.stderr = _text(err)
        if self._stopped.is_set():
            return
        if pending:
            yield bytes(pending).decode("utf-8", "replace")
        if not chan.status_event.wait(DRAIN_AFTER_EXIT) or not self._transport.is_active():
            if not self._transport.is_active():
                raise SSHError(f"{self.name}: SSH connection lost while streaming {self.display!r}")
        self.exit_code = chan.recv_exit_status() if chan.exit_status_ready() else -1
        chan.close()
        if self.exit_code != 0:
            raise CommandFailed(Result(self.display, self.name, self.exit_code, "", self.stderr,
                                       time.monotonic() - self._start))

    def stop(self) -> None:
        """Stop reading and close the channel (idempotent, any thread)."""
        self._stopped.set()
        self._chan.close()

    def __enter__(self) -> "SSHStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _dies(transport: paramiko.Transport, within: float) -> bool:
    """True when ``transport`` is, or within ``within`` s turns out to be, dead."""
    deadline = time.monotonic() + within
    while transport.is_active() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not transport.is_active()


def _feed(chan: paramiko.Channel, data: bytes) -> None:
    try:
        chan.sendall(data)
        chan.shutdown_write()
    except (OSError, EOFError, paramiko.SSHException):
        pass  # the command ended or stopped reading; its exit status tells the story


def _drain(chan: paramiko.Channel, out: bytearray, err: bytearray) -> int:
    """Move what the channel holds into ``out`` and ``err``; return the byte count."""
    return _take(chan.recv_ready, chan.recv, out) + _take(chan.recv_stderr_ready, chan.recv_stderr, err)


def _take(ready: Any, recv: Any, buf: bytearray) -> int:
    got = 0
    while ready():
        chunk = recv(_CHUNK)
        if not chunk:
            break
        buf += chunk
        got += len(chunk)
    return got


def _text(data: bytes | bytearray) -> str:
    return bytes(data).decode("utf-8", "replace")
