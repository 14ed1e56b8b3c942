"""Running commands over one SSH connection, shared by a host and its namespace views.

:class:`SSHExecutor` builds the remote command line (``sudo -n``, GNU
``timeout`` bounding the whole process group, ``env``, then a prefix such as
``ip netns exec NS``), starts it on a session channel of its
:class:`~labkit.remote.connection.SSHConnection`, feeds its input, and reads
stdout and stderr together until it exits.  A command that outlives its
deadline is ended (its channel closed, and on the remote side ``timeout`` ends
its process group) and :class:`~labkit.exceptions.CommandTimedOut` is raised.
A connection that died while idle is replaced once before the command starts;
one lost while the command runs is reported, never retried.

Commands and file accesses go through the connection's command agent
(:mod:`labkit.remote.agent`) when the machine can run it: one process started
once instead of a login, ``sudo``, ``timeout`` and ``env`` per command.
Otherwise (no ``python3`` there, ``agent=False``) each command opens a channel
as described above.
"""

from __future__ import annotations

import logging
import math
import select
import shlex
import threading
import time
from typing import Mapping, Sequence

import paramiko

from labkit.exceptions import CommandTimedOut, SSHError
from labkit.host import Command, Result, command_text
from labkit.remote.agent import AgentUnavailable, NotStarted, RemoteAgent
from labkit.remote.channel import DRAIN_AFTER_EXIT, SSHStream, dies, drain, feed, text
from labkit.remote.connection import SSHConnection

log = logging.getLogger(__name__)

# Extra seconds the remote `timeout` allows beyond the local deadline, so that the
# local side reports the timeout first; then TERM, and KILL KILL_AFTER s later.
REMOTE_GRACE = 1
KILL_AFTER = 2


