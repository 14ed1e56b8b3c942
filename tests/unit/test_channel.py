"""SSHStream against a stand-in channel: stopping from another thread is never an error."""

from __future__ import annotations

import os
import threading

from labkit.remote.channel import SSHStream


class _Transport:
    def is_active(self) -> bool:
        return True


class _Channel:
    """Enough of paramiko.Channel: no data yet, and a pipe that close() closes (as paramiko's does)."""

    def __init__(self) -> None:
        self.closed = False
        self.eof_received = False
        self.rfd, self.wfd = os.pipe()
        self.on_fileno = lambda: None

    def shutdown_write(self) -> None:
        pass

    def recv_ready(self) -> bool:
        return False

    def recv_stderr_ready(self) -> bool:
        return False

    def recv(self, size: int) -> bytes:
        return b""

    recv_stderr = recv

    def fileno(self) -> int:
        fd = self.rfd
        self.on_fileno()
        return fd

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.rfd)
            os.close(self.wfd)


def test_stop_closing_the_channel_just_before_the_wait_ends_iteration_without_an_error():
    chan = _Channel()
    stream = SSHStream(_Transport(), chan, "agent", "node")
    # stop() from "another thread" lands between the loop's checks and select(): the
    # descriptor select gets is already closed (CI saw "[Errno 9] Bad file descriptor")
    chan.on_fileno = stream.stop
    assert list(stream) == []
    assert chan.closed and stream.exit_code is None


def test_stop_from_another_thread_ends_a_waiting_iteration_quickly():
    chan = _Channel()
    stream = SSHStream(_Transport(), chan, "agent", "node")
    timer = threading.Timer(0.2, stream.stop)
    timer.start()
    assert list(stream) == []
    timer.join()
    assert chan.closed
