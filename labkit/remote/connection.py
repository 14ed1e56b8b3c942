"""One SSH connection to one machine (Paramiko): connect, reconnect, host keys, SFTP session, close.

:class:`SSHConnection` connects lazily and bounds every wait of the handshake:
the TCP connect, the server's banner and authentication.  It keeps one
transport and one SFTP session; a connection found dead is replaced by a fresh
one on the next :meth:`SSHConnection.connect`.  Running commands on it is the
executor's part (:mod:`labkit.remote.executor`), files the transfer's
(:mod:`labkit.remote.transfer`).

Host keys are checked against the lab's own known_hosts file, never ignored:
an unknown key is refused (Paramiko's ``RejectPolicy``) unless the caller asks
for trust-on-first-use, which pins the key in that file; a key that differs
from the pinned one is always refused with
:class:`~labkit.exceptions.HostKeyError`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from pathlib import Path
from typing import Sequence

import paramiko

from labkit.exceptions import HostKeyError, SSHError
from labkit.host import in_netns
from labkit.hostkeys import (DEFAULT_KNOWN_HOSTS, PinOnFirstUse, RefuseUnknownKey, changed_key_error,
                             known_hosts_name)

log = logging.getLogger(__name__)
# Paramiko's transport thread logs every failed connection with a traceback; the
# SSHError raised here already says what failed and where.  A caller that wants
# Paramiko's own diagnostics sets this logger's level back.
if logging.getLogger("paramiko.transport").level == logging.NOTSET:
    logging.getLogger("paramiko.transport").setLevel(logging.CRITICAL)


class SSHConnection:
    """The connection to one SSH server, made on first use and remade when lost.

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
        name: how errors name this machine (default ``user@host:port``).
        connect_timeout, banner_timeout, auth_timeout: seconds for the TCP
            connect, the server's SSH banner, and authentication.
        keepalive: seconds between keepalive packets (0: none), so a dead peer is
            noticed and idle NAT mappings stay open.
        via_netns: open the TCP connection from inside this network namespace of
            the local machine (the lab's VMs live in one: :mod:`labkit.vm.libvirtd`).
    """

    def __init__(self, hostname: str, *, port: int = 22, username: str | None = None,
                 key_filename: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                 known_hosts: str | os.PathLike | None = None, trust_on_first_use: bool = False,
                 name: str | None = None, connect_timeout: float = 10.0,
                 banner_timeout: float = 15.0, auth_timeout: float = 15.0,
                 keepalive: float = 15.0, via_netns: str | None = None):
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
        self._client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._lock = threading.RLock()

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
        """The exception to raise for a failed connect: what failed, naming this machine."""
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
        """Close the SFTP session and the connection; the next use reconnects."""
        with self._lock:
            self._drop()

    @property
    def connected(self) -> bool:
        """True when a connection is open and alive."""
        transport = self._client.get_transport() if self._client else None
        return bool(transport and transport.is_active())

    def sftp(self) -> paramiko.SFTPClient:
        """The one SFTP session of this connection (opened on first use, reused).

        Raises:
            SSHError: no connection, or the server refused the SFTP subsystem.
        """
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
