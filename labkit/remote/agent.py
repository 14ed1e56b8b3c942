"""One command agent per SSH connection: commands and file writes without a login each.

Each command sent the plain way opens an SSH session channel: the server forks a
session, runs the login shell, then ``sudo -n`` (PAM, logging), ``timeout`` and
``env`` before the command itself.  Measured in a lab VM under QEMU emulation
that is about 1 s per command (``sudo -n true`` alone 0.86 s), and a testbed
runs hundreds.  :class:`RemoteAgent` starts :mod:`labkit.remote.agent_server`
once per connection with the machine's own ``python3`` (through ``sudo -n`` when
the host uses sudo) and sends it every command and file access as a JSON line;
the agent starts the command directly.  Nothing is installed on the machine:
the program travels as the command line's argument.

A machine without ``python3`` (or a sudo that refuses it) gets one channel per
command as before (:class:`AgentUnavailable`, logged once).  The agent ends
with its connection, and ends any command still running then.
"""

from __future__ import annotations

import base64
import itertools
import json
import logging
import os
import select
import shlex
import threading
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import paramiko

from labkit.exceptions import CommandTimedOut, SSHError
from labkit.remote.channel import CHUNK, text

log = logging.getLogger(__name__)

SERVER_SOURCE = (Path(__file__).with_name("agent_server.py")).read_text()
START_TIMEOUT = 90.0  # python3 starts in ~3 s in an emulated guest; sudo adds ~1 s
REMOTE_GRACE = 1.0  # the agent's own deadline is this much later than ours, so ours is reported
KILLED_WAIT = 4.0  # after our deadline: how long to wait for the killed command's output


class AgentUnavailable(SSHError):
    """The agent could not be started on the machine (no ``python3``, sudo refused it...)."""


class NotStarted(SSHError):
    """The agent's connection went before it read the request: nothing ran (safe to retry)."""


class _Pending:
    __slots__ = ("event", "reply", "acked")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reply: dict[str, Any] | None = None
        self.acked = False