class SSHExecutor:
    """Commands on one SSH connection, optionally through ``sudo -n``.

    Args:
        connection: the machine's connection (opened on first command).
        sudo: run every command through ``sudo -n`` (a Vagrant box's ``vagrant`` user).
        agent: send commands through the machine's command agent when it can run
            one (see the module); False: one channel per command.
    """

    def __init__(self, connection: SSHConnection, *, sudo: bool = False, agent: bool = True):
        self.connection = connection
        self.sudo = sudo
        self.use_agent = agent
        self.agent_python = "python3"  # the machine's interpreter that runs the agent
        self._agent: RemoteAgent | None = None
        self._agent_lock = threading.Lock()

    def agent(self) -> RemoteAgent | None:
        """The connection's command agent, started (or restarted after a lost connection) now;
        None when this machine cannot run one (then once logged, and not tried again).

        Raises:
            SSHError: the connection could not be made.
        """
        if not self.use_agent:
            return None
        with self._agent_lock:
            if self._agent is not None and self._agent.alive:
                return self._agent
            if self._agent is not None:
                self._agent.close()
            agent = None
            for attempt in (1, 2):
                transport = self.connection.connect()
                agent = RemoteAgent(transport, self.connection.name, sudo=self.sudo,
                                    python=self.agent_python)
                try:
                    agent.start()
                    break
                except AgentUnavailable as exc:
                    if attempt == 1 and dies(transport, within=2.0):
                        continue  # the connection died while idle: one fresh one
                    log.info("%s; one SSH channel per command instead", exc)
                    self.use_agent = False
                    return None
            self._agent = agent
            return agent

    def close_agent(self) -> None:
        """End the command agent (the next command starts a new one)."""
        with self._agent_lock:
            if self._agent is not None:
                self._agent.close()
                self._agent = None

    def command_line(self, cmd: Command, *, timeout: float | None = None,
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

    def run(self, cmd: Command, *, host: str, prefix: Sequence[str] = (), timeout: float | None,
            input: str | bytes | None = None, env: Mapping[str, str] | None = None) -> Result:
        """Run ``cmd`` (through ``prefix``) and return its :class:`Result`, exit code unchecked.

        Args:
            host: the name the Result and errors give (the host or its namespace view).

        Raises:
            CommandTimedOut: the deadline passed; the command was ended.
            SSHError: the connection could not be made or was lost meanwhile.
        """
        display = command_text(cmd)
        code, out, err, duration = self.exec_command(cmd, prefix=prefix, timeout=timeout, input=input,
                                                     env=env, display=display, host=host)
        return Result(display, host, code, text(out), text(err), duration)

    def exec_command(self, cmd: Command, *, prefix: Sequence[str] = (), timeout: float | None,
                     input: str | bytes | None = None, env: Mapping[str, str] | None = None,
                     display: str, host: str) -> tuple[int, bytes, bytes, float]:
        """Run ``cmd`` (through ``prefix``) by the agent, or on a channel of its own; raw output.

        Returns:
            ``(exit_code, stdout, stderr, seconds)`` as :meth:`exec_bytes`.
        """
        argv = list(prefix) + (["sh", "-c", cmd] if isinstance(cmd, str) else [str(c) for c in cmd])
        done = self._by_agent(lambda agent: agent.run(argv, input=input, env=env, timeout=timeout,
                                                      display=display, host=host))
        if done is not None:
            return done
        return self.exec_bytes(self.command_line(cmd, timeout=timeout, env=env, prefix=prefix),
                               timeout=timeout, input=input, display=display, host=host)

    def file_op(self, op: str, path: str, *, data: bytes | None = None, mode: int | None = None
                ) -> bytes | None:
        """A file request to the agent (see :meth:`RemoteAgent.file`); None when there is no agent.

        Raises:
            OSError: as the machine reported it.
            SSHError: the connection went.
        """
        return self._by_agent(lambda agent: agent.file(op, path, data=data, mode=mode))

    def _by_agent(self, call):
        """``call(agent)``, or None without an agent.  A request the agent never read (its
        connection had died while idle) is sent once more to a new agent on a new connection."""
        for attempt in (1, 2):
            agent = self.agent()
            if agent is None:
                return None
            try:
                return call(agent)
            except NotStarted:
                if attempt == 2:
                    raise
                dies(agent.transport, within=2.0)
        raise AssertionError("unreachable")

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
        host = host or self.connection.name
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        transport, chan = self.open_channel(command, display, host)
        data = input.encode() if isinstance(input, str) else input
        if data:
            threading.Thread(target=feed, args=(chan, data), daemon=True,
                             name=f"ssh-stdin-{self.connection.name}").start()
        else:
            chan.shutdown_write()
        out, err = bytearray(), bytearray()
        exited_at = None
        try:
            while True:
                got = drain(chan, out, err)
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
                    raise CommandTimedOut(display, host, timeout, text(out), text(err))
                wait = 0.5 if deadline is None else min(0.5, max(deadline - now, 0.0))
                select.select([chan], [], [], wait)
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            if not chan.status_event.wait(left):
                if not transport.is_active():
                    raise _lost(host, display)
                raise CommandTimedOut(display, host, timeout or 0, text(out), text(err))
            if not transport.is_active() and not chan.exit_status_ready():
                raise _lost(host, display)
            code = chan.recv_exit_status()
            if code == -1 and not transport.is_active():
                raise _lost(host, display)
        finally:
            chan.close()
        return code, bytes(out), bytes(err), time.monotonic() - start

    def open_channel(self, command: str, display: str, host: str
                     ) -> tuple[paramiko.Transport, paramiko.Channel]:
        """Open a session channel and start ``command`` on it.

        A connection that died while idle is noticed here: the command has not
        started, so one reconnect is safe (and tried once).

        Raises:
            SSHError: the command could not be started (naming ``host`` and the command).
        """
        for attempt in (1, 2):
            transport = self.connection.connect()
            try:
                chan = transport.open_session(timeout=self.connection.connect_timeout)
                chan.exec_command(command)
                return transport, chan
            except (paramiko.SSHException, OSError, EOFError) as exc:
                if attempt == 1 and dies(transport, within=2.0):
                    # the connection is gone (not just this channel refused) and nothing
                    # started yet: one fresh connection is safe to try
                    log.info("%s: connection closed under us; reconnecting once", host)
                    continue
                reason = str(exc) or "the server closed the connection"
                raise SSHError(f"{host}: cannot start {display!r}: {reason}") from None
        raise AssertionError("unreachable")

    def stream(self, cmd: Command, *, host: str, prefix: Sequence[str] = (),
               timeout: float | None = None, env: Mapping[str, str] | None = None,
               line_timeout: float | None = None) -> SSHStream:
        """Start a long-running command (through ``prefix``) and return its stdout as lines.

        ``timeout`` bounds the whole command (remote ``timeout``), ``line_timeout``
        the wait for each line.  See :class:`~labkit.remote.channel.SSHStream`.
        """
        display = command_text(cmd)
        transport, chan = self.open_channel(
            self.command_line(cmd, timeout=timeout, env=env, prefix=prefix), display, host)
        return SSHStream(transport, chan, display, host, line_timeout=line_timeout)


def _lost(host: str, display: str) -> SSHError:
    return SSHError(f"{host}: SSH connection lost while running {display!r}; "
                    "the command may or may not have completed")
