"""Reading an SSH session channel: both output streams at once, and stdout as a line stream.

The executor (:mod:`labkit.remote.executor`) starts a command on a channel;
:func:`drain` moves what the channel holds into buffers without blocking, so a
command that prints megabytes on stdout and stderr completes, and
:class:`SSHStream` yields a long-running command's stdout line by line (the
monitor's remote agent).
"""

from __future__ import annotations

import select
import threading
import time
from typing import Any, Iterator

import paramiko

from labkit.exceptions import CommandFailed, CommandTimedOut, SSHError
from labkit.host import Result

# After the exit status arrives, how long to wait for the rest of the output
# (a background child keeping the pipes open would otherwise hold the call).
DRAIN_AFTER_EXIT = 2.0
CHUNK = 65536


class SSHStream:
    """A remote command whose stdout is read line by line as it comes.

    Iterate to get lines (``str`` without the newline).  :meth:`stop` (from any
    thread, or leaving the ``with`` block) closes the channel; the remote process
    then ends at its next write (SIGPIPE), or at its ``timeout``.  When the
    command ends by itself with a non-zero status, iteration raises
    :class:`CommandFailed`; when the connection drops, :class:`SSHError`.

    Args:
        transport, chan: the connection and the channel the command was started on.
        display: the command as errors show it.
        name: the host (or namespace view) that results and errors name.
        line_timeout: seconds to wait for each line (None: no limit).

    Attributes:
        exit_code: the status once the command ended (None before, or if stopped).
        stderr: the last 64 KiB the command wrote to stderr.
    """

    def __init__(self, transport: paramiko.Transport, chan: paramiko.Channel, display: str, name: str,
                 *, line_timeout: float | None = None):
        self.display = display
        self.name = name
        self.line_timeout = line_timeout
        self.exit_code: int | None = None
        self.stderr = ""
        self._stopped = threading.Event()
        self._start = time.monotonic()
        self._transport, self._chan = transport, chan
        self._chan.shutdown_write()

    def __iter__(self) -> Iterator[str]:
        chan, err, pending = self._chan, bytearray(), bytearray()
        last = time.monotonic()
        while not self._stopped.is_set():
            got = drain(chan, pending, err)
            del err[:-CHUNK]
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
                                      stderr=text(err))
            if not _wait_readable(chan, self._stopped, 0.5):
                break
        self.stderr = text(err)
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


def _wait_readable(chan: paramiko.Channel, stopped: threading.Event, seconds: float) -> bool:
    """Wait up to ``seconds`` for ``chan`` to have data; False once :meth:`SSHStream.stop` ran.

    ``stop()`` may close the channel from another thread, and closing it closes the
    pipe ``select`` waits on: EBADF (or a negative descriptor) then means "stopped",
    never an error of the command.
    """
    if stopped.is_set():
        return False
    try:
        select.select([chan], [], [], seconds)
    except (OSError, ValueError):
        if stopped.is_set():
            return False
        raise
    return True


def dies(transport: paramiko.Transport, within: float) -> bool:
    """True when ``transport`` is, or within ``within`` s turns out to be, dead."""
    deadline = time.monotonic() + within
    while transport.is_active() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not transport.is_active()


def feed(chan: paramiko.Channel, data: bytes) -> None:
    """Send ``data`` as the command's stdin, then close its stdin (run in a thread)."""
    try:
        chan.sendall(data)
        chan.shutdown_write()
    except (OSError, EOFError, paramiko.SSHException):
        pass  # the command ended or stopped reading; its exit status tells the story


def drain(chan: paramiko.Channel, out: bytearray, err: bytearray) -> int:
    """Move what the channel holds into ``out`` and ``err``; return the byte count."""
    return _take(chan.recv_ready, chan.recv, out) + _take(chan.recv_stderr_ready, chan.recv_stderr, err)


def _take(ready: Any, recv: Any, buf: bytearray) -> int:
    got = 0
    while ready():
        chunk = recv(CHUNK)
        if not chunk:
            break
        buf += chunk
        got += len(chunk)
    return got


def text(data: bytes | bytearray) -> str:
    """Output bytes as text (UTF-8, invalid bytes replaced)."""
    return bytes(data).decode("utf-8", "replace")