class RemoteAgent:
    """The agent on one SSH connection: :meth:`run` commands, read and write files.

    Args:
        transport: the connection's live transport (the agent ends with it).
        name: the machine's name, as errors give it.
        sudo: start the agent through ``sudo -n`` (every command then runs as root).
        python: the machine's Python (``python3`` on its PATH by default).
    """

    def __init__(self, transport: paramiko.Transport, name: str, *, sudo: bool = False,
                 python: str = "python3"):
        self.transport = transport
        self.name = name
        self.sudo = sudo
        self.python = python
        self.pid: int | None = None
        self._chan: paramiko.Channel | None = None
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._dead: str | None = None
        self._stderr = bytearray()

    def command_line(self) -> str:
        """The command that starts the agent (the program as a base64 argument)."""
        program = base64.b64encode(SERVER_SOURCE.encode()).decode()
        argv = (["sudo", "-n"] if self.sudo else []) + [
            self.python, "-I", "-c", "import base64,sys;exec(base64.b64decode(sys.argv[1]))", program]
        return shlex.join(argv)

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the agent and wait for its first line.

        Raises:
            AgentUnavailable: it exited or said nothing in ``timeout`` s (its stderr kept).
        """
        try:
            chan = self.transport.open_session(timeout=30)
            chan.exec_command(self.command_line())
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise AgentUnavailable(f"{self.name}: cannot start the command agent: {exc}") from None
        buf = bytearray()
        deadline = time.monotonic() + timeout
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or chan.exit_status_ready() and not chan.recv_ready():
                chan.close()
                why = text(self._stderr).strip().splitlines()[-1:] or [
                    "no answer" if left <= 0 else f"exit code {chan.recv_exit_status()}"]
                raise AgentUnavailable(f"{self.name}: the command agent did not start ({why[0]})")
            select.select([chan], [], [], min(left, 0.5))
            while chan.recv_stderr_ready():
                self._stderr += chan.recv_stderr(CHUNK)
            if chan.recv_ready():
                data = chan.recv(CHUNK)
                if not data:
                    continue
                buf += data
        first, _, rest = bytes(buf).partition(b"\n")
        try:
            hello = json.loads(first)
            self.pid = int(hello["pid"])
        except (ValueError, KeyError, TypeError):
            chan.close()
            raise AgentUnavailable(f"{self.name}: the command agent said {first[:200]!r}") from None
        self._chan = chan
        threading.Thread(target=self._read, args=(bytearray(rest),), daemon=True,
                         name=f"ssh-agent-{self.name}").start()
        log.debug("%s: command agent %d started (Python %s)", self.name, self.pid, hello.get("python"))

    @property
    def alive(self) -> bool:
        """True while the agent and its connection are up."""
        return self._chan is not None and self._dead is None and self.transport.is_active()

    def close(self) -> None:
        """End the agent (its stdin closes: it ends what still runs and exits)."""
        if self._chan is not None:
            self._chan.close()
        self._fail("the command agent was closed")

    # -- requests ---------------------------------------------------------------------

    def run(self, argv: Sequence[str], *, input: str | bytes | None, env: Mapping[str, str] | None,
            timeout: float | None, display: str, host: str) -> tuple[int, bytes, bytes, float]:
        """Run ``argv`` there; return ``(exit_code, stdout, stderr, seconds)``.

        Raises:
            CommandTimedOut: ``timeout`` passed; the command's process group was ended.
            NotStarted: the connection went before the agent read the request.
            SSHError: the connection (or the agent) went while it ran.
        """
        data = input.encode() if isinstance(input, str) else input
        request = {"op": "run", "argv": [str(a) for a in argv], "env": dict(env) if env else None,
                   "input": None if data is None else base64.b64encode(data).decode(),
                   "timeout": None if timeout is None else timeout + REMOTE_GRACE}
        rid, pending = self._submit(request, display, host)
        if not pending.event.wait(timeout):
            self._send({"op": "kill", "target": rid}, display, host)
            pending.event.wait(KILLED_WAIT)
            with self._lock:
                self._pending.pop(rid, None)
            reply = pending.reply or {}
            raise CommandTimedOut(display, host, timeout or 0, text(_bytes(reply.get("out"))),
                                  text(_bytes(reply.get("err"))))
        reply = self._reply(rid, pending, display, host)
        return int(reply["code"]), _bytes(reply.get("out")), _bytes(reply.get("err")), float(reply["s"])

    def file(self, op: str, path: str, *, data: bytes | None = None, mode: int | None = None,
             timeout: float = 120.0) -> bytes:
        """A file request (``read``, ``write``, ``append``, ``atomic_write``); ``read`` returns the content.

        Raises:
            OSError: as the machine reported it (errno and message, naming ``path``).
            NotStarted: the connection went before the agent read the request.
            SSHError: the connection went meanwhile, or no answer in ``timeout`` s.
        """
        display = f"{op} {path}"
        request: dict[str, Any] = {"op": op, "path": path, "mode": mode}
        if data is not None:
            request["data"] = base64.b64encode(data).decode()
        rid, pending = self._submit(request, display, self.name)
        if not pending.event.wait(timeout):
            with self._lock:
                self._pending.pop(rid, None)
            raise SSHError(f"{self.name}: no answer to {display!r} within {timeout:g} s")
        reply = self._reply(rid, pending, display, self.name)
        if "errno" in reply:
            code = int(reply["errno"])
            raise OSError(code, f"{reply.get('error') or os.strerror(code)} (remote)", path)
        return _bytes(reply.get("data"))

    # -- plumbing ---------------------------------------------------------------------

    def _submit(self, request: dict[str, Any], display: str, host: str) -> tuple[int, _Pending]:
        pending = _Pending()
        with self._lock:
            if self._dead is not None:
                raise NotStarted(f"{host}: cannot start {display!r}: {self._dead}")
            rid = next(self._ids)
            self._pending[rid] = pending
        request["id"] = rid
        self._send(request, display, host)
        return rid, pending

    def _send(self, request: dict[str, Any], display: str, host: str) -> None:
        line = (json.dumps(request, separators=(",", ":")) + "\n").encode()
        try:
            with self._send_lock:
                assert self._chan is not None
                self._chan.sendall(line)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            self._fail(f"the connection went ({exc or 'closed'})")
            raise NotStarted(f"{host}: cannot start {display!r}: the connection went") from None

    def _reply(self, rid: int, pending: _Pending, display: str, host: str) -> dict[str, Any]:
        with self._lock:
            self._pending.pop(rid, None)
        if pending.reply is None:
            if not pending.acked:
                raise NotStarted(f"{host}: cannot start {display!r}: {self._dead}")
            raise SSHError(f"{host}: SSH connection lost while running {display!r}; "
                           "the command may or may not have completed")
        return pending.reply

    def _read(self, buf: bytearray) -> None:
        chan = self._chan
        assert chan is not None
        try:
            while True:
                while b"\n" in buf:
                    line, _, rest = bytes(buf).partition(b"\n")
                    buf[:] = rest
                    self._deliver(json.loads(line))
                while chan.recv_stderr_ready():
                    self._stderr += chan.recv_stderr(CHUNK)
                    del self._stderr[:-CHUNK]
                if chan.recv_ready():
                    data = chan.recv(CHUNK)
                    if not data:
                        break
                    buf += data
                    continue
                if chan.eof_received or chan.closed or not self.transport.is_active():
                    break
                select.select([chan], [], [], 1.0)
        except (OSError, EOFError, ValueError, paramiko.SSHException) as exc:
            log.debug("%s: command agent channel: %s", self.name, exc)
        tail = text(self._stderr).strip().splitlines()[-1:]
        self._fail("the command agent ended" + (f" ({tail[0]})" if tail else ""))

    def _deliver(self, reply: dict[str, Any]) -> None:
        with self._lock:
            pending = self._pending.get(reply.get("id"))  # type: ignore[arg-type]
        if pending is None:
            return
        if reply.get("ack"):
            pending.acked = True
            return
        pending.reply = reply
        pending.event.set()

    def _fail(self, reason: str) -> None:
        with self._lock:
            if self._dead is None:
                self._dead = reason
            waiting = list(self._pending.values())
        for pending in waiting:
            pending.event.set()  # reply None: the caller reports the lost connection


def _bytes(data: str | None) -> bytes:
    return base64.b64decode(data) if data else b""
